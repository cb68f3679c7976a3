"""sce: a numpy re-derivation, the select step's tie rule, known properties, parameter errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from transfuse import merge_state_dicts
from transfuse.errors import ParameterError, RecipeError
from transfuse.methods import get_method
from transfuse.methods.sce import top_variance_mask


def _expected(base, deltas, topk):
    """SCE in float64 numpy: select by variance (stable sort: ties keep the lowest index), weigh, erase."""
    b = base.double().numpy().ravel()
    d = deltas.double().numpy().reshape(deltas.shape[0], -1).copy()
    k = d.shape[0]
    if topk < 1:
        var = d.var(axis=0)
        keep = int(np.float32(np.count_nonzero(var)) * np.float32(topk)) if topk > 0 else 0
        mask = np.zeros(var.shape, bool)
        mask[np.argsort(-var, kind="stable")[:keep]] = True
        d = d * mask
    energy = (d**2).mean(axis=1)
    eta = np.full(k, 1 / k) if abs(energy.sum()) < 1e-6 else energy / energy.sum()
    elected = np.where(d.sum(0) >= 0, 1.0, -1.0)
    weights = eta[:, None] * (np.sign(d) == elected)
    return (b + (d * weights).sum(0) / np.maximum(weights.sum(0), 1e-6)).reshape(base.shape)


def _run(base, deltas, **params):
    return get_method("sce").fn(base.clone(), deltas.clone(), torch.ones(deltas.shape[0]), **params)


@pytest.mark.parametrize("k", [1, 2, 3, 5])
@pytest.mark.parametrize("topk", [1.0, 0.6, 0.25, 0.0])
def test_matches_numpy(k, topk):
    g = torch.Generator().manual_seed(k)
    base, deltas = torch.randn(9, 7, generator=g), torch.randn(k, 9, 7, generator=g)
    np.testing.assert_allclose(_run(base, deltas, select_topk=topk), _expected(base, deltas, topk), atol=1e-6)


def test_variance_ties_keep_the_lowest_indices():
    # Entries 1, 2 and 4 share the largest variance; k = int(5 * 0.4) = 2 keeps entries 1 and 2.
    deltas = torch.tensor([[0.0, 1.0, 1.0, 0.5, 1.0, 0.2], [0.0, -1.0, -1.0, 0.0, -1.0, 0.0]])
    mask = top_variance_mask(deltas, 0.4)
    assert mask.tolist() == [False, True, True, False, False, False]


def test_one_model_and_agreeing_models():
    g = torch.Generator().manual_seed(0)
    base, d = torch.randn(5, 4, generator=g), torch.randn(1, 5, 4, generator=g)
    torch.testing.assert_close(_run(base, d, select_topk=1.0), base + d[0])
    # Two models with the same task vector (no variance, same signs): the result is that model.
    torch.testing.assert_close(_run(base, torch.cat([d, d]), select_topk=1.0), base + d[0])
    # Opposite signs: the model with the larger energy wins the sign election and keeps its entry.
    out = _run(torch.zeros(1), torch.tensor([[2.0], [-1.0]]), select_topk=1.0)
    torch.testing.assert_close(out, torch.tensor([2.0]))


def test_params_and_errors():
    spec = get_method("sce")
    assert spec.defaults() == {"weight": 1.0, "select_topk": 1.0, "int8_mask": False}
    assert spec.param("int8_mask").inert and spec.needs_base and "2408.07990" in spec.paper
    sd, models = {"w": torch.zeros(3, 3)}, [{"w": torch.ones(3, 3)}, {"w": -torch.ones(3, 3)}]
    for bad in (-0.1, 1.5):
        with pytest.raises(ParameterError, match="select_topk"):
            merge_state_dicts(sd, models, "sce", select_topk=bad)
    with pytest.raises(RecipeError, match="base_model"):
        merge_state_dicts(None, models, "sce")
    out = merge_state_dicts(sd, models, "sce", int8_mask=True, select_topk=0.5)
    torch.testing.assert_close(out["w"], merge_state_dicts(sd, models, "sce", select_topk=0.5)["w"])
