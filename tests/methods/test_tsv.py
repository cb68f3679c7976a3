"""tsv (TSV-Merge) against a SciPy re-derivation (scipy.linalg.svd / polar), plus its defining properties."""

from __future__ import annotations

import numpy as np
import pytest
import torch

scipy_linalg = pytest.importorskip("scipy.linalg")

from transfuse.methods import get_method  # noqa: E402


def _merge(base, deltas, weights=None, **params):
    spec = get_method("tsv")
    kwargs = {p.name: p.default for p in spec.params} | params
    weights = torch.ones(deltas.shape[0]) if weights is None else weights
    return spec.fn(base.clone(), deltas.clone(), weights, **kwargs)


def _expected(base, deltas, weights, alpha=1.0):
    """Algorithm of the paper in float64: per-task top r//K triplets, polar-orthogonalized U and V, summed."""
    tau = [w * d for w, d in zip(weights.double().numpy(), deltas.double().numpy(), strict=True)]
    m, n = base.shape
    keep = max(1, min(m, n) // len(tau))
    us, ss, vts = [], [], []
    for t in tau:
        u, s, vt = scipy_linalg.svd(t, full_matrices=False)
        us.append(u[:, :keep])
        ss.append(s[:keep])
        vts.append(vt[:keep])
    u_cat, s_cat, vt_cat = np.hstack(us), np.concatenate(ss), np.vstack(vts)
    if u_cat.shape[0] >= u_cat.shape[1]:
        u_orth = scipy_linalg.polar(u_cat)[0]  # right polar factor: orthonormal columns
    else:
        u_orth = scipy_linalg.polar(u_cat, side="left")[0]
    if vt_cat.shape[0] <= vt_cat.shape[1]:
        vt_orth = scipy_linalg.polar(vt_cat, side="left")[0]  # orthonormal rows
    else:
        vt_orth = scipy_linalg.polar(vt_cat)[0]
    return base.double().numpy() + alpha * (u_orth * s_cat) @ vt_orth


@pytest.mark.parametrize("shape", [(24, 16), (16, 24), (20, 20), (30, 7)])
@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_matches_scipy_derivation(shape, k):
    g = torch.Generator().manual_seed(k + shape[0])
    base = torch.randn(shape, generator=g)
    deltas = torch.randn(k, *shape, generator=g) * 0.1
    weights = torch.tensor([1.0, 0.7, -0.4, 1.5][:k])
    expected = _expected(base, deltas, weights, alpha=0.9)
    out = _merge(base, deltas, weights, alpha=0.9)
    np.testing.assert_allclose(out.numpy(), expected, atol=2e-5)
    out64 = _merge(base, deltas, weights, alpha=0.9, svd_dtype="float64")
    np.testing.assert_allclose(out64.numpy(), expected, atol=1e-6)


def test_orthogonal_task_subspaces_give_task_arithmetic():
    # Each task lives in its own block of singular vectors (rank <= r/K): nothing to decorrelate or drop.
    g = torch.Generator().manual_seed(0)
    m, n, k, rank = 12, 9, 3, 3
    left = torch.linalg.qr(torch.randn(m, m, generator=g)).Q
    right = torch.linalg.qr(torch.randn(n, n, generator=g)).Q
    deltas = torch.stack(
        [
            left[:, rank * t : rank * (t + 1)]
            @ torch.diag(torch.rand(rank, generator=g) + 0.5)
            @ right[:, rank * t : rank * (t + 1)].T
            for t in range(k)
        ]
    )
    base = torch.randn(m, n, generator=g)
    torch.testing.assert_close(_merge(base, deltas), base + deltas.sum(0), atol=1e-5, rtol=0)


def test_single_full_rank_task_is_returned():
    g = torch.Generator().manual_seed(1)
    base, delta = torch.randn(7, 5, generator=g), torch.randn(1, 7, 5, generator=g)
    torch.testing.assert_close(_merge(base, delta), base + delta[0], atol=1e-5, rtol=0)


def test_identical_rank_one_tasks_are_not_double_counted():
    # Linearly dependent bases: the polar factor is the partial isometry, so two copies of a rank-1 task
    # merge to that task (no arbitrary LAPACK directions leak in).
    u, v = torch.randn(6, 1), torch.randn(1, 4)
    delta = u @ v
    out = _merge(torch.zeros(6, 4), torch.stack([delta, delta]))
    torch.testing.assert_close(out, delta, atol=1e-5, rtol=0)


def test_rank_one_row_matrices_average_when_rank_is_below_k():
    # r = 1 < K = 2: one triplet per task, orthogonalized 1x2 and 2x1 bases -> the mean of the two rows.
    deltas = torch.tensor([[[1.0, 2.0, 0.0]], [[0.0, -1.0, 3.0]]])
    np.testing.assert_allclose(
        _merge(torch.zeros(1, 3), deltas).numpy(),
        _expected(torch.zeros(1, 3), deltas, torch.ones(2)),
        atol=1e-6,
    )


def test_non_matrices_get_the_mean_task_vector():
    g = torch.Generator().manual_seed(2)
    for shape in [(10,), (1,), (), (2, 3, 4)]:
        base, deltas = torch.randn(shape, generator=g), torch.randn(3, *shape, generator=g)
        weights = torch.tensor([1.0, 2.0, -1.0])
        expected = base + 0.5 * (weights.reshape(-1, *[1] * len(shape)) * deltas).mean(0)
        torch.testing.assert_close(_merge(base, deltas, weights, alpha=0.5), expected)


def test_zero_and_one_element_matrices():
    for shape in [(1, 1), (5, 3), (3, 5), (1, 6), (2, 7)]:
        base = torch.randn(shape)
        torch.testing.assert_close(_merge(base, torch.zeros(3, *shape)), base)
        d = torch.randn(2, *shape)
        assert torch.isfinite(_merge(base, d)).all()
        if min(shape) < 3:
            # One triplet per task either way, so an added zero task is simply absent.
            torch.testing.assert_close(_merge(base, torch.cat([d, torch.zeros(1, *shape)])), _merge(base, d))
    torch.testing.assert_close(
        _merge(torch.zeros(1, 1), torch.tensor([[[2.0]], [[4.0]]])), torch.tensor([[3.0]])
    )
