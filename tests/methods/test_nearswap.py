"""nearswap: an entry-by-entry re-derivation, its limits in t, parameter errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from transfuse import merge_state_dicts
from transfuse.errors import ParameterError, RecipeError
from transfuse.methods import get_method


def _run(base, other, t):
    return get_method("nearswap").fn(base.clone(), (other - base).unsqueeze(0), torch.ones(1), t=t)


@pytest.mark.parametrize("t", [0.0, 1e-3, 0.05, 0.5, 10.0])
def test_matches_loop(t):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(8, 5, generator=g)
    other = base + 0.1 * torch.randn(8, 5, generator=g)
    expected = np.empty(40)
    for j, (a, b) in enumerate(zip(base.double().numpy().ravel(), other.double().numpy().ravel())):
        s = min(max(t / max(abs(a - b), 1e-6), 0.0), 1.0)
        expected[j] = s * b + (1 - s) * a
    np.testing.assert_allclose(_run(base, other, t), expected.reshape(8, 5), atol=1e-6)


def test_limits_in_t():
    g = torch.Generator().manual_seed(1)
    base = torch.randn(6, 6, generator=g)
    other = base + torch.randn(6, 6, generator=g)
    torch.testing.assert_close(_run(base, other, 0.0), base)
    torch.testing.assert_close(_run(base, other, 1e-9), base, atol=1e-7, rtol=0)
    torch.testing.assert_close(_run(base, other, 1e3), other)
    # Entries within t take the model's value; farther ones move exactly t toward it.
    out = _run(torch.zeros(3), torch.tensor([0.05, 1.0, -2.0]), 0.1)
    torch.testing.assert_close(out, torch.tensor([0.05, 0.1, -0.1]))


def test_params_and_errors():
    spec = get_method("nearswap")
    assert (
        spec.param("t").default is None and (spec.min_models, spec.max_models) == (1, 1) and spec.needs_base
    )
    sd, models = {"w": torch.zeros(2)}, [{"w": torch.ones(2)}]
    with pytest.raises(ParameterError, match="'t'"):
        merge_state_dicts(sd, models, "nearswap", t=-0.1)
    with pytest.raises(ParameterError, match="'t'"):
        merge_state_dicts(sd, models, "nearswap")  # t has no default, as in MergeKit
    with pytest.raises(RecipeError, match="at most 1"):
        merge_state_dicts(sd, models * 2, "nearswap", t=0.1)
    with pytest.raises(RecipeError, match="base_model"):
        merge_state_dicts(None, models, "nearswap", t=0.1)
