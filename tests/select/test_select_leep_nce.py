"""LEEP, N-LEEP and NCE against hand computations (N-LEEP against a loop re-implementation of its definition)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from transfuse.select import leep, nce, nleep

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _entropy(labels) -> float:
    _, counts = np.unique(labels, return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log(p)).sum())


def test_leep_zero_for_perfect_one_to_one_predictions():
    labels = np.array([0, 1, 2, 2, 1, 0, 2, 1])
    mapping = np.array([4, 0, 2])  # target class -> source class, among 6 source classes
    probs = np.zeros((len(labels), 6))
    probs[np.arange(len(labels)), mapping[labels]] = 1.0
    assert leep(probs, labels) == pytest.approx(0.0, abs=1e-12)


def test_leep_is_minus_label_entropy_for_uniform_predictions():
    labels = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 2])
    probs = np.full((len(labels), 7), 1 / 7)
    assert leep(probs, labels) == pytest.approx(-_entropy(labels), abs=1e-12)


def _leep_by_loop(theta: np.ndarray, labels: np.ndarray) -> float:
    """LEEP written out per example: the empirical joint P(y, z) from the soft source predictions ``theta``,
    then the mean log of sum_z P(y_i | z) theta_iz."""
    n, zs = theta.shape
    classes = sorted(set(labels.tolist()))
    joint = {(y, z): 0.0 for y in classes for z in range(zs)}
    for i in range(n):
        for z in range(zs):
            joint[labels[i], z] += theta[i, z] / n
    total = 0.0
    for i in range(n):
        eep = 0.0
        for z in range(zs):
            eep += joint[labels[i], z] / sum(joint[y, z] for y in classes) * theta[i, z]
        total += math.log(eep)
    return total / n


def test_leep_hand_loop():
    probs = np.array(
        [[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4], [0.5, 0.25, 0.25], [0.05, 0.05, 0.9]]
    )
    labels = np.array([1, 0, 0, 1, 0])
    assert leep(probs, labels) == pytest.approx(_leep_by_loop(probs, labels), abs=1e-12)
    assert leep(probs, labels) <= 0


def test_leep_drops_unused_source_classes():
    probs = np.array([[0.6, 0.4, 0.0], [0.3, 0.7, 0.0], [0.9, 0.1, 0.0]])
    labels = [0, 1, 0]
    assert leep(probs, labels) == pytest.approx(leep(probs[:, :2], labels), abs=1e-12)


def test_nce_hand_table():
    # Joint counts (source z rows, target y columns): z=a: y0 3, y1 1;  z=b: y0 0, y1 2;  z=c: y0 1, y1 1.
    source = ["a"] * 4 + ["b"] * 2 + ["c"] * 2
    target = [0, 0, 0, 1, 1, 1, 0, 1]
    n = 8
    expected = (
        3 / n * math.log(3 / 4)
        + 1 / n * math.log(1 / 4)
        + 2 / n * math.log(1.0)
        + 2 * (1 / n * math.log(1 / 2))
    )
    assert nce(source, target) == pytest.approx(expected, abs=1e-12)


def test_nce_extremes():
    target = np.array([0, 1, 2, 0, 1, 2, 2, 2])
    assert nce(target + 10, target) == pytest.approx(0.0, abs=1e-12)  # source determines target
    assert nce(np.zeros(8, dtype=int), target) == pytest.approx(-_entropy(target), abs=1e-12)


def _blobs(n_per_class=40, c=3, d=6, spread=8.0, seed=0):
    rng = np.random.default_rng(seed)
    centers = spread * rng.standard_normal((c, d))
    labels = np.repeat(np.arange(c), n_per_class)
    return centers[labels] + rng.standard_normal((len(labels), d)), labels


def test_nleep_near_zero_on_separated_classes_and_lower_on_random_labels():
    f, labels = _blobs()
    good = nleep(f, labels)
    assert -0.05 < good <= 0
    shuffled = np.random.default_rng(1).permutation(labels)
    assert nleep(f, shuffled) < good - 0.5


def test_nleep_deterministic_for_a_seed():
    f, labels = _blobs(spread=1.0, seed=2)
    assert nleep(f, labels, seed=3) == nleep(f, labels, seed=3)
    assert nleep(f, labels, n_components=4) <= 0


# ---------------------------------------------------------------------------------------------------- N-LEEP oracle


def _sq(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sum((a - b) ** 2))


def _reference_nleep(f, labels, n_components=None, *, variance=0.8, seed=0, max_iter=100, tol=1e-3):
    """N-LEEP as documented, written out independently with loops: PCA by SVD to the fewest axes explaining more
    than `variance`; k-means++ seeding drawing from the same torch random stream (``randint`` for the first
    center, ``multinomial`` on the squared distances for the others); at most 10 Lloyd steps (an emptied
    cluster keeps its center); one M-step from the hard assignment; EM for a diagonal mixture (``reg_covar``
    1e-6, responsibility sums + 10 eps) until the mean log-likelihood moves by less than `tol`; posteriors of
    the final parameters; LEEP by a per-example loop. Returns (score, posteriors, EM steps)."""
    n = f.shape[0]
    classes = sorted(set(labels.tolist()))
    k = min(5 * len(classes) if n_components is None else n_components, n)

    xc = f - f.mean(0)
    u, s, _ = np.linalg.svd(xc, full_matrices=False)
    share = s**2 / np.sum(s**2)
    dz = 1
    while share[:dz].sum() <= variance:
        dz += 1
    z = u[:, :dz] * s[:dz]

    gen = torch.Generator().manual_seed(seed)
    first = int(torch.randint(n, (1,), generator=gen))
    centers = [first]
    closest = np.array([_sq(z[i], z[first]) for i in range(n)])
    for _ in range(1, k):
        nxt = int(torch.multinomial(torch.from_numpy(closest), 1, generator=gen))
        centers.append(nxt)
        closest = np.minimum(closest, [_sq(z[i], z[nxt]) for i in range(n)])
    c = z[centers].copy()
    assign = None
    for _ in range(10):
        new = np.array([int(np.argmin([_sq(z[i], c[j]) for j in range(k)])) for i in range(n)])
        if assign is not None and (new == assign).all():
            break
        assign = new
        for j in range(k):
            if (assign == j).any():
                c[j] = z[assign == j].mean(0)

    eps = 10 * np.finfo(np.float64).eps

    def m_step(resp):
        nk = resp.sum(0) + eps
        means = np.array([(resp[:, j, None] * z).sum(0) / nk[j] for j in range(k)])
        var = np.array([(resp[:, j, None] * (z - means[j]) ** 2).sum(0) / nk[j] for j in range(k)]) + 1e-6
        return nk / n, means, var

    def e_step(weights, means, var):
        log_joint = np.empty((n, k))
        for i in range(n):
            for j in range(k):
                log_joint[i, j] = math.log(weights[j]) + sum(
                    -0.5 * math.log(2 * math.pi * var[j, a]) - (z[i, a] - means[j, a]) ** 2 / (2 * var[j, a])
                    for a in range(dz)
                )
        top = log_joint.max(1, keepdims=True)
        log_norm = top[:, 0] + np.log(np.exp(log_joint - top).sum(1))
        return np.exp(log_joint - log_norm[:, None]), float(log_norm.mean())

    params = m_step(np.eye(k)[assign])
    previous, steps = -math.inf, 0
    for _ in range(max_iter):
        steps += 1
        resp, bound = e_step(*params)
        params = m_step(resp)
        if abs(bound - previous) < tol:
            break
        previous = bound
    theta, _ = e_step(*params)
    return _leep_by_loop(theta, labels), theta, steps


def _overlapping(n, d, c, seed=0):
    """Correlated features with a weak class signal: the mixture posteriors stay soft."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, c, n)
    f = rng.standard_normal((n, d)) @ rng.standard_normal((d, d))
    f[:, :c] += 1.5 * np.eye(c)[labels]
    return f, labels


