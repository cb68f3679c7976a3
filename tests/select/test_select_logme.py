"""LogME against a direct numerical maximization of the paper's evidence (rank-correct log-determinant)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.optimize

from transfuse.select import logme


def _evidence(log_alpha: float, log_beta: float, f: np.ndarray, y: np.ndarray) -> float:
    """The paper's log evidence, written out naively: D x D matrix A, its slogdet, m from a linear solve."""
    alpha, beta = np.exp(log_alpha), np.exp(log_beta)
    n, d = f.shape
    a = alpha * np.eye(d) + beta * f.T @ f
    m = beta * np.linalg.solve(a, f.T @ y)
    sign, logdet = np.linalg.slogdet(a)
    assert sign > 0
    return (
        d / 2 * np.log(alpha)
        + n / 2 * np.log(beta)
        - n / 2 * np.log(2 * np.pi)
        - beta / 2 * np.sum((f @ m - y) ** 2)
        - alpha / 2 * m @ m
        - logdet / 2
    )


def oracle_logme(f: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean([value for value, _ in _oracle_per_class(f, labels)]))


def _oracle_per_class(f: np.ndarray, labels: np.ndarray) -> list[tuple[float, np.ndarray]]:
    """(max evidence / N, argmax (log alpha, log beta)) per class, by Nelder-Mead from two starts."""
    n = f.shape[0]
    out = []
    for c in np.unique(labels):
        y = (labels == c).astype(np.float64)

        def objective(p, y=y):
            try:
                return -_evidence(p[0], p[1], f, y)
            except (np.linalg.LinAlgError, AssertionError, FloatingPointError):
                return np.inf

        runs = [
            scipy.optimize.minimize(
                objective,
                x0,
                method="Nelder-Mead",
                bounds=[(-20, 20), (-20, 20)],
                options=dict(xatol=1e-10, fatol=1e-13, maxiter=20000),
            )
            for x0 in [(0.0, 0.0), (3.0, 3.0)]
        ]
        best = min(runs, key=lambda r: r.fun)
        out.append((-best.fun / n, best.x))
    return out


def _problem(n, d, c, seed, duplicate=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, c, n)
    f = rng.standard_normal((n, d))
    f[:, :c] += 1.5 * np.eye(c)[labels]
    if duplicate:  # rank-deficient: repeated (scaled) columns
        f = np.concatenate([f, 2.0 * f[:, :duplicate]], axis=1)
    return f, labels


@pytest.mark.parametrize(
    "n, d, c, duplicate",
    [(80, 12, 3, 0), (20, 40, 3, 0), (80, 12, 3, 5), (24, 24, 4, 6)],
    ids=["N>D", "N<D", "N>D-rank-deficient", "N<D-rank-deficient"],
)
def test_matches_direct_maximization(n, d, c, duplicate):
    # Seed 0 gives every class an interior maximum (finite alpha, beta). With N <= D the evidence can also
    # peak at the boundary beta -> inf (exact interpolation), where the naive D x D slogdet loses accuracy:
    # see test_boundary_maximum.
    f, labels = _problem(n, d, c, seed=0, duplicate=duplicate)
    expected = oracle_logme(f, labels)
    assert logme(f, labels) == pytest.approx(expected, rel=1e-6)


def test_boundary_maximum():
    """Seed 60, N < D: one class's evidence keeps rising as beta -> inf, another's as alpha -> inf. logme's
    value is the supremum, so it is never below any point the naive search reaches (within its accurate range
    log beta <= 12), and at most a little above it."""
    f, labels = _problem(20, 40, 3, seed=60)
    n = f.shape[0]
    best = []
    for c in range(3):
        y = (labels == c).astype(np.float64)
        runs = [
            scipy.optimize.minimize(
                lambda p, y=y: -_evidence(p[0], p[1], f, y),
                x0,
                method="Nelder-Mead",
                bounds=[(-5, 40), (-5, 12)],
                options=dict(xatol=1e-9, fatol=1e-12, maxiter=2000),
            )
            for x0 in [(3.0, 3.0), (30.0, 1.0), (3.0, 11.0)]
        ]
        best.append(-min(r.fun for r in runs) / n)
    got, bound = logme(f, labels), float(np.mean(best))
    assert bound - 1e-9 <= got <= bound + 1e-5


def test_differs_from_reference_formula_by_the_dropped_eigenvalues():
    """thuml/LogME's evidence has D/2 log(alpha) but sums log(alpha + beta sigma_i) over the k nonzero
    eigenvalues only: at the same (alpha, beta) it is (D - k) log(alpha) / (2N) above the exact evidence.
    Its fixed point is the same stationary point, so its reported value is logme's plus that term."""
    f, labels = _problem(20, 40, 3, seed=0)  # N < D, full row rank: k = N
    n, d = f.shape
    sigma = np.linalg.eigvalsh(f @ f.T)
    reference, offsets = [], []
    for c, (_, (log_alpha, log_beta)) in zip(range(3), _oracle_per_class(f, labels)):
        y = (labels == c).astype(np.float64)
        alpha, beta = np.exp(log_alpha), np.exp(log_beta)
        exact = _evidence(log_alpha, log_beta, f, y)
        a = alpha * np.eye(d) + beta * f.T @ f
        # the reference's log|A| term
        exact_logdet = np.linalg.slogdet(a)[1]
        reference.append((exact + exact_logdet / 2 - np.sum(np.log(alpha + beta * sigma)) / 2) / n)
        offsets.append((d - n) * log_alpha / (2 * n))
    assert np.mean(reference) == pytest.approx(logme(f, labels) + np.mean(offsets), rel=1e-6)
    assert abs(np.mean(offsets)) > 0.1  # a large error, not a rounding issue


@pytest.mark.parametrize(
    "n, d, seed", [(60, 10, 3), (20, 50, 3), (20, 40, 60)], ids=["N>D", "N<D", "N<D-boundary-maximum"]
)
def test_rotation_invariant(n, d, seed):
    """F -> F Q (Q orthogonal D x D) keeps F F^T and the spectrum of F^T F, and |m| with it: the evidence is the
    same function of (alpha, beta) at every shape, N < D included (seed 60: the boundary case above)."""
    f, labels = _problem(n, d, 3, seed=seed)
    q, _ = np.linalg.qr(np.random.default_rng(4).standard_normal((d, d)))
    assert logme(f @ q, labels) == pytest.approx(logme(f, labels), rel=1e-9)


def test_falls_as_label_noise_rises():
    rng = np.random.default_rng(5)
    n, c = 600, 4
    labels = rng.integers(0, c, n)
    centers = 4.0 * rng.standard_normal((c, 16))
    f = centers[labels] + rng.standard_normal((n, 16))  # separable
    scores = []
    for rate in (0.0, 0.2, 0.5):
        noisy = labels.copy()
        flip = rng.random(n) < rate
        noisy[flip] = rng.integers(0, c, int(flip.sum()))
        scores.append(logme(f, noisy))
    assert scores[0] > scores[1] > scores[2]


def test_torch_and_numpy_agree():
    torch = pytest.importorskip("torch")
    f, labels = _problem(50, 8, 3, seed=6)
    assert logme(torch.from_numpy(f).float(), torch.from_numpy(labels)) == pytest.approx(
        logme(f.astype(np.float32), labels), rel=1e-12
    )
