"""consensus (TALL-mask consensus merging) against element-by-element re-derivations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from transfuse.methods import get_method


def _merge(base, deltas, weights=None, **params):
    spec = get_method("consensus")
    kwargs = {("lambda_" if p.name == "lambda" else p.name): p.default for p in spec.params}
    kwargs |= {("lambda_" if k == "lambda" else k): v for k, v in params.items()}
    weights = torch.ones(deltas.shape[0]) if weights is None else weights
    return spec.fn(base.clone(), deltas.clone(), weights, **kwargs)


def _ties_sum_reference(tau: np.ndarray, density: float) -> np.ndarray:
    """TIES (keep top int(n*density) |x| per task by sorting, elect sign, disjoint sum), float64."""
    k = tau.shape[0]
    flat = tau.reshape(k, -1).astype(np.float64)
    n = flat.shape[1]
    keep = int(n * density)
    trimmed = flat.copy()
    if keep < n:
        for t in range(k):
            cut = np.sort(np.abs(flat[t]))[n - keep - 1]  # the (n-keep)-th smallest magnitude
            trimmed[t][np.abs(flat[t]) < cut] = 0.0
    out = np.zeros(n)
    sign = np.sign(trimmed.sum(axis=0))
    sign[sign == 0] = np.sign(sign.sum())
    for i in range(n):
        for t in range(k):
            x = trimmed[t, i]
            if (sign[i] > 0 and x > 0) or (sign[i] <= 0 and x < 0):
                out[i] += x
    return out.reshape(tau.shape[1:])


def _expected(base, deltas, weights, lam, mask_lambda, k_min, base_method="task_arithmetic", density=0.2):
    tau = deltas.numpy().astype(np.float64) * weights.numpy().astype(np.float64).reshape(
        -1, *[1] * (deltas.dim() - 1)
    )
    merged = tau.sum(axis=0) if base_method == "task_arithmetic" else _ties_sum_reference(tau, density)
    out = base.numpy().astype(np.float64).copy()
    flat_out, flat_merged = out.reshape(-1), merged.reshape(-1)
    flat_tau = tau.reshape(tau.shape[0], -1)
    for i in range(flat_out.size):
        votes = sum(
            abs(flat_tau[t, i]) > mask_lambda * abs(flat_merged[i] - flat_tau[t, i]) for t in range(len(tau))
        )
        if votes >= k_min:
            flat_out[i] += lam * flat_merged[i]
    return out


@pytest.mark.parametrize("shape", [(6, 5), (5, 6), (30,), (2, 3, 4)])
@pytest.mark.parametrize("k", [2, 3, 5])
@pytest.mark.parametrize("k_min", [0, 1, 2, 3])
def test_task_arithmetic_variant_matches_reference(shape, k, k_min):
    g = torch.Generator().manual_seed(k * 7 + k_min)
    base = torch.randn(shape, generator=g)
    # Sparse-ish, partly conflicting task vectors, so every vote count occurs.
    deltas = torch.randn(k, *shape, generator=g) * (torch.rand(k, *shape, generator=g) < 0.5)
    weights = torch.tensor([1.0, 0.5, -0.7, 2.0, 1.0][:k])
    out = _merge(base, deltas, weights, **{"lambda": 0.8, "k": k_min, "tall_mask_lambda": 0.4})
    np.testing.assert_allclose(out.numpy(), _expected(base, deltas, weights, 0.8, 0.4, k_min), atol=1e-5)


@pytest.mark.parametrize("density", [0.0, 0.2, 0.5, 1.0])
@pytest.mark.parametrize("mask_lambda", [0.2, 0.6])
def test_ties_variant_matches_reference(density, mask_lambda):
    g = torch.Generator().manual_seed(11)
    base = torch.randn(8, 9, generator=g)
    deltas = torch.randn(4, 8, 9, generator=g)
    weights = torch.ones(4)
    out = _merge(base, deltas, base_method="ties", density=density, tall_mask_lambda=mask_lambda)
    expected = _expected(base, deltas, weights, 1.0, mask_lambda, 2, "ties", density)
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-5)


def test_hand_worked_example():
    # Three tasks, four weights; tau_MTL = [3, 0.2, 1, 0].  With lambda_mask = 0.5:
    # weight 0: tasks (1, 1, 1): |1| > 0.5*|3-1| = 1? no (strict) -> 0 votes -> dropped
    # weight 1: tasks (1, -1, 0.2): |1| > 0.5*0.8 yes; |-1| > 0.5*1.2 yes; |0.2| > 0 yes -> 3 votes -> kept
    # weight 2: tasks (1, 0, 0): task 0 only (selfish) -> 1 vote -> dropped with k = 2
    # weight 3: all zero -> 0 votes
    deltas = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, -1.0, 0.0, 0.0], [1.0, 0.2, 0.0, 0.0]])
    out = _merge(torch.zeros(4), deltas, tall_mask_lambda=0.5, k=2)
    torch.testing.assert_close(out, torch.tensor([0.0, 0.2, 0.0, 0.0]))
    out = _merge(torch.zeros(4), deltas, tall_mask_lambda=0.5, k=1)
    torch.testing.assert_close(out, torch.tensor([0.0, 0.2, 1.0, 0.0]))


def test_k_zero_is_task_arithmetic_and_k_above_tasks_is_the_base():
    g = torch.Generator().manual_seed(2)
    base, deltas = torch.randn(4, 4, generator=g), torch.randn(3, 4, 4, generator=g)
    torch.testing.assert_close(_merge(base, deltas, k=0, **{"lambda": 0.5}), base + 0.5 * deltas.sum(0))
    torch.testing.assert_close(_merge(base, deltas, k=4), base)


def test_single_model():
    # K = 1: tau_MTL = tau, so |tau| > 0 marks every nonzero weight; k = 1 returns the model, k = 2 the base.
    base, delta = torch.randn(5), torch.randn(1, 5)
    torch.testing.assert_close(_merge(base, delta, k=1), base + delta[0])
    torch.testing.assert_close(_merge(base, delta), base)


def test_zero_and_tiny_tensors():
    for shape in [(1,), (), (1, 1), (3, 2)]:
        base = torch.randn(shape)
        torch.testing.assert_close(_merge(base, torch.zeros(3, *shape)), base)
        out = _merge(base, torch.randn(3, *shape), base_method="ties")
        assert out.shape == base.shape and torch.isfinite(out).all()