@pytest.mark.parametrize(
    "n, d, c, n_components, seed",
    [(60, 8, 3, 6, 0), (80, 6, 2, None, 3), (30, 50, 2, None, 0)],
    ids=["N>D-K=6", "N>D-default-K", "N<D-default-K"],
)
def test_nleep_matches_loop_reference(n, d, c, n_components, seed):
    f, labels = _overlapping(n, d, c)
    expected, theta, steps = _reference_nleep(f, labels, n_components, seed=seed)
    assert nleep(f, labels, n_components=n_components, seed=seed) == pytest.approx(expected, rel=1e-10)
    assert steps > 1
    if n > d:  # soft posteriors: the comparison sees the fitted means and variances, not just a partition
        assert (theta.max(1) < 0.9).sum() >= n // 5


def test_nleep_reference_follows_the_seed():
    """Two seeds give different mixtures; the reference, drawing from the same random stream, matches both."""
    f, labels = _overlapping(60, 8, 3)
    scores = []
    for seed in (0, 3):
        expected, _, _ = _reference_nleep(f, labels, 6, seed=seed)
        scores.append(nleep(f, labels, n_components=6, seed=seed))
        assert scores[-1] == pytest.approx(expected, rel=1e-10)
    assert abs(scores[0] - scores[1]) > 1e-3
