"""pcb against a float64 NumPy re-derivation of the official PCB_merge (sort-based quantiles, min-max norms)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from transfuse.methods import get_method


def _merge(base, deltas, weights=None, **params):
    spec = get_method("pcb")
    kwargs = {("lambda_" if p.name == "lambda" else p.name): p.default for p in spec.params}
    kwargs |= {("lambda_" if k == "lambda" else k): v for k, v in params.items()}
    weights = torch.ones(deltas.shape[0]) if weights is None else weights
    return spec.fn(base.clone(), deltas.clone(), weights, **kwargs)


def _minmax_rows(x: np.ndarray) -> np.ndarray:
    lo, hi = x.min(axis=1, keepdims=True), x.max(axis=1, keepdims=True)
    return (x - lo) / (hi - lo)


def _clip_rows(x: np.ndarray, low_ratio: float, high_ratio: float) -> np.ndarray:
    d = x.shape[1]
    s = np.sort(x, axis=1)
    return np.clip(x, s[:, [int(d * low_ratio)]], s[:, [int(d * (1 - high_ratio) - 1)]])


def _expected(base, deltas, weights, lam=1.0, density=0.1, clip_ratio=1e-4):
    """Intra (exp(K norm(|tau|)^2)) x inter (tanh(tau * sum tau)), drop below the 1-density quantile, average."""
    k = deltas.shape[0]
    tau = deltas.numpy().reshape(k, -1).astype(np.float64)
    magnitude = _clip_rows(np.abs(tau), clip_ratio, clip_ratio)
    clipped = np.sign(tau) * magnitude
    intra = np.exp(k * _minmax_rows(magnitude) ** 2)
    inter = np.tanh(tau * tau.sum(axis=0))
    beta = _minmax_rows(_clip_rows(intra * inter, 1 - density, 0.0))
    w = weights.numpy().astype(np.float64)[:, None]
    merged = (clipped * w * beta).sum(axis=0) / np.maximum(beta.sum(axis=0), 1e-12)
    return base.numpy().astype(np.float64) + lam * merged.reshape(base.shape)


def _tasks(k, shape, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    shared = torch.randn(shape, generator=g)
    return torch.randn(shape, generator=g), scale * torch.stack(
        [shared + torch.randn(shape, generator=g) for _ in range(k)]
    )


@pytest.mark.parametrize("shape", [(40, 25), (25, 40), (500,), (5, 6, 7)])
@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("density", [0.1, 0.5, 1.0])
def test_matches_reference(shape, k, density):
    base, deltas = _tasks(k, shape, seed=k * 31 + len(shape))
    weights = torch.tensor([1.0, 0.8, 1.2, 0.5][:k])
    out = _merge(base, deltas, weights, density=density, **{"lambda": 1.3})
    expected = _expected(base, deltas, weights, 1.3, density)
    np.testing.assert_allclose(out.numpy(), expected, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("clip_ratio", [0.0, 0.01, 0.05])
def test_clip_ratio_matches_reference(clip_ratio):
    base, deltas = _tasks(3, (2000,), seed=4, scale=0.3)
    out = _merge(base, deltas, clip_ratio=clip_ratio, density=0.2)
    np.testing.assert_allclose(
        out.numpy(), _expected(base, deltas, torch.ones(3), density=0.2, clip_ratio=clip_ratio), atol=2e-5
    )


def test_drops_the_requested_share():
    # With one task every kept weight is that task's clipped value; about `density` of them are kept.
    base, deltas = _tasks(1, (1000,), seed=9)
    out = _merge(torch.zeros(1000), deltas, density=0.1, clip_ratio=0.0)
    kept = out != 0
    assert 0.09 <= kept.float().mean().item() <= 0.1
    torch.testing.assert_close(out[kept], deltas[0][kept])
    # The kept weights are the largest in magnitude (inter = tanh(tau^2) and intra both grow with |tau|).
    assert out.abs()[kept].min() >= deltas[0].abs()[~kept].max()


def test_identical_tasks_average_to_the_task():
    base, deltas = _tasks(1, (300,), seed=5)
    out = _merge(base, deltas.repeat(3, 1), density=1.0, clip_ratio=0.0)
    delta = out - base
    nonzero = delta != 0
    assert nonzero.float().mean() > 0.99  # only the minimum-score weight is dropped at density 1
    torch.testing.assert_close(delta[nonzero], deltas[0][nonzero])


def test_many_tasks_do_not_overflow():
    # exp(K x^2) overflows float32 for K > 88; the per-task rescaled form must stay finite and equal.
    base, deltas = _tasks(120, (64,), seed=6, scale=0.01)
    out = _merge(base, deltas, density=0.3)
    assert torch.isfinite(out).all()
    np.testing.assert_allclose(out.numpy(), _expected(base, deltas, torch.ones(120), density=0.3), atol=1e-6)


def test_degenerate_tensors_stay_finite():
    for shape in [(1,), (), (1, 1), (3, 2)]:
        base = torch.randn(shape)
        torch.testing.assert_close(_merge(base, torch.zeros(3, *shape)), base)
        out = _merge(base, torch.randn(2, *shape))
        assert out.shape == base.shape and torch.isfinite(out).all()
    # A 1-element tensor whose tasks agree is kept (the official 0/0 min-max would give NaN).
    out = _merge(torch.zeros(1), torch.tensor([[0.5], [0.3]]))
    torch.testing.assert_close(out, torch.tensor([0.4]))


def test_density_zero_keeps_each_tasks_top_scored_entry():
    # the quantile at density 0 is each task's maximum score, so nothing is strictly above it: the documented
    # fallback keeps every task's top-scored entry at weight 1 (the official min-max would give 0/0 there)
    base, deltas = _tasks(3, (6, 7), seed=5, scale=0.1)  # small: tanh does not saturate into tied top scores
    weights = torch.tensor([1.0, 0.5, 2.0])
    out = _merge(base, deltas, weights, density=0.0).numpy().astype(np.float64)
    k = 3
    tau = deltas.numpy().reshape(k, -1).astype(np.float64)
    magnitude = _clip_rows(np.abs(tau), 1e-4, 1e-4)
    score = np.exp(k * _minmax_rows(magnitude) ** 2) * np.tanh(tau * tau.sum(axis=0))
    beta = np.zeros_like(score)
    for t in range(k):
        assert np.sum(score[t] == score[t].max()) == 1
        beta[t, np.argmax(score[t])] = 1.0 if score[t].max() > 0 else 0.0
    merged = (np.sign(tau) * magnitude * weights.numpy()[:, None] * beta).sum(axis=0)
    merged /= np.maximum(beta.sum(axis=0), 1e-12)
    expected = base.numpy().astype(np.float64) + merged.reshape(base.shape)
    np.testing.assert_allclose(out, expected, atol=1e-5)
    assert np.count_nonzero(out - base.numpy()) <= k
