"""multislerp: a float64 re-derivation, known properties, the degenerate cases, parameter errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from transfuse import merge_state_dicts
from transfuse.errors import ParameterError, RecipeError
from transfuse.methods import get_method
from transfuse.methods.context import MethodContext


def _expected(base, deltas, w, normalize=True, eps=1e-8):
    d = deltas.double().numpy().reshape(deltas.shape[0], -1)
    w = np.asarray(w, dtype=np.float64)
    if normalize:
        w = w / w.sum()
    norms = np.linalg.norm(d, axis=1)
    units = d / (norms[:, None] + eps)
    mu = (w[:, None] * units).sum(0)
    mu /= np.linalg.norm(mu)
    v = sum(wi * (u - (u @ mu) * mu) for wi, u in zip(w, units))
    r = np.linalg.norm(v) + eps
    out = (np.cos(r) * mu + np.sin(r) * v / r) * (w * norms).sum()
    return base.double().numpy() + out.reshape(base.shape)


def _run(base, deltas, w, **params):
    params = {"normalize_weights": True, "eps": 1e-8} | params
    return get_method("multislerp").fn(base.clone(), deltas.clone(), torch.tensor(w), **params)


@pytest.mark.parametrize("w", [(0.5, 0.5), (0.2, 0.3, 0.5), (1.0, 2.0, 3.0, 4.0)])
@pytest.mark.parametrize("normalize", [True, False])
def test_without_a_base_interpolates_the_models_around_the_origin(w, normalize):
    g = torch.Generator().manual_seed(10 + len(w))
    models = torch.randn(len(w), 6, 5, generator=g) + 0.3
    # The models as points around the origin: the same formula with base 0 and the models as task vectors.
    expected = _expected(torch.zeros(6, 5), models, w, normalize)
    ref = models[0]  # the engine passes model 1 as the base (delta_1 = 0) and says there is none
    ctx = MethodContext(has_base=False)
    out = _run(ref, models - ref, w, normalize_weights=normalize, ctx=ctx)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    assert not np.allclose(out, _expected(ref, models - ref, w, normalize), atol=1e-3)
    sd = merge_state_dicts(
        None, [{"w": m} for m in models], "multislerp", weight=list(w), normalize_weights=normalize
    )
    np.testing.assert_allclose(sd["w"], expected, rtol=1e-5, atol=1e-5)


def test_without_a_base_degenerate_cases():
    ctx = MethodContext(has_base=False)
    m = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    # One model: itself; identical models: that model.
    torch.testing.assert_close(_run(m, torch.zeros(1, 2, 2), (0.7,), ctx=ctx), m)
    torch.testing.assert_close(_run(m, torch.zeros(3, 2, 2), (0.2, 0.3, 0.5), ctx=ctx), m, atol=1e-5, rtol=0)
    # Opposite models with equal weights: their linear average (zero), as MergeKit.
    torch.testing.assert_close(_run(m, torch.stack([0 * m, -2 * m]), (0.5, 0.5), ctx=ctx), torch.zeros(2, 2))
    # Every model zero: zero.
    z = torch.zeros(2, 2)
    torch.testing.assert_close(_run(z, torch.zeros(3, 2, 2), (0.2, 0.3, 0.5), ctx=ctx), z)


@pytest.mark.parametrize("w", [(0.5, 0.5), (0.2, 0.3, 0.5), (1.0, 2.0, 3.0, 4.0)])
@pytest.mark.parametrize("normalize", [True, False])
def test_matches_numpy(w, normalize):
    g = torch.Generator().manual_seed(len(w))
    base, deltas = torch.randn(6, 5, generator=g), torch.randn(len(w), 6, 5, generator=g)
    out = _run(base, deltas, w, normalize_weights=normalize)
    np.testing.assert_allclose(out, _expected(base, deltas, w, normalize), rtol=1e-5, atol=1e-5)


def test_two_models_is_slerp_of_the_task_vectors():
    # For two task vectors of equal norm multislerp is the geodesic point at the weighted angle.
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    out = _run(torch.zeros(2), torch.stack([a, b]), (0.5, 0.5))
    torch.testing.assert_close(out, torch.tensor([1.0, 1.0]) / 2**0.5)


def test_one_model_identical_models_and_cancelling_pair():
    g = torch.Generator().manual_seed(0)
    base, d = torch.randn(4, 4, generator=g), torch.randn(1, 4, 4, generator=g)
    torch.testing.assert_close(_run(base, d, (0.7,)), base + d[0])
    torch.testing.assert_close(
        _run(base, torch.cat([d, d, d]), (0.2, 0.3, 0.5)), base + d[0], atol=1e-5, rtol=0
    )
    # Opposite task vectors with equal weights: the linear average (the base here), as MergeKit.
    torch.testing.assert_close(_run(base, torch.cat([d, -d]), (0.5, 0.5)), base)
    # No model changed the tensor: the base (MergeKit raises for K >= 3).
    torch.testing.assert_close(_run(base, torch.zeros(3, 4, 4), (0.2, 0.3, 0.5)), base)
    with pytest.raises(ParameterError, match="weighted mean direction"):
        _run(base, torch.cat([d, -d, 0 * d]), (0.5, 0.5, 0.5))


def test_params_and_errors():
    spec = get_method("multislerp")
    assert spec.defaults() == {"weight": 1.0, "normalize_weights": True, "eps": 1e-8} and not spec.needs_base
    sd, models = {"w": torch.zeros(3)}, [{"w": torch.ones(3)}, {"w": torch.arange(3.0)}]
    with pytest.raises(ParameterError, match="sum"):
        merge_state_dicts(sd, models, "multislerp", weight=[0.5, -0.5])
    merge_state_dicts(sd, models, "multislerp", weight=[0.5, -0.5], normalize_weights=False)
    with pytest.raises(ParameterError, match="eps"):
        merge_state_dicts(sd, models, "multislerp", eps=0.0)
    with pytest.raises(ParameterError, match="eps"):
        merge_state_dicts(sd, models, "multislerp", eps=-1.0)
    with pytest.raises(ParameterError, match="sum"):
        merge_state_dicts(None, models, "multislerp", weight=[0.5, -0.5])
    with pytest.raises(RecipeError, match="at least one model"):
        merge_state_dicts(None, [], "multislerp")
