"""The engine's CUDA path gives the CPU path's tensors (skipped where torch sees no CUDA GPU).

The reference is the CPU run of the same method on the same inputs: methods are written once for both devices,
so any difference comes from the device code path (transfers, generators, dtype casts, kernels).  CI has no GPU;
these run on a lent GPU machine (see docs/benchmarks.md).
"""

from __future__ import annotations

import pytest
import torch

from transfuse import merge_state_dicts
from transfuse.methods import available_methods

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

#: Parameters so every method does real work on the small tensors below.
PARAMS = {
    "slerp": {"t": 0.3},
    "ties": {"density": 0.4},
    "dare_linear": {"density": 0.5},
    "dare_ties": {"density": 0.5},
    "breadcrumbs": {"density": 0.6, "gamma": 0.05},
    "breadcrumbs_ties": {"density": 0.6, "gamma": 0.05},
    "della": {"density": 0.5, "epsilon": 0.1},
    "della_linear": {"density": 0.5, "epsilon": 0.1},
    "pcb": {"density": 0.3},
}


def _models(k: int) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    g = torch.Generator().manual_seed(0)
    shapes = {"embed.weight": (50, 16), "layers.0.attn.weight": (16, 16), "layers.0.mlp.weight": (32, 16)}
    shapes["layers.0.norm.weight"] = (16,)
    base = {n: torch.randn(s, generator=g) for n, s in shapes.items()}
    models = [{n: t + 0.05 * torch.randn(t.shape, generator=g) for n, t in base.items()} for _ in range(k)]
    return base, models


@pytest.mark.parametrize("spec", available_methods(), ids=lambda s: s.name)
def test_cuda_matches_cpu(spec):
    k = 1 if spec.max_models == 1 else max(spec.min_models, 3)
    if spec.max_models is not None:
        k = min(k, spec.max_models)
    base, models = _models(k)
    params = PARAMS.get(spec.name, {})
    cpu = merge_state_dicts(base, models, spec.name, device="cpu", **params)
    gpu = merge_state_dicts(base, models, spec.name, device="cuda", **params)
    assert set(gpu) == set(cpu)
    for name in cpu:
        assert gpu[name].device.type == "cpu" and gpu[name].dtype == cpu[name].dtype
        if spec.random:
            # CUDA's generator draws other masks than the CPU's from the same seed: only the shape of the result
            # can be compared here (the masks' statistics are tested on the CPU in tests/methods).
            assert torch.isfinite(gpu[name]).all() and gpu[name].shape == cpu[name].shape
        else:
            torch.testing.assert_close(gpu[name], cpu[name], rtol=1e-5, atol=1e-5, msg=f"{spec.name} {name}")


def test_cuda_random_methods_are_deterministic():
    base, models = _models(3)
    first = merge_state_dicts(base, models, "dare_ties", device="cuda", density=0.5, seed=7)
    again = merge_state_dicts(base, models, "dare_ties", device="cuda", density=0.5, seed=7)
    for name in first:
        assert torch.equal(first[name], again[name])
