"""magmax against a per-entry Python loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import transfuse.chunks as chunks
from transfuse.methods import MethodContext, get_method


def run(base, deltas, weights, lam=1.0):
    fn = get_method("magmax").fn
    return fn(
        base.clone(),
        deltas.clone(),
        torch.tensor(weights, dtype=torch.float32),
        lambda_=lam,
        ctx=MethodContext(),
    )


def ref_magmax(base, deltas, weights, lam=1.0):
    b = base.double().numpy().ravel()
    d = deltas.double().numpy().reshape(len(weights), -1)
    out = b.copy()
    for j in range(b.size):
        best, value = -1.0, 0.0
        for i, w in enumerate(weights):
            candidate = w * d[i, j]
            if abs(candidate) > best:  # strict: an equal magnitude keeps the earlier model
                best, value = abs(candidate), candidate
        out[j] += lam * value
    return out.reshape(base.shape)


@pytest.mark.parametrize("shape", [(6, 7), (1,), (2, 3, 4)])
@pytest.mark.parametrize("weights", [[1.0], [1.0, 1.0], [0.5, -2.0, 1.0], [0.0, 1.0]])
@pytest.mark.parametrize("lam", [1.0, 0.5])
def test_matches_reference(shape, weights, lam):
    g = torch.Generator().manual_seed(len(weights))
    base = torch.randn(shape, generator=g)
    deltas = torch.randint(-4, 5, (len(weights), *shape), generator=g).float() / 4  # plenty of ties
    np.testing.assert_allclose(
        run(base, deltas, weights, lam).double().numpy(), ref_magmax(base, deltas, weights, lam), atol=1e-6
    )


def test_picks_largest_magnitude_keeping_sign():
    deltas = torch.tensor([[1.0, -3.0, 2.0], [-2.0, 1.0, 2.0]])
    out = run(torch.zeros(3), deltas, [1.0, 1.0])
    assert out.tolist() == [-2.0, -3.0, 2.0]
    assert run(torch.zeros(3), deltas, [1.0, 0.0]).tolist() == [1.0, -3.0, 2.0]  # weight 0 never wins
    assert run(torch.zeros(3), deltas, [1.0, -1.0]).tolist() == [2.0, -3.0, 2.0]  # ties: lowest index


def test_multi_chunk_and_zero(monkeypatch):
    monkeypatch.setattr(chunks, "CHUNK", 100)
    g = torch.Generator().manual_seed(0)
    base, deltas = torch.randn(37, 11, generator=g), torch.randn(3, 37, 11, generator=g)
    np.testing.assert_allclose(
        run(base, deltas, [1.0, 0.5, 2.0]).numpy(), ref_magmax(base, deltas, [1.0, 0.5, 2.0]), atol=1e-6
    )
    assert torch.equal(run(base, torch.zeros(2, 37, 11), [1.0, 1.0]), base)


def test_registration():
    spec = get_method("magmax")
    assert (
        spec.mergekit_name is None
        and "2407.06322" in spec.paper
        and spec.defaults() == {"weight": 1.0, "lambda": 1.0}
    )
