"""slerp: endpoints, closed forms, the colinear fallback, and an independent float64 re-derivation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from transfuse.errors import RecipeError
from transfuse.methods import get_method


def _merge(base, other, t):
    spec = get_method("slerp")
    return spec.fn(base.clone(), (other - base).unsqueeze(0), torch.ones(1), t=t)


def _expected(v0: np.ndarray, v1: np.ndarray, t: float) -> np.ndarray:
    """Textbook SLERP on the unnormalized vectors, lerp when |cos| > 0.9995 (float64)."""
    a, b = v0.astype(np.float64).ravel(), v1.astype(np.float64).ravel()
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    cos = np.clip((a / (na if na > 1e-8 else 1.0)) @ (b / (nb if nb > 1e-8 else 1.0)), -1, 1)
    if abs(cos) > 0.9995:
        return ((1 - t) * a + t * b).reshape(v0.shape)
    theta = math.acos(cos)
    return ((math.sin((1 - t) * theta) * a + math.sin(t * theta) * b) / math.sin(theta)).reshape(v0.shape)


@pytest.mark.parametrize("shape", [(6, 4), (4, 6), (10,), (2, 3, 4)])
def test_endpoints(shape):
    g = torch.Generator().manual_seed(0)
    v0, v1 = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    torch.testing.assert_close(_merge(v0, v1, 0.0), v0, atol=1e-6, rtol=0)
    torch.testing.assert_close(_merge(v0, v1, 1.0), v1, atol=1e-6, rtol=0)


def test_half_way_between_orthogonal_equal_norm_vectors():
    # theta = pi/2, so both coefficients are sin(pi/4) / sin(pi/2) = 1/sqrt(2).
    v0 = torch.tensor([3.0, 0.0, 0.0, 0.0])
    v1 = torch.tensor([0.0, 0.0, 3.0, 0.0])
    out = _merge(v0, v1, 0.5)
    torch.testing.assert_close(out, (v0 + v1) / math.sqrt(2))
    assert torch.linalg.vector_norm(out).item() == pytest.approx(3.0)  # stays on the sphere


@pytest.mark.parametrize("t", [0.1, 0.3, 0.5, 0.75, 1.3, -0.2])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_independent_derivation(t, seed):
    g = torch.Generator().manual_seed(seed)
    v0 = torch.randn(5, 7, generator=g)
    v1 = 0.5 * v0 + torch.randn(5, 7, generator=g)  # a general angle
    np.testing.assert_allclose(_merge(v0, v1, t).numpy(), _expected(v0.numpy(), v1.numpy(), t), atol=2e-6)


@pytest.mark.parametrize("factor", [2.0, -1.0, -0.5])
def test_colinear_and_antipodal_fall_back_to_lerp(factor):
    v0 = torch.randn(8)
    v1 = factor * v0
    torch.testing.assert_close(_merge(v0, v1, 0.3), 0.7 * v0 + 0.3 * v1)


def test_zero_tensors_do_not_divide_by_zero():
    v1 = torch.randn(4, 3)
    for v0, w in [(torch.zeros(4, 3), v1), (v1, torch.zeros(4, 3)), (torch.zeros(4, 3), torch.zeros(4, 3))]:
        out = _merge(v0, w, 0.4)
        assert torch.isfinite(out).all()
        np.testing.assert_allclose(out.numpy(), _expected(v0.numpy(), w.numpy(), 0.4), atol=1e-6)


def test_one_element_tensors():
    for shape in [(1,), (), (1, 1)]:
        v0, v1 = torch.full(shape, 2.0), torch.full(shape, -3.0)
        # Antipodal 1-element vectors: plain lerp.
        torch.testing.assert_close(_merge(v0, v1, 0.25), 0.75 * v0 + 0.25 * v1)


def test_exactly_one_model():
    spec = get_method("slerp")
    assert spec.max_models == 1 and spec.param("t").default is None
    with pytest.raises(RecipeError, match="exactly one"):
        spec.fn(torch.zeros(3), torch.ones(2, 3), torch.ones(2), t=0.5)
