"""TIES (and the exact top-k it relies on) against a plain numpy re-derivation.

Test data are multiples of 1/8 with dyadic weights, so every sum is exact in float32 and float64 alike and
the reference's sign election can never disagree with the method's by rounding; they also tie a lot.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import transfuse.chunks as chunks
import transfuse.methods._thresholds as thresholds
from transfuse.errors import ParameterError
from transfuse.methods import MethodContext, get_method


def run(name, base, deltas, weights, **overrides):
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


def quantised(shape, k, seed, levels=6):
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(-8, 9, shape, generator=g).float() / 8
    deltas = torch.randint(-levels, levels + 1, (k, *shape), generator=g).float() / 8
    return base, deltas


# ---- independent reference ------------------------------------------------------------------------------


def ref_kept(density: float, n: int) -> int:
    if density >= 1:
        return n
    if density <= 0:
        return 0
    return max(1, int(density * n))


def ref_top_k(x: np.ndarray, k: int) -> np.ndarray:
    """Keep the k largest |x|; among equal magnitudes the lower flat index first."""
    flat = x.ravel()
    order = sorted(range(flat.size), key=lambda i: (-abs(flat[i]), i))
    out = np.zeros_like(flat)
    for i in order[:k]:
        out[i] = flat[i]
    return out.reshape(x.shape)


def ref_l1_rescale(orig: np.ndarray, kept: np.ndarray) -> np.ndarray:
    before, after = np.abs(orig).sum(), np.abs(kept).sum()
    if before < 1e-7 or after < 1e-7:
        return kept
    return kept * (before / after)


def ref_consensus(base, trimmed, weights, normalize, lam, election="weighted"):
    k = len(weights)
    weighted = [weights[i] * trimmed[i] for i in range(k)]
    if election == "weighted":
        total = sum(weighted)
        plus = total >= 0
        voters = weighted
    else:
        total = sum(trimmed)
        majority_plus = (total > 0).sum() >= (total < 0).sum()
        plus = (total > 0) | ((total == 0) & majority_plus)
        voters = trimmed
    mixed = np.zeros_like(base)
    divisor = np.zeros_like(base)
    for i in range(k):
        agree = np.where(plus, voters[i] > 0, voters[i] < 0)
        mixed += np.where(agree, weighted[i], 0.0)
        divisor += np.where(agree, weights[i], 0.0)
    if normalize:
        divisor[divisor == 0] = 1
        mixed = mixed / divisor
    return base + lam * mixed


def ref_ties(base, deltas, weights, densities, normalize=True, rescale=False, lam=1.0, election="weighted"):
    base = base.double().numpy()
    trimmed = []
    for i, d in enumerate(deltas.double().numpy()):
        t = ref_top_k(d, ref_kept(densities[i], d.size))
        trimmed.append(ref_l1_rescale(d, t) if rescale and densities[i] < 1 else t)
    return ref_consensus(base, trimmed, weights, normalize, lam, election)


# ---- TIES -----------------------------------------------------------------------------------------------

CASES = [
    # shape, weights, densities
    ((6, 5), [1.0, 1.0], [0.5, 0.5]),
    ((6, 5), [0.5, 2.0, -1.0], [0.2, 0.7, 0.4]),
    ((17,), [1.0, -0.5], [0.3, 1.0]),
    ((3, 4, 2), [2.0, 0.25, 1.0], [0.1, 0.0, 0.9]),
    ((1,), [1.0, 1.0], [0.5, 0.01]),
    ((1, 1), [-1.0, 0.5], [1.0, 0.3]),
    ((9, 9), [1.0], [0.35]),
]


@pytest.mark.parametrize("shape,weights,densities", CASES)
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("lam", [1.0, 0.5])
def test_ties_matches_reference(shape, weights, densities, normalize, lam):
    base, deltas = quantised(shape, len(weights), seed=len(shape) * 7 + len(weights))
    out = run("ties", base, deltas, weights, density=densities, normalize=normalize, **{"lambda": lam})
    expected = ref_ties(base, deltas, weights, densities, normalize=normalize, lam=lam)
    np.testing.assert_allclose(out.double().numpy(), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("shape,weights,densities", CASES)
def test_ties_unweighted_sign_election(shape, weights, densities):
    base, deltas = quantised(shape, len(weights), seed=11)
    out = run("ties", base, deltas, weights, density=densities, sign_election="unweighted")
    expected = ref_ties(base, deltas, weights, densities, election="unweighted")
    np.testing.assert_allclose(out.double().numpy(), expected, rtol=0, atol=1e-6)


def test_unweighted_election_differs_from_weighted():
    # one entry: +1 with weight 3 against -1 and -1 with weight 1: weighted sum +1, unweighted -1
    base = torch.zeros(1)
    deltas = torch.tensor([[1.0], [-1.0], [-1.0]])
    weighted = run("ties", base, deltas, [3.0, 1.0, 1.0], normalize=False)
    unweighted = run("ties", base, deltas, [3.0, 1.0, 1.0], normalize=False, sign_election="unweighted")
    assert weighted.item() == 3.0 and unweighted.item() == -2.0


@pytest.mark.parametrize("shape,weights,densities", CASES[:4])
def test_ties_rescale(shape, weights, densities):
    g = torch.Generator().manual_seed(5)
    base, deltas = torch.randn(shape, generator=g), torch.randn((len(weights), *shape), generator=g)
    out = run("ties", base, deltas, weights, density=densities, rescale=True)
    expected = ref_ties(base, deltas, weights, densities, rescale=True)
    np.testing.assert_allclose(out.double().numpy(), expected, rtol=1e-5, atol=1e-5)


def test_sign_tie_elects_plus_and_divisor_zero():
    base = torch.tensor([10.0, 10.0, 10.0])
    deltas = torch.tensor([[1.0, 0.0, -2.0], [-1.0, 0.0, 2.0]])  # sums 0, 0, 0 -> + elected everywhere
    out = run("ties", base, deltas, [1.0, 1.0])
    # entry 0: only +1 agrees (divisor 1); entry 1: nothing agrees, divisor 0 -> 1; entry 2: +2 agrees
    assert out.tolist() == [11.0, 10.0, 12.0]


def test_density_edges_and_all_zero():
    base, deltas = quantised((4, 5), 2, seed=2)
    torch.testing.assert_close(run("ties", base, deltas, [1.0, 1.0], density=0.0), base)
    dense = run("ties", base, deltas, [1.0, 1.0], density=1.0)
    np.testing.assert_array_equal(dense.numpy(), ref_ties(base, deltas, [1.0, 1.0], [1.0, 1.0]))
    zero = run("ties", base, torch.zeros(2, 4, 5), [1.0, 1.0], density=0.5, rescale=True)
    assert torch.equal(zero, base)


def test_one_element_keeps_it_at_any_positive_density():
    out = run("ties", torch.zeros(1), torch.tensor([[0.75]]), [1.0], density=0.01)
    assert out.item() == 0.75  # k = max(1, int(0.01 * 1)) = 1


@pytest.mark.parametrize("density,n,kept", [(0.7, 10, 7), (0.3, 10, 3), (0.29, 100, 28), (0.57, 100, 56)])
def test_kept_count_uses_the_recipe_decimal(density, n, kept):
    # float32(0.7) * 10 = 6.9999998: the method must recover the decimal 0.7 as MergeKit's Python float has it;
    # and like MergeKit it truncates the double product: 0.29 * 100 = 28.999999999999996 keeps 28
    deltas = torch.arange(1, n + 1, dtype=torch.float32).reshape(1, n)
    out = run("ties", torch.zeros(n), deltas, [1.0], density=density, normalize=False)
    assert int(torch.count_nonzero(out)) == kept == ref_kept(density, n)


def test_magnitude_ties_keep_lowest_index():
    deltas = torch.tensor([[1.0, -2.0, 2.0, 1.0, -2.0, 0.5]])
    out = run("ties", torch.zeros(6), deltas, [1.0], density=0.34, normalize=False)  # k = 2
    assert out.tolist() == [0.0, -2.0, 2.0, 0.0, 0.0, 0.0]


# ---- the exact threshold on the multi-chunk path ---------------------------------------------------------


@pytest.fixture
def small_chunks(monkeypatch):
    """Make the sampled multi-chunk path run on small tensors."""
    monkeypatch.setattr(chunks, "CHUNK", 1024)
    monkeypatch.setattr(thresholds, "_SAMPLE", 256)


def _data(kind, n, seed):
    g = torch.Generator().manual_seed(seed)
    if kind == "continuous":
        return torch.randn(n, generator=g)
    if kind == "ties":
        return torch.randint(-5, 6, (n,), generator=g).float() / 4
    if kind == "zeros":
        return torch.randn(n, generator=g) * (torch.rand(n, generator=g) < 0.2)
    return torch.zeros(n)


@pytest.mark.parametrize("kind", ["continuous", "ties", "zeros", "all_zero"])
@pytest.mark.parametrize("n", [1500, 5000])
def test_threshold_matches_kthvalue(small_chunks, kind, n):
    x = _data(kind, n, seed=n)
    magnitudes = x.abs()
    for k in (1, 2, n // 10, n // 2, n - 1, n):
        (t,), _ = thresholds.magnitude_thresholds(x, [k])
        assert t.value == magnitudes.kthvalue(n - k + 1).values.item()
        assert t.ties == int((magnitudes == t.value).sum())
        assert t.ties_in_top == k - int((magnitudes > t.value).sum())
        assert sum(t.chunk_ties) == t.ties or t.value == 0.0


@pytest.mark.parametrize("kind", ["continuous", "ties", "zeros"])
def test_threshold_fallback_when_bracket_misses(small_chunks, monkeypatch, kind):
    monkeypatch.setattr(thresholds, "_BRACKET_SIGMAS", 0.0)  # a bracket this narrow misses often
    x = _data(kind, 3000, seed=1)
    for k in (7, 1000, 2999):
        (t,), _ = thresholds.magnitude_thresholds(x, [k])
        assert t.value == x.abs().kthvalue(3000 - k + 1).values.item()


@pytest.mark.parametrize("kind", ["continuous", "ties", "zeros"])
def test_ties_multi_chunk_matches_reference(small_chunks, kind):
    n = 4100
    g = torch.Generator().manual_seed(3)
    base = torch.randint(-8, 9, (n,), generator=g).float() / 8
    deltas = torch.stack([_data(kind, n, seed=s) for s in (1, 2)])
    out = run("ties", base, deltas, [1.0, 0.5], density=[0.3, 0.6])
    expected = ref_ties(base, deltas, [1.0, 0.5], [0.3, 0.6])
    np.testing.assert_allclose(out.double().numpy(), expected, rtol=0, atol=1e-6)
    single = run("ties", torch.zeros(n), deltas[:1], [1.0], density=0.3, normalize=False)
    assert int(torch.count_nonzero(single)) == min(int(0.3 * n), int(torch.count_nonzero(deltas[0])))


def test_thread_count_restored(small_chunks):
    before = torch.get_num_threads()
    base, deltas = quantised((4100,), 2, seed=4)
    run("ties", base, deltas, [1.0, 1.0], density=0.5)
    assert torch.get_num_threads() == before


def test_params_and_validation():
    spec = get_method("ties")
    assert spec.mergekit_name == "ties" and "2306.01708" in spec.paper
    assert spec.defaults() == {
        "weight": 1.0,
        "density": 1.0,
        "normalize": True,
        "rescale": False,
        "lambda": 1.0,
        "sign_election": "weighted",
        "int8_mask": False,
    }
    assert spec.param("density").per_model
    for bad in (-0.1, 1.5, "x"):
        with pytest.raises(ParameterError):
            spec.param("density").validate(bad)
    with pytest.raises(ParameterError):
        spec.param("sign_election").validate("majority")
    assert spec.param("density").validate("0.5") == 0.5


@pytest.mark.parametrize("kind", ["continuous", "ties", "zeros", "all_zero"])
def test_cpu_scan_matches_a_direct_count(kind):
    # the numpy scan of one chunk against plain boolean indexing, for brackets with and without ends
    a = _data(kind, 3000, seed=5).abs()
    values = sorted(set(a.tolist()))
    mid = values[len(values) // 2]
    brackets = [
        (None, None, [0.0]),
        (None, mid, [0.0]),
        (mid, None, []),
        (values[0], values[-1], values[:1] + values[-1:]),
        (mid, mid, [mid]),
    ]
    # as _bracket makes them: a zero lower end is no lower end, and zeros are then a heavy value
    brackets = [(lo or None, hi, heavy if lo else sorted({0.0, *heavy})) for lo, hi, heavy in brackets]
    flags = (np.empty(3000, dtype=bool), np.empty(3000, dtype=bool))
    above, heavy_counts, parts = thresholds._scan_cpu(a.numpy(), brackets, flags)
    for (lo, hi, heavy), got_above, got_counts, got_part in zip(brackets, above, heavy_counts, parts):
        assert got_above == (int((a > hi).sum()) if hi is not None else 0)
        assert got_counts == [int((a == v).sum()) for v in heavy]
        inside = (a > 0) & (a >= (lo if lo is not None else 0)) & (a <= (hi if hi is not None else math.inf))
        for v in heavy:
            inside &= a != v
        if lo is not None and lo == hi and heavy == [lo]:
            inside &= False  # a one-value bracket only counts
        assert torch.equal(got_part, a[inside])
