"""karcher: a float64 numpy re-derivation (gradient descent on the sphere), known properties, parameter errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from transfuse import merge_state_dicts
from transfuse.errors import ParameterError
from transfuse.methods import get_method
from transfuse.methods.context import MethodContext


def _expected(points, iters=200):
    """Equal-weight Karcher mean of the directions by many Riemannian gradient steps (float64), times the mean
    norm."""
    xs = [p.double().numpy().ravel() for p in points]
    units = [x / np.linalg.norm(x) for x in xs]
    mu = sum(units) / np.linalg.norm(sum(units))
    for _ in range(iters):
        v = np.zeros_like(mu)
        for u in units:
            c = np.clip(mu @ u, -1, 1)
            th = np.arccos(c)
            if th > 1e-12:
                v += th / np.sin(th) * (u - c * mu) / len(units)
        s = np.linalg.norm(v)
        if s < 1e-14:
            break
        mu = np.cos(s) * mu + np.sin(s) * v / s
        mu /= np.linalg.norm(mu)
    return (np.mean([np.linalg.norm(x) for x in xs]) * mu).reshape(points[0].shape)


def _run(models, **params):
    params = {"max_iter": 10, "tol": 1e-5} | params
    ref = models[0]
    deltas = torch.stack([m - ref for m in models])  # no base: the first model is the reference
    ctx = MethodContext(has_base=False)
    return get_method("karcher").fn(ref.clone(), deltas, torch.ones(len(models)), **params, ctx=ctx)


@pytest.mark.parametrize("k", [2, 3, 4])
@pytest.mark.parametrize("shape", [(6, 5), (30,), (2, 3, 4)])
def test_matches_converged_descent(k, shape):
    g = torch.Generator().manual_seed(k)
    models = [torch.randn(shape, generator=g) for _ in range(k)]
    out = _run(models, max_iter=50, tol=1e-7)
    np.testing.assert_allclose(out, _expected(models), atol=2e-5)


def test_two_models_is_the_normalized_geodesic_midpoint():
    a, b = torch.tensor([3.0, 0.0]), torch.tensor([0.0, 1.0])
    out = _run([a, b])
    # Midpoint direction (1, 1)/sqrt(2), length = the mean norm (3 + 1)/2 = 2.
    torch.testing.assert_close(out, torch.tensor([2.0, 2.0]) / 2**0.5)


def test_identical_models_give_the_model_and_one_model_is_itself():
    g = torch.Generator().manual_seed(3)
    m = torch.randn(4, 6, generator=g)
    torch.testing.assert_close(_run([m, m.clone(), m.clone()]), m)
    torch.testing.assert_close(_run([m]), m)
    # Same direction, different norms: that direction at the mean norm.
    torch.testing.assert_close(_run([m, 3 * m]), 2 * m)


def test_zero_models():
    z = torch.zeros(3, 3)
    torch.testing.assert_close(_run([z, z.clone()]), z)
    m = torch.ones(3, 3)
    # A zero model has no direction; it still counts in the mean norm (as in MergeKit).
    torch.testing.assert_close(_run([m, z]), 0.5 * m)


def test_weights_are_ignored_and_a_base_is_one_more_point():
    g = torch.Generator().manual_seed(4)
    base, a, b = (torch.randn(5, 5, generator=g) for _ in range(3))
    # With a base_model the base is averaged in as one more equally weighted point (MergeKit 0.1.5).
    out = merge_state_dicts({"w": base}, [{"w": a}, {"w": b}], "karcher", weight=[0.9, 0.1])
    torch.testing.assert_close(out["w"], _run([a, b, base]))
    np.testing.assert_allclose(
        merge_state_dicts({"w": base}, [{"w": a}, {"w": b}], "karcher", max_iter=50, tol=1e-7)["w"],
        _expected([a, b, base]),
        atol=2e-5,
    )
    # Without one only the models are.
    expected = _run([a, b])
    torch.testing.assert_close(merge_state_dicts(None, [{"w": a}, {"w": b}], "karcher")["w"], expected)
    # The direct call's default context has a base: base + deltas and the base itself.
    direct = get_method("karcher").fn(base, torch.stack([a, b]) - base, torch.ones(2), max_iter=10, tol=1e-5)
    torch.testing.assert_close(direct, out["w"])


def test_params_and_errors():
    spec = get_method("karcher")
    assert spec.defaults() == {"weight": 1.0, "max_iter": 10, "tol": 1e-5} and not spec.needs_base
    models = [{"w": torch.ones(2)}, {"w": torch.zeros(2)}]
    for bad in ({"max_iter": -1}, {"max_iter": 2.5}, {"tol": -1e-3}):
        with pytest.raises(ParameterError, match=next(iter(bad))):
            merge_state_dicts(None, models, "karcher", **bad)
