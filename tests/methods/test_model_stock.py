"""model_stock against an independent float64 NumPy re-derivation and the paper's closed forms."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from transfuse.errors import RecipeError
from transfuse.methods import get_method


def _merge(base, deltas, weights=None, **params):
    spec = get_method("model_stock")
    kwargs = {p.name: p.default for p in spec.params} | params
    weights = torch.ones(deltas.shape[0]) if weights is None else weights
    return spec.fn(base.clone(), deltas.clone(), weights, **kwargs)


def _expected(base: np.ndarray, deltas: np.ndarray, filter_wise: bool) -> np.ndarray:
    """Eq. (5) of Model Stock, written out row by row in float64."""
    k = deltas.shape[0]
    if filter_wise:
        rows = deltas.reshape(k, -1, base.shape[-1]) if base.ndim > 1 else deltas.reshape(k, 1, -1)
    else:
        rows = deltas.reshape(k, 1, -1)
    out = np.empty(rows.shape[1:], dtype=np.float64)
    for r in range(rows.shape[1]):
        cosines = []
        for i, j in itertools.combinations(range(k), 2):
            a, b = rows[i, r].astype(np.float64), rows[j, r].astype(np.float64)
            cosines.append(np.clip(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-6), -1, 1))
        c = float(np.mean(cosines))
        denominator = 1 + (k - 1) * c
        t = 0.0 if abs(denominator) < 1e-6 else k * c / denominator
        out[r] = t * rows[:, r].astype(np.float64).mean(axis=0)
    return base.astype(np.float64) + out.reshape(base.shape)


@pytest.mark.parametrize("shape", [(7, 5), (5, 7), (16,), (3, 4, 5)])
@pytest.mark.parametrize("k", [2, 3, 5])
@pytest.mark.parametrize("filter_wise", [False, True])
def test_matches_independent_derivation(shape, k, filter_wise):
    g = torch.Generator().manual_seed(k * 100 + len(shape))
    base = torch.randn(shape, generator=g)
    shared = torch.randn(shape, generator=g)  # correlated task vectors: a realistic positive angle
    deltas = torch.stack([shared + 0.7 * torch.randn(shape, generator=g) for _ in range(k)]) * 0.1
    out = _merge(base, deltas, filter_wise=filter_wise)
    expected = _expected(base.numpy(), deltas.numpy(), filter_wise)
    np.testing.assert_allclose(out.numpy(), expected, atol=2e-6, rtol=0)


def test_two_models_closed_form_ratio():
    # delta_1 = 2 e1, delta_2 = 3 (cos e1 + sin e2): the angle is known exactly, t = 2 cos / (1 + cos).
    theta = 1.0
    base = torch.tensor([0.5, -1.0, 2.0])
    deltas = torch.tensor([[2.0, 0.0, 0.0], [3 * math.cos(theta), 3 * math.sin(theta), 0.0]])
    t = 2 * math.cos(theta) / (1 + math.cos(theta))
    expected = base + t * deltas.mean(dim=0)
    torch.testing.assert_close(_merge(base, deltas), expected, atol=1e-6, rtol=0)


def test_opposite_models_keep_the_base():
    # cos = -1 makes 1 + (K-1) cos = 0: no finite estimate, so the base is kept (MergeKit's rule).
    base = torch.randn(4, 3)
    d = torch.randn(4, 3)
    torch.testing.assert_close(_merge(base, torch.stack([d, -d])), base)


def test_identical_models_give_the_model():
    base = torch.randn(6)
    d = torch.randn(6)
    torch.testing.assert_close(_merge(base, torch.stack([d, d, d])), base + d, atol=1e-6, rtol=0)


def test_filter_wise_on_a_vector_is_the_whole_tensor_mode():
    g = torch.Generator().manual_seed(3)
    base, deltas = torch.randn(9, generator=g), torch.randn(3, 9, generator=g)
    torch.testing.assert_close(
        _merge(base, deltas, filter_wise=True), _merge(base, deltas, filter_wise=False)
    )


def test_filter_wise_rows_are_independent():
    base = torch.zeros(2, 2)
    # Row 0: parallel deltas (t = 1, the average); row 1: orthogonal deltas (t = 0, the base).
    deltas = torch.tensor([[[1.0, 0.0], [1.0, 0.0]], [[1.0, 0.0], [0.0, 1.0]]])
    out = _merge(base, deltas, filter_wise=True)
    torch.testing.assert_close(out, torch.tensor([[1.0, 0.0], [0.0, 0.0]]))


def test_zero_and_tiny_tensors_stay_finite():
    for shape in [(1,), (), (1, 1), (5, 3)]:
        base = torch.randn(shape)
        torch.testing.assert_close(_merge(base, torch.zeros(2, *shape)), base)
        out = _merge(base, torch.randn(3, *shape))
        assert out.shape == base.shape and torch.isfinite(out).all()


def test_weights_are_ignored_like_mergekit():
    g = torch.Generator().manual_seed(5)
    base, deltas = torch.randn(4, 4, generator=g), torch.randn(2, 4, 4, generator=g)
    torch.testing.assert_close(_merge(base, deltas, torch.tensor([0.2, 3.0])), _merge(base, deltas))


def test_needs_two_models():
    assert get_method("model_stock").min_models == 2
    with pytest.raises(RecipeError, match="at least 2"):
        _merge(torch.zeros(3), torch.ones(1, 3))
