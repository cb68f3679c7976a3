"""della / della_linear: rank-based keep probabilities, epsilon validation, rescale rules, determinism.

The reference ranks magnitudes with a plain Python sort, computes each keep probability in float64, and
draws its own mask from a generator seeded like the method's (model by model, as MergeKit does).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

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


def ref_probs(x: np.ndarray, density: float, eps: float) -> np.ndarray:
    """Keep probability of each entry: linear in its ascending magnitude rank along dim 1 (1-D: one row)."""
    rows = x.reshape(1, -1) if x.ndim < 2 else x
    moved = np.moveaxis(rows, 1, -1)
    probs = np.empty(moved.shape)
    for idx in np.ndindex(*moved.shape[:-1]):
        line = moved[idx]
        length = line.size
        ascending = sorted(range(length), key=lambda j: (abs(line[j]), j))
        for rank0, j in enumerate(ascending):
            probs[idx + (j,)] = density if length == 1 else density - eps + 2 * eps * rank0 / (length - 1)
    return np.moveaxis(probs, -1, 1).reshape(x.shape)


def ref_della(base, deltas, weights, densities, eps, seed, consensus, normalize, rescale=True, mode="l1"):
    g = torch.Generator().manual_seed(seed)
    b = base.double().numpy()
    kept = []
    for i, d in enumerate(deltas):
        orig = d.double().numpy()
        if densities[i] >= 1:
            kept.append(orig)
            continue
        if densities[i] <= 0:
            kept.append(np.zeros_like(orig))
            continue
        p = ref_probs(orig, densities[i], eps[i])
        u = torch.rand(d.shape, generator=g).double().numpy()
        t = np.where(u < p, orig, 0.0)
        if rescale:
            if mode == "l1":
                before, after = np.abs(orig).sum(), np.abs(t).sum()
                if before >= 1e-7 and after >= 1e-7:
                    t = t * (before / after)
            else:
                t = t / p
        kept.append(t)
    weighted = [weights[i] * kept[i] for i in range(len(weights))]
    if not consensus:
        mixed = sum(weighted)
        if normalize:
            total = sum(weights)
            mixed = mixed / (total if abs(total) >= 1e-8 else 1.0)
        return b + mixed
    plus = sum(weighted) >= 0
    mixed, divisor = np.zeros_like(b), np.zeros_like(b)
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


@pytest.mark.parametrize("name", ["della", "della_linear"])
@pytest.mark.parametrize("mode", ["l1", "inverse_density"])
@pytest.mark.parametrize(
    "shape,weights,densities,eps",
    [
        ((6, 9), [1.0, 0.5], [0.5, 0.3], [0.15, 0.1]),
        ((17,), [1.0, -1.0], [0.6, 1.0], [0.3, 0.15]),
        ((3, 4, 5), [2.0, 1.0], [0.4, 0.0], [0.2, 0.15]),
        ((5, 1), [1.0], [0.5], [0.1]),
    ],
)
def test_matches_reference(name, mode, shape, weights, densities, eps):
    base, deltas = data(shape, len(weights), seed=len(shape))
    normalize = name == "della"
    out = run(name, base, deltas, weights, seed=4, density=densities, epsilon=eps, rescale_mode=mode)
    expected = ref_della(base, deltas, weights, densities, eps, 4, name == "della", normalize, mode=mode)
    np.testing.assert_allclose(out.double().numpy(), expected, rtol=1e-5, atol=1e-5)


def test_keep_frequency_follows_rank():
    # 4000 rows of the same 5 magnitudes: the rank-r entry is kept with p = 0.5 - 0.2 + 0.4 * r / 4
    row = torch.tensor([0.3, -0.1, 0.5, 0.2, -0.4])
    deltas = row.repeat(4000, 1).unsqueeze(0)
    out = run("della_linear", torch.zeros(4000, 5), deltas, [1.0], density=0.5, epsilon=0.2, rescale=False)
    freq = (out != 0).float().mean(0)
    expected = torch.tensor([0.5, 0.3, 0.7, 0.4, 0.6])  # ascending ranks 2, 0, 4, 1, 3
    assert (freq - expected).abs().max() < 0.04


def test_single_entry_rows_use_density():
    # MergeKit divides 0/0 here and crashes; transfuse keeps with probability = density
    deltas = torch.ones(1, 20000, 1)
    out = run("della_linear", torch.zeros(20000, 1), deltas, [1.0], density=0.3, epsilon=0.1, rescale=False)
    assert abs((out != 0).float().mean().item() - 0.3) < 0.015
    one = run("della", torch.zeros(1), torch.tensor([[2.0]]), [1.0], density=0.5, epsilon=0.1)
    assert one.item() in (0.0, 2.0)


@pytest.mark.parametrize("density,eps", [(0.1, 0.15), (0.9, 0.1), (0.5, 0.5)])
def test_epsilon_validation(density, eps):
    base, deltas = data((4, 4), 2)
    with pytest.raises(ParameterError, match="epsilon"):
        run("della", base, deltas, [1.0, 1.0], density=[0.5, density], epsilon=[0.1, eps])


def test_epsilon_not_checked_at_density_edges():
    base, deltas = data((4, 4), 2)
    out = run("della", base, deltas, [1.0, 1.0], density=[1.0, 0.0], epsilon=0.9)
    torch.testing.assert_close(out, base + deltas[0])


def test_inverse_density_divides_by_each_probability():
    d = torch.tensor([[[1.0, 2.0, 3.0, 4.0, 5.0]]])
    p = torch.tensor([0.3, 0.4, 0.5, 0.6, 0.7])
    for seed in range(5):
        out = run(
            "della_linear",
            torch.zeros(1, 5),
            d,
            [1.0],
            seed=seed,
            density=0.5,
            epsilon=0.2,
            rescale_mode="inverse_density",
        )[0]
        kept = out != 0
        torch.testing.assert_close(out[kept], (d[0, 0] / p)[kept])


def test_determinism_and_all_zero():
    base, deltas = data((20, 30), 3)
    a = run("della", base, deltas, [1.0, 1.0, 1.0], seed=1, density=0.5)
    b = run("della", base, deltas, [1.0, 1.0, 1.0], seed=1, density=0.5)
    c = run("della", base, deltas, [1.0, 1.0, 1.0], seed=2, density=0.5)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(run("della", base, torch.zeros(2, 20, 30), [1.0, 1.0], density=0.5), base)


def test_params():
    for name, normalize in (("della", True), ("della_linear", False)):
        spec = get_method(name)
        assert spec.random and spec.mergekit_name == name and "2406.11617" in spec.paper
        d = spec.defaults()
        assert d["epsilon"] == 0.15 and d["rescale"] is True and d["normalize"] is normalize
        with pytest.raises(ParameterError):
            spec.param("epsilon").validate(-0.1)
