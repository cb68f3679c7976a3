"""nuslerp: a float64 re-derivation per row/column/whole tensor, endpoints, parameter errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from transfuse import merge_state_dicts
from transfuse.errors import ParameterError, RecipeError
from transfuse.methods import get_method
from transfuse.methods.context import MethodContext


def _slerp(t, a, b):
    na, nb = max(np.linalg.norm(a), 1e-7), max(np.linalg.norm(b), 1e-7)
    c = float(np.clip(a @ b / (na * nb), -1, 1))
    if 1 - c * c <= 1e-16:
        return (1 - t) * a + t * b
    th = math.acos(c)
    return (math.sin((1 - t) * th) * a + math.sin(t * th) * b) / math.sin(th)


def _expected(base, deltas, w, row_wise, flatten):
    b = base.double().numpy()
    d0, d1 = (d.double().numpy() for d in deltas)
    t = 0.5 if abs(w[0] + w[1]) < 1e-6 else w[1] / (w[0] + w[1])
    if flatten or b.ndim == 1:
        return b + _slerp(t, d0.ravel(), d1.ravel()).reshape(b.shape)
    out = np.empty_like(b)
    if row_wise:  # columns: vectors along dim 0
        for j in range(b.shape[1]):
            out[:, j] = _slerp(t, d0[:, j], d1[:, j])
    else:
        for i in range(b.shape[0]):
            out[i] = _slerp(t, d0[i], d1[i])
    return b + out


def _run(base, deltas, w, **params):
    params = {"nuslerp_row_wise": False, "nuslerp_flatten": True} | params
    return get_method("nuslerp").fn(base.clone(), deltas.clone(), torch.tensor(w), **params)


def _expected_no_base(models, w, row_wise, flatten):
    """Without a base: SLERP of the models themselves (MergeKit 0.1.5), i.e. the formula with base 0 and the
    models as the task vectors."""
    zero = np.zeros(models[0].shape)
    return _expected(torch.from_numpy(zero), models, w, row_wise, flatten)


@pytest.mark.parametrize("mode", [(False, True), (False, False), (True, False)])
@pytest.mark.parametrize("w", [(1.0, 1.0), (0.2, 0.7), (2.0, -0.5)])
@pytest.mark.parametrize("shape", [(6, 4), (9,)])
def test_without_a_base_slerps_the_models(mode, w, shape):
    g = torch.Generator().manual_seed(7 + len(shape))
    models = torch.randn(2, *shape, generator=g) + 0.5
    ref = models[0]
    # The engine passes model 1 as the base then (delta_1 = 0) and says so in the context.
    out = get_method("nuslerp").fn(
        ref.clone(),
        models - ref,
        torch.tensor(w),
        nuslerp_row_wise=mode[0],
        nuslerp_flatten=mode[1],
        ctx=MethodContext(has_base=False),
    )
    np.testing.assert_allclose(out, _expected_no_base(models, w, *mode), rtol=1e-5, atol=1e-5)
    # Not the base-relative form (which would SLERP 0 and model 2 - model 1).
    assert not np.allclose(out, _expected(ref, models - ref, w, *mode), atol=1e-3)
    # End to end: a recipe without base_model gives the same.
    sd = merge_state_dicts(
        None,
        [{"w": models[0]}, {"w": models[1]}],
        "nuslerp",
        weight=list(w),
        nuslerp_row_wise=mode[0],
        nuslerp_flatten=mode[1],
    )
    np.testing.assert_allclose(sd["w"], _expected_no_base(models, w, *mode), rtol=1e-5, atol=1e-5)


def test_without_a_base_orthogonal_models_half_way():
    a, b = {"w": torch.tensor([2.0, 0.0])}, {"w": torch.tensor([0.0, 2.0])}
    torch.testing.assert_close(
        merge_state_dicts(None, [a, b], "nuslerp")["w"], torch.tensor([2.0, 2.0]) / 2**0.5
    )


@pytest.mark.parametrize("mode", [(False, True), (False, False), (True, False)])
@pytest.mark.parametrize("w", [(1.0, 1.0), (0.2, 0.7), (2.0, -0.5), (0.5, -0.5)])
@pytest.mark.parametrize("shape", [(6, 4), (4, 6), (9,)])
def test_matches_loop(mode, w, shape):
    g = torch.Generator().manual_seed(len(shape))
    base, deltas = torch.randn(shape, generator=g), torch.randn(2, *shape, generator=g)
    out = _run(base, deltas, w, nuslerp_row_wise=mode[0], nuslerp_flatten=mode[1])
    np.testing.assert_allclose(out, _expected(base, deltas, w, *mode), rtol=1e-5, atol=1e-5)


def test_endpoints_and_colinear_rows():
    g = torch.Generator().manual_seed(0)
    base, deltas = torch.randn(5, 3, generator=g), torch.randn(2, 5, 3, generator=g)
    # t = w2 / (w1 + w2): w2 = 0 gives model 1, w1 = 0 gives model 2.
    for flatten in (True, False):
        torch.testing.assert_close(_run(base, deltas, (1.0, 0.0), nuslerp_flatten=flatten), base + deltas[0])
        torch.testing.assert_close(_run(base, deltas, (0.0, 1.0), nuslerp_flatten=flatten), base + deltas[1])
    # Colinear task vectors (per row) are interpolated linearly.
    d = torch.stack([deltas[0], 3 * deltas[0]])
    out = _run(base, d, (1.0, 1.0), nuslerp_flatten=False)
    torch.testing.assert_close(out, base + 2 * deltas[0])


def test_orthogonal_equal_norms_half_way():
    out = _run(torch.zeros(2), torch.tensor([[1.0, 0.0], [0.0, 1.0]]), (1.0, 1.0))
    torch.testing.assert_close(out, torch.tensor([1.0, 1.0]) / 2**0.5)


def test_params_and_errors():
    spec = get_method("nuslerp")
    assert spec.defaults() == {"weight": 1.0, "nuslerp_row_wise": False, "nuslerp_flatten": True}
    assert (spec.min_models, spec.max_models, spec.needs_base) == (2, 2, False)
    sd = {"w": torch.zeros(3, 2)}
    models = [{"w": torch.ones(3, 2)}, {"w": -torch.ones(3, 2)}]
    with pytest.raises(ParameterError, match="nuslerp_flatten: false"):
        merge_state_dicts(sd, models, "nuslerp", nuslerp_row_wise=True)
    with pytest.raises(ParameterError, match="nuslerp_row_wise"):
        merge_state_dicts(sd, models, "nuslerp", nuslerp_row_wise="sometimes")
    with pytest.raises(RecipeError, match="at least 2"):
        merge_state_dicts(sd, models[:1], "nuslerp")
    with pytest.raises(RecipeError, match="at most 2"):
        merge_state_dicts(sd, models * 2, "nuslerp")
    with pytest.raises(RecipeError, match="at least 2"):
        merge_state_dicts(None, models[:1], "nuslerp")
    with pytest.raises(RecipeError, match="at most 2"):
        merge_state_dicts(None, models * 2, "nuslerp")
