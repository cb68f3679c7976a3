"""iso_c and iso_cts against SciPy re-derivations of the official algorithms, plus spectral properties."""

from __future__ import annotations

import numpy as np
import pytest
import torch

scipy_linalg = pytest.importorskip("scipy.linalg")

from transfuse.methods import get_method  # noqa: E402


def _merge(name, base, deltas, weights=None, **params):
    spec = get_method(name)
    kwargs = {p.name: p.default for p in spec.params} | params
    weights = torch.ones(deltas.shape[0]) if weights is None else weights
    return spec.fn(base.clone(), deltas.clone(), weights, **kwargs)


def _tau(deltas, weights):
    return [w * d for w, d in zip(weights.double().numpy(), deltas.double().numpy(), strict=True)]


def _iso_c_expected(base, deltas, weights, alpha):
    u, s, vt = np.linalg.svd(sum(_tau(deltas, weights)), full_matrices=False)
    return base.double().numpy() + alpha * s.mean() * u @ vt


def _iso_cts_expected(base, deltas, weights, alpha, fraction):
    """Algorithm 1 of the paper / official iso_cts, in float64 (generic full-rank inputs)."""
    tau = _tau(deltas, weights)
    k, r = len(tau), min(base.shape)
    share = (r - int(r * fraction)) / k
    per_task = round(share) if round(share) * k <= r else int(share)  # the documented guard against r < 0
    common = r - per_task * k
    u, s, vt = np.linalg.svd(sum(tau), full_matrices=False)
    us, ss, vts = [u[:, :common]], [s[:common]], [vt[:common]]
    projector = u[:, :common] @ u[:, :common].T
    for t in tau:
        ut, st, vtt = np.linalg.svd(t - projector @ t, full_matrices=False)
        us.append(ut[:, :per_task])
        ss.append(st[:per_task])
        vts.append(vtt[:per_task])
    u_orth = scipy_linalg.polar(np.hstack(us))[0]
    vt_orth = scipy_linalg.polar(np.vstack(vts), side="left")[0]
    return base.double().numpy() + alpha * np.concatenate(ss).mean() * u_orth @ vt_orth


def _inputs(shape, k, seed):
    g = torch.Generator().manual_seed(seed)
    shared = torch.randn(shape, generator=g)
    deltas = 0.1 * torch.stack([shared + torch.randn(shape, generator=g) for _ in range(k)])
    return torch.randn(shape, generator=g), deltas, torch.tensor([1.0, 0.6, -0.5, 1.2, 0.9][:k])


@pytest.mark.parametrize("shape", [(20, 12), (12, 20), (15, 15)])
@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_iso_c_matches_derivation(shape, k):
    base, deltas, weights = _inputs(shape, k, seed=k)
    expected = _iso_c_expected(base, deltas, weights, alpha=1.3)
    np.testing.assert_allclose(_merge("iso_c", base, deltas, weights, alpha=1.3).numpy(), expected, atol=2e-5)
    out64 = _merge("iso_c", base, deltas, weights, alpha=1.3, svd_dtype="float64")
    np.testing.assert_allclose(out64.numpy(), expected, atol=1e-6)


