"""Parity with MergeKit 0.1.5's own task-arithmetic-family kernels on float32 tensors.

MergeKit gets the fine-tuned tensors; transfuse gets ``base`` and ``deltas = fine-tuned - base`` as its
engine builds them.  Deterministic methods must agree to 1e-6.  For the random ones MergeKit draws from the
global generator with ``torch.bernoulli``; seeding it like transfuse's generator gives the very same masks,
so they are compared to 1e-6 too, and their mask statistics and rescale rule are checked on their own.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("mergekit")

from mergekit.merge_methods import registry  # noqa: E402
from mergekit.merge_methods.base import TensorGroup  # noqa: E402

from transfuse.methods import MethodContext, get_method  # noqa: E402

TOL = 1e-6
SHAPES = [(48, 32), (300,), (1,), (3, 4, 5), (1, 9), (90, 70)]  # the last spans several chunks (fixture)


def _inputs(shape, k, seed):
    g = torch.Generator().manual_seed(seed)
    base = 0.05 * torch.randn(shape, generator=g)
    fts = [base + 0.02 * torch.randn(shape, generator=g) for _ in range(k)]
    return base, fts


def _ours(name, base, fts, generator=None, **params):
    spec = get_method(name)
    k = len(fts)
    kwargs = {}
    for p in spec.params:
        if p.inert:
            continue
        value = params.get(p.name, p.default)
        if p.per_model:
            value = torch.tensor(value if isinstance(value, list) else [value] * k, dtype=torch.float32)
        kwargs["lambda_" if p.name == "lambda" else p.name] = value
    if spec.takes_context:
        kwargs["ctx"] = MethodContext(generator=generator)
    weights = torch.tensor(params.get("weight", [1.0] * k), dtype=torch.float32)
    return spec.fn(base.clone(), torch.stack(fts) - base, weights, **kwargs)


def _mergekit(name, base, fts, **params):
    method = registry.get(name)
    if name == "linear":  # no base: the models themselves
        group = TensorGroup.from_tensors(fts)
    else:
        group = TensorGroup.from_tensors([base, *fts], base_index=0)
    return method([group], parameters=params)[0]


W3 = [0.7, -0.3, 1.2]
DETERMINISTIC = [
    ("linear", {"weight": W3}),
    ("linear", {"weight": W3, "normalize": False}),
    ("linear", {"weight": [1.0, 1.0]}),
    ("task_arithmetic", {"weight": W3}),
    ("task_arithmetic", {"weight": W3, "normalize": True, "lambda": 0.6}),
    ("task_arithmetic", {"weight": [1.0, -1.0], "normalize": True}),  # weights sum to 0: divide by 1
    ("ties", {"weight": W3, "density": [0.3, 0.7, 0.5]}),
    ("ties", {"weight": W3, "density": [0.3, 0.7, 0.5], "normalize": False, "rescale": True, "lambda": 1.3}),
    ("ties", {"weight": [1.0, 1.0], "density": [1.0, 0.01]}),
    ("ties", {"weight": [0.5, 0.5], "density": [0.0, 0.2]}),
    ("breadcrumbs", {"weight": W3, "density": [0.3, 0.9, 0.5], "gamma": [0.01, 0.2, 0.05]}),
    ("breadcrumbs", {"weight": W3, "density": [0.8, 0.5, 1.0], "gamma": [0.3, 0.5, 0.1], "rescale": True}),
    ("breadcrumbs_ties", {"weight": W3, "density": [0.3, 0.9, 0.5], "gamma": [0.01, 0.2, 0.05]}),
    ("breadcrumbs_ties", {"weight": W3, "density": 0.4, "gamma": 0.02, "normalize": True, "lambda": 0.8}),
]


@pytest.fixture
def small_chunks(monkeypatch):
    """Run transfuse's sampled multi-chunk threshold path on a 6300-entry tensor."""
    import transfuse.chunks as chunks
    import transfuse.methods._thresholds as thresholds

    monkeypatch.setattr(chunks, "CHUNK", 1024)
    monkeypatch.setattr(thresholds, "_SAMPLE", 256)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name,params", DETERMINISTIC)
def test_deterministic_parity(shape, name, params, request):
    if shape == (90, 70):
        request.getfixturevalue("small_chunks")
    k = len(params["weight"])
    base, fts = _inputs(shape, k, seed=len(shape) + k)
    ours = _ours(name, base, fts, **params)
    theirs = _mergekit(name, base, fts, **params)
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max().item() <= TOL


