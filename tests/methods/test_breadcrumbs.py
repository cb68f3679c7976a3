"""breadcrumbs / breadcrumbs_ties against a plain re-derivation of MergeKit's rank-band rule."""

from __future__ import annotations

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


def ref_band(x: np.ndarray, density: float, gamma: float) -> np.ndarray:
    """Keep ascending-magnitude ranks [n_bot, n_bot + target); among equal magnitudes a lower index ranks higher."""
    n = x.size
    if density >= 1:
        return x.copy()
    target = int(density * n)
    n_top = int(gamma * n)
    n_bot = max(0, n - target - n_top)
    flat = x.ravel()
    ascending = sorted(range(n), key=lambda i: (abs(flat[i]), -i))
    out = np.zeros_like(flat)
    for i in ascending[n_bot : n_bot + target]:
        out[i] = flat[i]
    return out.reshape(x.shape)


def ref_breadcrumbs(
    base, deltas, weights, densities, gammas, consensus, normalize=False, rescale=False, lam=1.0
):
    b = base.double().numpy()
    kept = []
    for i, d in enumerate(deltas.double().numpy()):
        t = ref_band(d, densities[i], gammas[i])
        if rescale and densities[i] < 1:
            before, after = np.abs(d).sum(), np.abs(t).sum()
            if before >= 1e-7 and after >= 1e-7:
                t = t * (before / after)
        kept.append(t)
    weighted = [weights[i] * kept[i] for i in range(len(weights))]
    if not consensus:
        mixed = sum(weighted)
        if normalize:
            total = sum(weights)
            mixed = mixed / (total if abs(total) >= 1e-8 else 1.0)
        return b + lam * mixed
    plus = sum(weighted) >= 0
    mixed, divisor = np.zeros_like(b), np.zeros_like(b)
    for i in range(len(weights)):
        agree = np.where(plus, weighted[i] > 0, weighted[i] < 0)
        mixed += np.where(agree, weighted[i], 0.0)
        divisor += np.where(agree, weights[i], 0.0)
    if normalize:
        divisor[divisor == 0] = 1
        mixed = mixed / divisor
    return b + lam * mixed


def quantised(shape, k, seed):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randint(-8, 9, shape, generator=g).float() / 8,
        torch.randint(-6, 7, (k, *shape), generator=g).float() / 8,
    )


CASES = [
    ((10, 12), [1.0, 0.5], [0.5, 0.3], [0.05, 0.1]),
    (
        (50,),
        [1.0, -1.0],
        [0.4, 0.9],
        [0.01, 0.2],
    ),  # 50 < 1/0.01: n_top = 0 for model 0; shrunk cut for model 1
    ((7, 3), [2.0, 1.0, 0.25], [1.0, 0.0, 0.6], [0.3, 0.3, 0.5]),  # density 1 ignores gamma; density 0
    ((1,), [1.0, 1.0], [0.5, 1.0], [0.01, 0.5]),  # int(0.5 * 1) = 0 keeps nothing
    ((4, 4), [1.0], [0.25, 0.25], [0.9, 0.9]),
]


@pytest.mark.parametrize("name", ["breadcrumbs", "breadcrumbs_ties"])
@pytest.mark.parametrize("shape,weights,densities,gammas", CASES)
@pytest.mark.parametrize("normalize", [False, True])
def test_matches_reference(name, shape, weights, densities, gammas, normalize):
    base, deltas = quantised(shape, len(weights), seed=len(shape) + len(weights))
    densities, gammas = densities[: len(weights)], gammas[: len(weights)]
    out = run(
        name, base, deltas, weights, density=densities, gamma=gammas, normalize=normalize, **{"lambda": 0.5}
    )
    expected = ref_breadcrumbs(
        base, deltas, weights, densities, gammas, name == "breadcrumbs_ties", normalize=normalize, lam=0.5
    )
    np.testing.assert_allclose(out.double().numpy(), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["breadcrumbs", "breadcrumbs_ties"])
def test_rescale(name):
    g = torch.Generator().manual_seed(1)
    base, deltas = torch.randn(9, 11, generator=g), torch.randn(2, 9, 11, generator=g)
    out = run(name, base, deltas, [1.0, 0.7], density=[0.3, 0.5], gamma=[0.05, 0.1], rescale=True)
    expected = ref_breadcrumbs(
        base, deltas, [1.0, 0.7], [0.3, 0.5], [0.05, 0.1], name == "breadcrumbs_ties", rescale=True
    )
    np.testing.assert_allclose(out.double().numpy(), expected, rtol=1e-5, atol=1e-5)


def test_outlier_and_small_entries_dropped():
    d = torch.tensor([[0.1, -5.0, 0.3, -0.2, 0.4, 0.5, -0.6, 0.7, 0.8, 0.9]])
    out = run("breadcrumbs", torch.zeros(10), d, [1.0], density=0.5, gamma=0.1)
    # n_top = 1 drops -5.0; n_bot = 10 - 5 - 1 = 4 drops 0.1, -0.2, 0.3, 0.4
    assert out.tolist() == pytest.approx([0, 0, 0, 0, 0, 0.5, -0.6, 0.7, 0.8, 0.9])


def test_ties_at_both_cuts_follow_index_order():
    d = torch.tensor([[2.0, 1.0, 2.0, 1.0, 2.0, 1.0, 0.5, 0.5]])
    out = run("breadcrumbs", torch.zeros(8), d, [1.0], density=0.5, gamma=0.25)
    # descending order by (-|x|, index): 2(0) 2(2) 2(4) 1(1) 1(3) 1(5) .5(6) .5(7); drop the first 2, keep next 4
    assert out.tolist() == [0.0, 1.0, 0.0, 1.0, 2.0, 1.0, 0.0, 0.0]


@pytest.mark.parametrize("kind", ["continuous", "ties"])
def test_multi_chunk(monkeypatch, kind):
    monkeypatch.setattr(chunks, "CHUNK", 1024)
    monkeypatch.setattr(thresholds, "_SAMPLE", 256)
    g = torch.Generator().manual_seed(2)
    n = 3333
    deltas = torch.randn(2, n, generator=g)
    if kind == "ties":
        deltas = (deltas * 3).round() / 4
    base = torch.zeros(n)
    out = run("breadcrumbs_ties", base, deltas, [1.0, 0.5], density=[0.3, 0.85], gamma=[0.05, 0.1])
    expected = ref_breadcrumbs(base, deltas, [1.0, 0.5], [0.3, 0.85], [0.05, 0.1], True)
    np.testing.assert_allclose(out.double().numpy(), expected, rtol=0, atol=1e-6)


def test_all_zero_deltas():
    base = torch.randn(5, 5)
    assert torch.equal(
        run("breadcrumbs", base, torch.zeros(2, 5, 5), [1.0, 1.0], density=0.5, rescale=True), base
    )


def test_params():
    for name in ("breadcrumbs", "breadcrumbs_ties"):
        spec = get_method(name)
        assert spec.mergekit_name == name and "2312.06795" in spec.paper
        d = spec.defaults()
        assert (
            d["gamma"] == 0.01 and d["density"] == 1.0 and d["normalize"] is False and d["rescale"] is False
        )
        assert spec.param("gamma").per_model
        with pytest.raises(ParameterError):
            spec.param("gamma").validate(-0.01)
        with pytest.raises(ParameterError):
            spec.param("gamma").validate(1.01)
