"""SFDA against a slow version of the official algorithm (generalized eigenproblem, all eigenvectors kept);
TMI against a k-d tree nearest-neighbour loop."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import scipy.special
from scipy.spatial import cKDTree

from transfuse.select import sfda, tmi


def _problem(n, d, c, seed, signal=1.0, scale=1.0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, c, n)
    f = rng.standard_normal((n, d)) * scale
    f[:, : min(c, d)] += signal * np.eye(c)[labels][:, : min(c, d)]
    return f, labels


def _shrunk(cov, lam):
    d = cov.shape[0]
    return (1 - lam) * cov + lam * np.trace(cov) / d * np.eye(d)


def _fisher_lda_proba(x, labels, lam=None):
    """The official SFDA class: within scatter, (automatic) shrinkage, eigh(S_b, S_w(lambda)), all eigenvectors."""
    classes = np.unique(labels)
    n, d = x.shape
    priors = np.array([(labels == c).mean() for c in classes])
    means = np.array([x[labels == c].mean(axis=0) for c in classes])
    sw = sum(p * np.cov(x[labels == c].T, bias=True) for p, c in zip(priors, classes))
    if lam is None:
        lam = max(np.exp(-5 * np.linalg.eigvalsh(sw)[-1]), 1e-10)
    sw_l = _shrunk(sw, lam)
    sb = _shrunk(np.cov(x.T, bias=True), lam) - sw_l
    evals, evecs = scipy.linalg.eigh(sb, sw_l)
    evecs = evecs[:, np.argsort(evals)[::-1]]
    coef = means @ evecs @ evecs.T
    intercept = -0.5 * np.diag(means @ coef.T) + np.log(priors)
    scores = x @ coef.T + intercept
    scores -= scores.max(axis=1, keepdims=True)
    return np.exp(scores) / np.exp(scores).sum(axis=1, keepdims=True), lam, means


def slow_sfda(f, labels):
    classes = np.unique(labels)
    prob, lam, means = _fisher_lda_proba(f, labels)
    soft = np.exp(prob) / np.exp(prob).sum(axis=1, keepdims=True)
    mixed = f.copy()
    for k, c in enumerate(classes):
        idx = labels == c
        others = (means.sum(axis=0) - means[k]) / (len(classes) - 1)
        q = soft[idx, k][:, None]
        mixed[idx] = q * f[idx] + (1 - q) * others
    prob, _, _ = _fisher_lda_proba(mixed, labels, lam)
    col = np.searchsorted(classes, labels)
    return float(np.mean(np.log(prob[np.arange(len(labels)), col])))


@pytest.mark.parametrize("n, d, c, scale", [(150, 6, 3, 1.0), (200, 10, 4, 0.2), (80, 5, 2, 0.05)])
def test_sfda_matches_official_algorithm(n, d, c, scale):
    f, labels = _problem(n, d, c, seed=n + d, scale=scale)
    got = sfda(f, labels)
    assert got == pytest.approx(slow_sfda(f, labels), rel=1e-7)
    assert got <= 0


def test_sfda_prefers_separable_features():
    f, labels = _problem(200, 6, 3, seed=1, signal=0.2)
    far, _ = _problem(200, 6, 3, seed=1, signal=4.0)
    assert sfda(far, labels) > sfda(f, labels)


def slow_tmi(f, labels, k=3, min_dist=1.0):
    x = f - f.mean(axis=0)
    n, d = x.shape
    terms = []
    for c in np.unique(labels):
        xc = x[labels == c]
        nc = len(xc)
        if nc <= k:
            continue
        dist, _ = cKDTree(xc).query(xc, k + 1, p=np.inf)
        r = np.maximum(dist[:, -1], min_dist)
        h = -scipy.special.digamma(k) + scipy.special.digamma(nc) + d / nc * np.sum(np.log(2 * r))
        terms.append(nc / n * h)
    return float(np.mean(terms))


@pytest.mark.parametrize("k, min_dist", [(3, 1.0), (1, 0.01), (5, 0.1)])
def test_tmi_matches_kdtree_loop(k, min_dist):
    f, labels = _problem(160, 7, 4, seed=k, scale=2.0)
    labels[:3] = 9  # a class of 3 samples: left out when k >= 3
    assert tmi(f, labels, k=k, min_dist=min_dist) == pytest.approx(
        slow_tmi(f, labels, k, min_dist), rel=1e-10
    )


def test_tmi_counts_duplicate_points_at_distance_zero():
    f, labels = _problem(60, 3, 2, seed=0, scale=0.01)
    f = np.concatenate([f, f[:10]])
    labels = np.concatenate([labels, labels[:10]])
    assert tmi(f, labels, min_dist=1e-3) == pytest.approx(slow_tmi(f, labels, 3, 1e-3), rel=1e-10)


def test_tmi_grows_with_intra_class_spread():
    f, labels = _problem(200, 5, 3, seed=2, scale=1.0)
    assert tmi(f * 4, labels) > tmi(f, labels)