@pytest.mark.parametrize("name", ["ties", "breadcrumbs_ties"])
def test_parity_real_chunks(name):
    # 560k entries: more than one real chunk, so the sampled threshold path runs unpatched
    base, fts = _inputs((800, 700), 2, seed=0)
    params = {"weight": [1.0, 0.5], "density": [0.2, 0.6]}
    assert (_ours(name, base, fts, **params) - _mergekit(name, base, fts, **params)).abs().max().item() <= TOL


@pytest.mark.parametrize("density,n", [(0.7, 10), (0.29, 100), (0.57, 100), (0.3, 7)])
def test_kept_count_parity(density, n):
    base, fts = _inputs((n,), 1, seed=n)
    for name in ("ties", "breadcrumbs"):
        params = {"weight": [1.0], "density": density, "normalize": False}
        ours = _ours(name, base, fts, **params) - base
        theirs = _mergekit(name, base, fts, **params) - base
        assert int(torch.count_nonzero(ours)) == int(torch.count_nonzero(theirs))


RANDOM = [
    ("dare_linear", {"weight": W3, "density": [0.3, 0.7, 0.5]}),
    ("dare_linear", {"weight": W3, "density": 0.5, "rescale": False, "normalize": True}),
    ("dare_ties", {"weight": W3, "density": [0.3, 0.7, 0.5]}),
    ("dare_ties", {"weight": W3, "density": [0.3, 1.0, 0.0], "normalize": True, "lambda": 0.5}),
    ("della", {"weight": W3, "density": [0.3, 0.7, 0.5], "epsilon": [0.1, 0.2, 0.05]}),
    ("della_linear", {"weight": W3, "density": [0.3, 0.7, 0.5], "epsilon": [0.1, 0.2, 0.05]}),
    ("della", {"weight": W3, "density": 0.5, "rescale": False, "normalize": False}),
]


@pytest.mark.parametrize("shape", [s for s in SHAPES if s not in ((1,), (700, 600))])
@pytest.mark.parametrize("name,params", RANDOM)
def test_random_parity_same_seed(shape, name, params):
    base, fts = _inputs(shape, 3, seed=len(shape))
    ours = _ours(name, base, fts, generator=torch.Generator().manual_seed(11), **params)
    torch.manual_seed(11)  # MergeKit draws from the global generator
    theirs = _mergekit(name, base, fts, **params)
    assert (ours - theirs).abs().max().item() <= TOL


@pytest.mark.parametrize("name", ["dare_linear", "della_linear"])
def test_random_distribution(name):
    # independent of generator streams: kept fraction and the L1 rescale rule, both sides
    shape = (400, 250)
    base, fts = _inputs(shape, 1, seed=0)
    delta = fts[0] - base
    params = {"weight": [1.0], "density": 0.3}
    if name == "della_linear":
        params["epsilon"] = 0.1
    ours = _ours(name, base, fts, generator=torch.Generator().manual_seed(1), **params) - base
    torch.manual_seed(2)
    theirs = _mergekit(name, base, fts, **params) - base
    for result in (ours, theirs):
        kept = result != 0
        assert abs(kept.float().mean().item() - 0.3) < 0.01
        assert abs(result.abs().sum().item() / delta.abs().sum().item() - 1) < 1e-4  # L1 norm preserved
        factor = delta.abs().sum() / delta[kept].abs().sum()  # one factor for the whole tensor
        torch.testing.assert_close(result[kept], delta[kept] * factor, rtol=1e-4, atol=1e-6)


def test_della_single_entry_rows():
    base, fts = _inputs((6, 1), 2, seed=0)
    params = {"weight": [1.0, 1.0], "density": 0.5, "epsilon": 0.1}
    with pytest.raises(RuntimeError):  # MergeKit 0.1.5: 0/0 rank normalisation -> bernoulli(NaN)
        torch.manual_seed(0)
        _mergekit("della", base, fts, **params)
    out = _ours("della", base, fts, generator=torch.Generator().manual_seed(0), **params)
    assert torch.isfinite(out).all()


def test_names_match_mergekit():
    for name in (
        "linear",
        "task_arithmetic",
        "ties",
        "dare_linear",
        "dare_ties",
        "breadcrumbs",
        "breadcrumbs_ties",
        "della",
        "della_linear",
    ):
        assert get_method(name).mergekit_name == name
        registry.get(name)  # exists there