def test_iso_c_spectrum_is_flat():
    base, deltas, weights = _inputs((16, 10), 3, seed=7)
    update = _merge("iso_c", base, deltas, weights, alpha=0.5) - base
    s = torch.linalg.svdvals(update.double())
    s_sum = torch.linalg.svdvals((weights.reshape(-1, 1, 1) * deltas).sum(0).double())
    torch.testing.assert_close(s, torch.full_like(s, 0.5 * s_sum.mean().item()), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("shape", "k", "fraction"),
    [
        ((24, 16), 1, 0.8),
        ((24, 16), 2, 0.5),
        ((24, 16), 4, 0.8),
        ((16, 24), 1, 0.0),
        ((16, 24), 2, 0.8),
        ((16, 24), 3, 0.0),
        ((20, 20), 3, 0.0),  # round(20 / 3) * 3 > 20: the guarded split
        ((20, 20), 3, 0.5),
        ((20, 20), 4, 0.5),
        ((30, 7), 2, 0.8),
    ],
)
def test_iso_cts_matches_derivation(shape, k, fraction):
    base, deltas, weights = _inputs(shape, k, seed=10 * k + shape[0])
    expected = _iso_cts_expected(base, deltas, weights, 1.1, fraction)
    out = _merge("iso_cts", base, deltas, weights, alpha=1.1, common_space_fraction=fraction)
    np.testing.assert_allclose(out.numpy(), expected, atol=3e-5)
    out64 = _merge(
        "iso_cts", base, deltas, weights, alpha=1.1, common_space_fraction=fraction, svd_dtype="float64"
    )
    np.testing.assert_allclose(out64.numpy(), expected, atol=1e-6)


def test_iso_cts_spectrum_is_flat():
    base, deltas, weights = _inputs((18, 12), 3, seed=3)
    update = _merge("iso_cts", base, deltas, weights) - base
    s = torch.linalg.svdvals(update.double())
    torch.testing.assert_close(s, torch.full_like(s, s.mean().item()), atol=1e-5, rtol=0)


def test_iso_cts_limits_are_iso_c():
    base, deltas, weights = _inputs((14, 9), 3, seed=4)
    iso_c = _merge("iso_c", base, deltas, weights)
    # All of the rank to the common subspace: exactly Iso-C.
    torch.testing.assert_close(_merge("iso_cts", base, deltas, weights, common_space_fraction=1.0), iso_c)
    # One task and no common subspace: the task's own isotropic version, i.e. Iso-C of that task.
    one = _merge("iso_cts", base, deltas[:1], weights[:1], common_space_fraction=0.0)
    torch.testing.assert_close(one, _merge("iso_c", base, deltas[:1], weights[:1]), atol=1e-5, rtol=0)


def test_rank_one_and_zero_matrices():
    u, v = torch.randn(7, 1), torch.randn(1, 5)
    rank_one = torch.stack([u @ v, 2 * u @ v])  # the sum is rank 1: Iso-C keeps it as is (nuclear norm kept)
    for name in ("iso_c", "iso_cts"):
        torch.testing.assert_close(_merge(name, torch.zeros(7, 5), rank_one), 3 * u @ v, atol=1e-5, rtol=0)
        for shape in [(1, 1), (6, 4), (4, 6), (1, 5)]:
            base = torch.randn(shape)
            torch.testing.assert_close(_merge(name, base, torch.zeros(3, *shape)), base)
            # Tasks that cancel exactly also leave the base.
            d = torch.randn(shape)
            out = _merge(name, base, torch.stack([d, -d]))
            assert torch.isfinite(out).all()
        out = _merge(name, torch.zeros(1, 1), torch.tensor([[[2.0]], [[-5.0]]]))
        torch.testing.assert_close(out, torch.tensor([[-3.0]]))


def test_non_matrices_get_the_mean_task_vector():
    g = torch.Generator().manual_seed(5)
    for name in ("iso_c", "iso_cts"):
        for shape in [(10,), (1,), (), (2, 3, 4)]:
            base, deltas = torch.randn(shape, generator=g), torch.randn(3, *shape, generator=g)
            weights = torch.tensor([1.0, 2.0, -1.0])
            expected = base + 0.7 * (weights.reshape(-1, *[1] * len(shape)) * deltas).mean(0)
            torch.testing.assert_close(_merge(name, base, deltas, weights, alpha=0.7), expected)


def test_small_rank_split_never_goes_negative():
    # r = 3, K = 2, fraction 0: the official round(1.5) * 2 = 4 > r would index with a negative size.
    base, deltas, weights = _inputs((3, 8), 2, seed=6)
    out = _merge("iso_cts", base, deltas, weights, common_space_fraction=0.0)
    assert torch.isfinite(out).all()
