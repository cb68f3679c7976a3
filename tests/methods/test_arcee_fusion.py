"""arcee_fusion: a numpy re-derivation (softmax KL importance, sorted quantiles), properties, arity errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from transfuse import merge_state_dicts
from transfuse.errors import RecipeError
from transfuse.methods import get_method


def _softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _expected(base, other):
    b, o = base.double().numpy(), other.double().numpy()
    p, q = _softmax(o) + 1e-8, _softmax(b) + 1e-8
    scores = np.abs(o - b) * (p * np.log(p / q)).sum(axis=-1, keepdims=True)
    s = np.sort(scores.ravel())
    q1, med, q3 = (s[int(np.float32(f) * np.float32(s.size - 1))] for f in (0.25, 0.5, 0.75))
    return np.where(scores >= med + 1.5 * (q3 - q1), o, b)


def _run(base, other):
    return get_method("arcee_fusion").fn(base.clone(), (other - base).unsqueeze(0), torch.ones(1))


@pytest.mark.parametrize("shape", [(12, 10), (40,), (3, 5, 7), (1,)])
def test_matches_numpy(shape):
    g = torch.Generator().manual_seed(len(shape))
    base = torch.randn(shape, generator=g)
    other = base + 0.3 * torch.randn(shape, generator=g) * (torch.rand(shape, generator=g) < 0.3)
    np.testing.assert_allclose(_run(base, other), _expected(base, other), atol=1e-6)


def test_keeps_only_outlying_changes():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(64, 16, generator=g)
    other = base + 1e-3 * torch.randn(64, 16, generator=g)
    other[5, 3] += 4.0  # one large change in one row
    out = _run(base, other)
    assert out[5, 3] == other[5, 3]
    changed = out != base
    assert 0 < changed.sum() < 0.25 * out.numel()  # most small changes are dropped
    assert torch.equal(out[changed], other[changed])  # kept entries take the model's value exactly
    torch.testing.assert_close(_run(base, base.clone()), base)  # no change: the base


def test_arity_and_base():
    spec = get_method("arcee_fusion")
    assert spec.defaults() == {"weight": 1.0} and (spec.min_models, spec.max_models) == (1, 1)
    sd, models = {"w": torch.zeros(2, 2)}, [{"w": torch.ones(2, 2)}]
    with pytest.raises(RecipeError, match="at most 1"):
        merge_state_dicts(sd, models * 2, "arcee_fusion")
    with pytest.raises(RecipeError, match="base_model"):
        merge_state_dicts(None, models, "arcee_fusion")
