"""linear and task_arithmetic against closed forms computed in float64 numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from transfuse.errors import ParameterError
from transfuse.methods import MethodContext, get_method


def run(name, base, deltas, weights, **overrides):
    """Call a registered method with its defaults, ``overrides`` replacing some (per-model ones as lists)."""
    spec = get_method(name)
    kwargs = {}
    for p in spec.params:
        if p.inert:
            continue
        value = overrides.pop(p.name, p.default)
        if p.per_model:
            value = torch.tensor(value if isinstance(value, list) else [value] * deltas.shape[0])
        kwargs["lambda_" if p.name == "lambda" else p.name] = value
    assert not overrides, overrides
    if spec.takes_context:
        kwargs["ctx"] = MethodContext()
    return spec.fn(base.clone(), deltas.clone(), torch.tensor(weights, dtype=torch.float32), **kwargs)


def inputs(shape, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn((k, *shape), generator=g)


@pytest.mark.parametrize("shape", [(5, 7), (1,), (3, 2, 4), ()])
@pytest.mark.parametrize("weights", [[1.0], [0.5, 2.0], [1.0, -0.25, 0.75]])
@pytest.mark.parametrize("normalize", [True, False])
def test_linear_is_weighted_average(shape, weights, normalize):
    base, deltas = inputs(shape, len(weights))
    b, d, w = base.double().numpy(), deltas.double().numpy(), np.array(weights)
    models = [b + d[i] for i in range(len(w))]
    expected = sum(w[i] * models[i] for i in range(len(w)))
    if normalize:
        expected = expected / w.sum()
    out = run("linear", base, deltas, weights, normalize=normalize)
    assert out.shape == base.shape and out.dtype == torch.float32
    np.testing.assert_allclose(out.double().numpy(), expected, rtol=1e-5, atol=1e-5)


def test_linear_does_not_depend_on_base():
    # the engine may pass any tensor as base for a method with needs_base=False
    _, models = inputs((6, 4), 3)
    w = [0.2, 0.3, 0.5]
    with_zero = run("linear", torch.zeros(6, 4), models, w)
    with_first = run("linear", models[0], models - models[0], w)
    torch.testing.assert_close(with_zero, with_first, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(with_zero, (0.2 * models[0] + 0.3 * models[1] + 0.5 * models[2]))


def test_linear_one_model_returns_it():
    base, deltas = inputs((4, 4), 1)
    torch.testing.assert_close(run("linear", base, deltas, [3.0]), base + deltas[0], rtol=1e-6, atol=1e-6)


def test_linear_zero_weight_sum():
    base, deltas = inputs((3,), 2)
    with pytest.raises(ParameterError, match="sum to 0"):
        run("linear", base, deltas, [1.0, -1.0])
    out = run("linear", base, deltas, [1.0, -1.0], normalize=False)
    torch.testing.assert_close(out, deltas[0] - deltas[1], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape", [(5, 7), (1,), (2, 3, 4)])
@pytest.mark.parametrize("weights", [[1.0], [0.5, 2.0], [1.0, -0.25, 0.75], [1.0, -1.0]])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("lam", [1.0, 0.4, -1.5])
def test_task_arithmetic_closed_form(shape, weights, normalize, lam):
    base, deltas = inputs(shape, len(weights), seed=3)
    b, d, w = base.double().numpy(), deltas.double().numpy(), np.array(weights)
    mixed = sum(w[i] * d[i] for i in range(len(w)))
    if normalize:
        total = w.sum()
        mixed = mixed / (total if abs(total) >= 1e-8 else 1.0)  # MergeKit: |sum| < 1e-8 divides by 1
    expected = b + lam * mixed
    out = run("task_arithmetic", base, deltas, weights, normalize=normalize, **{"lambda": lam})
    np.testing.assert_allclose(out.double().numpy(), expected, rtol=1e-5, atol=1e-5)


def test_task_arithmetic_all_zero_deltas_and_base_untouched():
    base = torch.randn(8, 3)
    keep = base.clone()
    out = run("task_arithmetic", base, torch.zeros(2, 8, 3), [1.0, 1.0])
    assert torch.equal(out, base) and torch.equal(base, keep)
    spec = get_method("task_arithmetic")
    deltas = torch.randn(2, 8, 3)
    spec.fn(base, deltas, torch.ones(2), normalize=False, lambda_=1.0, ctx=MethodContext())
    assert torch.equal(base, keep)  # the contract: base is read-only


def test_task_arithmetic_non_contiguous_deltas():
    base = torch.randn(4, 6)
    deltas = torch.randn(2, 6, 4).transpose(1, 2)
    out = get_method("task_arithmetic").fn(
        base, deltas, torch.tensor([1.0, 2.0]), normalize=False, lambda_=1.0, ctx=MethodContext()
    )
    torch.testing.assert_close(out, base + deltas[0] + 2 * deltas[1])


def test_registration():
    linear = get_method("linear")
    assert (
        linear.mergekit_name == "linear" and not linear.needs_base and linear.defaults()["normalize"] is True
    )
    ta = get_method("task_arithmetic")
    assert ta.mergekit_name == "task_arithmetic" and ta.needs_base
    assert ta.defaults() == {"weight": 1.0, "normalize": False, "lambda": 1.0, "int8_mask": False}
    assert "Ilharco" in ta.paper and "2212.04089" in ta.paper
    with pytest.raises(ParameterError):
        ta.param("normalize").validate("maybe")
    with pytest.raises(ParameterError):
        ta.param("lambda").validate(float("nan"))
