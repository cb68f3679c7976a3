"""GBC against a loop over class pairs; TransRate against a slogdet loop over classes."""

from __future__ import annotations

import numpy as np
import pytest

from transfuse.select import gbc, transrate


def _problem(n, d, c, seed, signal=1.5):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, c, n)
    f = rng.standard_normal((n, d)) * np.linspace(3.0, 0.5, d)  # distinct variances: a well-defined PCA
    f[:, : min(c, d)] += signal * np.eye(c)[labels][:, : min(c, d)]
    return f + 2.0, labels


def slow_gbc(f, labels, n_components=64, gaussian="diagonal"):
    x = f - f.mean(axis=0)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    z = x @ vt[: min(n_components, *x.shape)].T
    stats = {}
    for c in np.unique(labels):
        zc = z[labels == c]
        var = np.maximum(zc.var(axis=0), 1e-4)
        if gaussian == "spherical":
            var = np.full_like(var, var.mean())
        stats[c] = (zc.mean(axis=0), var)
    total = 0.0
    for i in stats:
        for j in stats:
            if i == j:
                continue
            (m1, s1), (m2, s2) = stats[i], stats[j]
            s = (s1 + s2) / 2
            db = np.sum((m1 - m2) ** 2 / s) / 8 + 0.5 * (
                np.sum(np.log(s)) - 0.5 * np.sum(np.log(s1)) - 0.5 * np.sum(np.log(s2))
            )
            total += np.exp(-db)
    return -total


@pytest.mark.parametrize("n, d, c, k", [(150, 10, 4, 64), (150, 80, 5, 64), (40, 100, 3, 64), (90, 12, 3, 5)])
@pytest.mark.parametrize("gaussian", ["diagonal", "spherical"])
def test_gbc_matches_pair_loop(n, d, c, k, gaussian):
    f, labels = _problem(n, d, c, seed=n + d)
    got = gbc(f, labels, n_components=k, gaussian=gaussian)
    assert got == pytest.approx(slow_gbc(f, labels, k, gaussian), rel=1e-8, abs=1e-12)
    assert -c * (c - 1) <= got <= 0


def test_gbc_separated_classes_score_higher():
    f, labels = _problem(200, 8, 4, seed=1, signal=0.5)
    far, _ = _problem(200, 8, 4, seed=1, signal=6.0)
    assert gbc(far, labels) > gbc(f, labels)


def _coding_rate(z, eps):
    n, d = z.shape
    sign, logdet = np.linalg.slogdet(np.eye(d) + z.T @ z / (n * eps))
    assert sign > 0
    return 0.5 * logdet


def slow_transrate(f, labels, eps=1e-4, normalize=True):
    z = f - f.mean(axis=0)
    if normalize:
        z = z / np.linalg.norm(z, axis=1, keepdims=True)
    conditional = 0.0
    for c in np.unique(labels):
        zc = z[labels == c]
        conditional += len(zc) / len(z) * _coding_rate(zc, eps)
    return _coding_rate(z, eps) - conditional


@pytest.mark.parametrize("n, d, c", [(120, 8, 3), (30, 40, 3), (200, 16, 5)])
@pytest.mark.parametrize("normalize", [True, False])
def test_transrate_matches_slogdet_loop(n, d, c, normalize):
    f, labels = _problem(n, d, c, seed=2 * n + d)
    for eps in (1e-4, 0.5):
        got = transrate(f, labels, eps=eps, normalize=normalize)
        assert got == pytest.approx(slow_transrate(f, labels, eps, normalize), rel=1e-9)
        assert got >= 0


def test_transrate_normalized_upper_bound():
    f, labels = _problem(300, 6, 3, seed=4, signal=10.0)
    eps = 1e-2
    assert transrate(f, labels, eps=eps) <= 6 / 2 * np.log(1 + 1 / (6 * eps))
