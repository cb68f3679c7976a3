"""dare_linear / dare_ties: mask statistics, the rescale rules, determinism, and a re-derived reference.

The reference draws its own mask with ``torch.rand`` from a generator seeded like the method's: model 0's
mask over its whole tensor first, then model 1's, ... (MergeKit's order with ``torch.bernoulli``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import transfuse.chunks as chunks
from transfuse.errors import ParameterError
from transfuse.methods import MethodContext, get_method


def run(name, base, deltas, weights, seed=0, **overrides):
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
    generator = torch.Generator().manual_seed(seed)
    return spec.fn(
        base.clone(),
        deltas.clone(),
        torch.tensor(weights, dtype=torch.float32),
        ctx=MethodContext(generator=generator),
        **kwargs,
    )


def ref_dare(
    base, deltas, weights, densities, seed, rescale=True, mode="l1", consensus=False, normalize=False
):
    g = torch.Generator().manual_seed(seed)
    b = base.double().numpy()
    kept = []
    for i, d in enumerate(deltas):
        if densities[i] >= 1:
            kept.append(d.double().numpy())
            continue
        mask = (torch.rand(d.shape, generator=g) < densities[i]).double().numpy()
        orig = d.double().numpy()
        t = orig * mask
        if rescale and densities[i] > 0:
            if mode == "l1":
                before, after = np.abs(orig).sum(), np.abs(t).sum()
                if before >= 1e-7 and after >= 1e-7:
                    t = t * (before / after)
            else:
                t = t / densities[i]
        kept.append(t)
    weighted = [weights[i] * kept[i] for i in range(len(weights))]
    if not consensus:
        mixed = sum(weighted)
        total = sum(weights)
        if normalize:
            mixed = mixed / (total if abs(total) >= 1e-8 else 1.0)
        return b + mixed
    plus = sum(weighted) >= 0
    mixed = np.zeros_like(b)
    divisor = np.zeros_like(b)
    for i in range(len(weights)):
        agree = np.where(plus, weighted[i] > 0, weighted[i] < 0)
        mixed += np.where(agree, weighted[i], 0.0)
        divisor += np.where(agree, weights[i], 0.0)
    if normalize:
        divisor[divisor == 0] = 1
        mixed = mixed / divisor
    return b + mixed


def data(shape, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn((k, *shape), generator=g)


@pytest.mark.parametrize("name", ["dare_linear", "dare_ties"])
@pytest.mark.parametrize("mode", ["l1", "inverse_density"])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize(
    "shape,weights,densities",
    [((8, 6), [1.0, 0.5], [0.5, 0.3]), ((13,), [1.0, -1.0, 2.0], [0.9, 1.0, 0.0]), ((1,), [1.0], [0.5])],
)
def test_matches_reference(name, mode, normalize, shape, weights, densities):
    base, deltas = data(shape, len(weights), seed=len(weights))
    out = run(name, base, deltas, weights, seed=7, density=densities, rescale_mode=mode, normalize=normalize)
    expected = ref_dare(
        base, deltas, weights, densities, 7, mode=mode, consensus=name == "dare_ties", normalize=normalize
    )
    np.testing.assert_allclose(out.double().numpy(), expected, rtol=1e-5, atol=1e-5)


def test_kept_fraction_and_rescale_rules():
    n = 200_000
    d = torch.randn(1, n)
    plain = run("dare_linear", torch.zeros(n), d, [1.0], density=0.3, rescale=False)
    kept = plain != 0
    assert abs(kept.float().mean().item() - 0.3) < 0.005
    assert torch.equal(plain[kept], d[0][kept])  # no rescale: kept entries untouched
    inverse = run("dare_linear", torch.zeros(n), d, [1.0], density=0.3, rescale_mode="inverse_density")
    assert torch.equal(inverse[kept], d[0][kept] / 0.3) and torch.equal(inverse != 0, kept)
    l1 = run("dare_linear", torch.zeros(n), d, [1.0], density=0.3)
    assert torch.equal(l1 != 0, kept)  # same seed, same mask
    assert abs(l1.abs().sum().item() / d.abs().sum().item() - 1) < 1e-5  # L1 norm restored (MergeKit)
    expected_ratio = d.abs().sum().item() / plain.abs().sum().item()  # one factor for the whole tensor
    torch.testing.assert_close(l1[kept], d[0][kept] * expected_ratio, rtol=1e-5, atol=1e-6)


def test_determinism():
    base, deltas = data((50, 40), 2)
    a = run("dare_ties", base, deltas, [1.0, 1.0], seed=3, density=0.5)
    b = run("dare_ties", base, deltas, [1.0, 1.0], seed=3, density=0.5)
    c = run("dare_ties", base, deltas, [1.0, 1.0], seed=4, density=0.5)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_uses_only_the_given_generator():
    base, deltas = data((30,), 2)
    torch.manual_seed(0)
    a = run("dare_linear", base, deltas, [1.0, 1.0], seed=9, density=0.5)
    torch.manual_seed(1)
    b = run("dare_linear", base, deltas, [1.0, 1.0], seed=9, density=0.5)
    assert torch.equal(a, b)


def test_chunked_draw_is_one_stream(monkeypatch):
    # chunk by chunk the method must draw exactly torch.rand(shape)'s numbers (odd chunk length on purpose)
    monkeypatch.setattr(chunks, "CHUNK", 1000)
    base, deltas = data((37, 101), 2)
    out = run("dare_linear", base, deltas, [1.0, 1.0], seed=5, density=[0.4, 0.6], rescale=False)
    expected = ref_dare(base, deltas, [1.0, 1.0], [0.4, 0.6], 5, rescale=False)
    np.testing.assert_allclose(out.double().numpy(), expected, rtol=1e-6, atol=1e-6)


def test_density_edges():
    base, deltas = data((20,), 2)
    torch.testing.assert_close(run("dare_linear", base, deltas, [1.0, 1.0], density=0.0), base)
    full = run("dare_linear", base, deltas, [1.0, 2.0], density=1.0)
    torch.testing.assert_close(full, base + deltas[0] + 2 * deltas[1])
    zero = run("dare_ties", base, torch.zeros(2, 20), [1.0, 1.0], density=0.5)
    assert torch.equal(zero, base)


def test_params():
    for name in ("dare_linear", "dare_ties"):
        spec = get_method(name)
        assert spec.random and spec.mergekit_name == name and "2311.03099" in spec.paper
        d = spec.defaults()
        assert d["normalize"] is False and d["rescale"] is True and d["rescale_mode"] == "l1"
        with pytest.raises(ParameterError):
            spec.param("rescale_mode").validate("l2")
        with pytest.raises(ParameterError):
            spec.param("density").validate(2)
    assert "sign_election" in get_method("dare_ties").defaults()
