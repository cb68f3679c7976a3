"""Function-level parity with MergeKit 0.1.5's model_stock and slerp kernels on float32 tensors.

MergeKit gets the fine-tuned tensors; transfuse gets ``base`` and ``deltas = fine-tuned - base`` as its engine
builds them.  Both must agree to 1e-6.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("mergekit")

from mergekit.merge_methods.base import TensorGroup  # noqa: E402
from mergekit.merge_methods.model_stock import model_stock_merge_method  # noqa: E402
from mergekit.merge_methods.slerp import slerp_merge_method  # noqa: E402

from transfuse.methods import get_method  # noqa: E402

TOL = 1e-6
SHAPES = [(48, 32), (32, 48), (64,), (1,), (1, 1), (4, 3, 5), (1, 9)]


def _inputs(shape, k, seed):
    g = torch.Generator().manual_seed(seed)
    base = 0.05 * torch.randn(shape, generator=g)
    shared = torch.randn(shape, generator=g)
    fts = [base + 0.02 * (shared + torch.randn(shape, generator=g)) for _ in range(k)]
    return base, fts


def _deltas(base, fts):
    return torch.stack(fts) - base  # float32, like the engine


def _mergekit(method, base, fts, **parameters):
    group = TensorGroup.from_tensors([base, *fts], base_index=0)
    return method([group], parameters=parameters)[0]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("k", [2, 3, 4])
@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock(shape, k, filter_wise):
    base, fts = _inputs(shape, k, seed=k + 10 * len(shape))
    expected = _mergekit(model_stock_merge_method, base, fts, filter_wise=filter_wise)
    out = get_method("model_stock").fn(
        base.clone(), _deltas(base, fts), torch.ones(k), filter_wise=filter_wise
    )
    assert out.shape == expected.shape
    assert (out - expected).abs().max().item() <= TOL


def test_model_stock_singular_and_zero_cases():
    base = 0.1 * torch.randn(6, 5)
    d = 0.02 * torch.randn(6, 5)
    for fts in ([base + d, base - d], [base.clone(), base.clone()], [base + d, base + d, base - 2 * d]):
        for filter_wise in (False, True):
            expected = _mergekit(model_stock_merge_method, base, fts, filter_wise=filter_wise)
            out = get_method("model_stock").fn(
                base.clone(), _deltas(base, fts), torch.ones(len(fts)), filter_wise=filter_wise
            )
            assert (out - expected).abs().max().item() <= TOL


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("t", [0.0, 0.25, 0.5, 0.9, 1.0, 1.4])
def test_slerp(shape, t):
    base, (ft,) = _inputs(shape, 1, seed=len(shape))
    expected = _mergekit(slerp_merge_method, base, [ft], t=t)
    out = get_method("slerp").fn(base.clone(), _deltas(base, [ft]), torch.ones(1), t=t)
    assert (out - expected).abs().max().item() <= TOL


@pytest.mark.parametrize(
    "other",
    [
        lambda b: 2.0 * b,  # colinear: lerp fallback
        lambda b: -b,  # antipodal: lerp fallback
        lambda b: b + 1e-3 * torch.ones_like(b),  # nearly colinear
        lambda b: torch.zeros_like(b),  # zero norm
        lambda b: torch.flip(b, dims=[0]),  # a general angle
    ],
)
def test_slerp_edge_cases(other):
    base = 0.1 * torch.randn(7, 3) + 0.05
    ft = other(base)
    for t in (0.2, 0.7):
        expected = _mergekit(slerp_merge_method, base, [ft], t=t)
        out = get_method("slerp").fn(base.clone(), _deltas(base, [ft]), torch.ones(1), t=t)
        assert (out - expected).abs().max().item() <= TOL
    # And with a zero base.
    zero = torch.zeros(7, 3)
    expected = _mergekit(slerp_merge_method, zero, [ft], t=0.3)
    out = get_method("slerp").fn(zero.clone(), _deltas(zero, [ft]), torch.ones(1), t=0.3)
    assert (out - expected).abs().max().item() <= TOL
