"""ram / ramplus_tl: an entry-by-entry loop re-derivation, known properties, parameter errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from transfuse import merge_state_dicts
from transfuse.errors import ParameterError, RecipeError
from transfuse.methods import get_method


def _data(k, shape=(7, 5), seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    deltas = torch.randn((k, *shape), generator=g) * (torch.rand((k, *shape), generator=g) < 0.5)
    return base, deltas


def _loop(base, deltas, epsilon, r=None, alpha=None):
    """RAM (r is None) or RAM+ entry by entry, float64."""
    b = base.double().numpy().ravel()
    d = deltas.double().numpy().reshape(deltas.shape[0], -1)
    k, n = d.shape
    changed = np.abs(d) > epsilon
    count = changed.sum(0)
    boost = np.ones(k)
    if r is not None:
        for i in range(k):
            shared = sum(1 for j in range(n) if changed[i, j] and count[j] > 1)
            unique = sum(1 for j in range(n) if changed[i, j] and count[j] == 1)
            boost[i] = 1 + r * min(max(shared / max(unique, epsilon), 0), alpha)
    out = b.copy()
    for j in range(n):
        for i in range(k):
            if changed[i, j]:
                out[j] += d[i, j] * (boost[i] if count[j] == 1 else 1 / count[j])
    return out.reshape(base.shape)


def _run(name, base, deltas, **params):
    return get_method(name).fn(base.clone(), deltas.clone(), torch.ones(deltas.shape[0]), **params)


@pytest.mark.parametrize("k", [1, 2, 3, 4])
@pytest.mark.parametrize("epsilon", [1e-5, 0.3])
def test_ram_matches_loop(k, epsilon):
    base, deltas = _data(k, seed=k)
    np.testing.assert_allclose(
        _run("ram", base, deltas, epsilon=epsilon), _loop(base, deltas, epsilon), atol=1e-6
    )


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("r,alpha", [(0.1, 0.2), (0.7, 5.0), (0.0, 1.0)])
def test_ramplus_matches_loop(k, r, alpha):
    base, deltas = _data(k, seed=10 + k)
    out = _run("ramplus_tl", base, deltas, r=r, alpha=alpha, epsilon=1e-5)
    np.testing.assert_allclose(out, _loop(base, deltas, 1e-5, r, alpha), atol=1e-6)


def test_disjoint_changes_are_kept_whole_and_shared_ones_averaged():
    base = torch.zeros(4)
    deltas = torch.tensor([[1.0, 0.0, 2.0, 0.0], [0.0, 3.0, 4.0, 0.0]])
    torch.testing.assert_close(_run("ram", base, deltas, epsilon=1e-5), torch.tensor([1.0, 3.0, 3.0, 0.0]))
    # RAM+: each model has 1 shared and 1 unique entry: rho = 1, clipped to alpha = 0.2, lambda = 1.02.
    out = _run("ramplus_tl", base, deltas, r=0.1, alpha=0.2, epsilon=1e-5)
    torch.testing.assert_close(out, torch.tensor([1.02, 3.06, 3.0, 0.0]))


def test_one_model_is_that_model_and_r_zero_is_ram():
    base, deltas = _data(1)
    torch.testing.assert_close(_run("ram", base, deltas, epsilon=0.0), base + deltas[0])
    base, deltas = _data(3)
    torch.testing.assert_close(
        _run("ramplus_tl", base, deltas, r=0.0, alpha=0.2, epsilon=1e-5),
        _run("ram", base, deltas, epsilon=1e-5),
    )


def test_params_and_errors():
    assert get_method("ram").defaults() == {"weight": 1.0, "epsilon": 1e-5}
    assert get_method("ramplus_tl").defaults() == {"weight": 1.0, "r": 0.1, "alpha": 0.2, "epsilon": 1e-5}
    assert get_method("ram").needs_base and get_method("ramplus_tl").mergekit_name == "ramplus_tl"
    sd = {"w": torch.zeros(2, 2)}
    models = [{"w": torch.ones(2, 2)}, {"w": torch.ones(2, 2)}]
    for method, bad in (
        ("ram", {"epsilon": -1e-3}),
        ("ramplus_tl", {"r": -0.1}),
        ("ramplus_tl", {"alpha": -1}),
    ):
        with pytest.raises(ParameterError, match=next(iter(bad))):
            merge_state_dicts(sd, models, method, **bad)
    with pytest.raises(RecipeError, match="base_model"):
        merge_state_dicts(None, models, "ram")
