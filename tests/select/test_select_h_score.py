"""H-score and shrinkage H-score against slow loop formulas."""

from __future__ import annotations

import importlib

import numpy as np
import pytest

from transfuse.select import h_score, shrinkage_h_score

h_module = importlib.import_module("transfuse.select.h_score")


def _problem(n, d, c, seed, signal=1.0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, c, n)
    f = rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) * 0.3
    f[:, : min(c, d)] += signal * np.eye(c)[labels][:, : min(c, d)]
    return f + 5.0, labels  # an offset: every formula must center


def slow_h_score(f, labels):
    cov_f = np.cov(f, rowvar=False, bias=True)
    g = np.zeros_like(f)
    for c in np.unique(labels):
        g[labels == c] = f[labels == c].mean(axis=0)
    cov_g = np.cov(g, rowvar=False, bias=True)
    return float(np.trace(np.linalg.pinv(cov_f, rcond=1e-12, hermitian=True) @ cov_g))


def slow_ledoit_wolf(f):
    x = f - f.mean(axis=0)
    n, d = x.shape
    s = x.T @ x / n
    mu = np.trace(s) / d
    b = sum(np.sum((np.outer(x[i], x[i]) - s) ** 2) for i in range(n)) / n**2 / d
    delta = np.sum((s - mu * np.eye(d)) ** 2) / d
    alpha = min(b, delta) / delta
    return alpha, (1 - alpha) * s + alpha * mu * np.eye(d)


def slow_shrinkage_h_score(f, labels):
    alpha, cov_alpha = slow_ledoit_wolf(f)
    n = len(f)
    cov_g = np.zeros((f.shape[1], f.shape[1]))
    for c in np.unique(labels):
        diff = f[labels == c].mean(axis=0) - f.mean(axis=0)
        cov_g += (labels == c).sum() / n * np.outer(diff, diff)
    return float(np.trace(np.linalg.inv(cov_alpha) @ ((1 - alpha) * cov_g)))


@pytest.mark.parametrize("n, d, c", [(200, 12, 4), (30, 50, 3), (60, 8, 2)])
def test_h_score_matches_slow_formula_and_range(n, d, c):
    f, labels = _problem(n, d, c, seed=n)
    got = h_score(f, labels)
    assert got == pytest.approx(slow_h_score(f, labels), rel=1e-7)
    assert 0 <= got <= min(d, c - 1) + 1e-9


def test_h_score_reaches_its_maximum_when_features_are_the_labels():
    labels = np.arange(40) % 4
    assert h_score(np.eye(4)[labels][:, :3], labels) == pytest.approx(3.0)


def test_h_score_rotation_invariant():
    f, labels = _problem(100, 10, 3, seed=7)
    q, _ = np.linalg.qr(np.random.default_rng(8).standard_normal((10, 10)))
    assert h_score(f @ q, labels) == pytest.approx(h_score(f, labels), rel=1e-9)


@pytest.mark.parametrize("n, d", [(50, 8), (20, 30)])
def test_ledoit_wolf_coefficient_matches_slow_formula(n, d):
    torch = pytest.importorskip("torch")
    f, _ = _problem(n, d, 2, seed=d)
    x = torch.from_numpy(f - f.mean(axis=0))
    lam = torch.linalg.eigvalsh(x.T @ x / n)
    expected, _ = slow_ledoit_wolf(f)
    assert 0 < expected < 1
    assert h_module._ledoit_wolf_shrinkage(x, lam) == pytest.approx(expected, rel=1e-9)
    if n < d:  # the zero eigenvalues may be left out, as the N x N Gram path does
        assert h_module._ledoit_wolf_shrinkage(x, lam[-n:]) == pytest.approx(expected, rel=1e-9)


def test_ledoit_wolf_matches_scikit_learn_if_installed():
    covariance = pytest.importorskip("sklearn.covariance")
    f, _ = _problem(40, 6, 2, seed=1)
    _, expected_alpha = covariance.ledoit_wolf(f - f.mean(0), assume_centered=True)
    assert slow_ledoit_wolf(f)[0] == pytest.approx(expected_alpha, rel=1e-9)


@pytest.mark.parametrize("n, d, c", [(120, 10, 3), (25, 40, 4)])
def test_shrinkage_h_score_matches_slow_formula(n, d, c):
    f, labels = _problem(n, d, c, seed=3 * n)
    got = shrinkage_h_score(f, labels)
    assert got == pytest.approx(slow_shrinkage_h_score(f, labels), rel=1e-8)
    assert 0 <= got <= min(d, c - 1)
