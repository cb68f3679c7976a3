"""Gram-matrix collection and RegMean, against independent derivations (least squares, hand-computed inputs)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from transfuse import merge_state_dicts
from transfuse.errors import ParameterError
from transfuse.methods import MethodContext, get_method
from transfuse.statistics import ModelStatistics, StatisticsError, collect_gram

torch.manual_seed(0)


class TwoLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(5, 4)
        self.second = nn.Linear(4, 3, bias=False)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.second(torch.relu(self.first(x)))


def test_gram_is_the_mean_outer_product_of_each_layers_real_inputs():
    model = TwoLayer()
    x = torch.randn(3, 6, 5)  # [batch, tokens, features]
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[0, 4:] = 0
    mask[2, 1:] = 0
    stats = collect_gram(model, [{"x": x, "attention_mask": mask}])
    keep = mask.bool()
    rows1 = x[keep]  # the first layer's inputs at real tokens
    with torch.no_grad():
        rows2 = torch.relu(model.first(rows1))
    torch.testing.assert_close(stats.tensors["gram"]["first.weight"], rows1.T @ rows1 / rows1.shape[0])
    torch.testing.assert_close(stats.tensors["gram"]["second.weight"], rows2.T @ rows2 / rows2.shape[0])
    assert int(stats.tensors["gram_input_dim"]["first.weight"]) == 1
    assert stats.examples == 3 and stats.tokens == int(mask.sum())


def test_gram_over_several_batches_averages_over_all_rows():
    model = TwoLayer()
    a, b = torch.randn(2, 5), torch.randn(7, 5)
    stats = collect_gram(model, [(a,), (b,)])
    rows = torch.cat([a, b])
    torch.testing.assert_close(stats.tensors["gram"]["first.weight"], rows.T @ rows / 9)
    assert stats.examples == 9


def test_gram_refuses_a_model_without_linear_layers_and_no_batches():
    with pytest.raises(StatisticsError, match="no linear layers"):
        collect_gram(nn.ReLU(), [(torch.randn(2, 3),)])
    with pytest.raises(StatisticsError, match="no batches"):
        collect_gram(TwoLayer(), [])


def _regmean(base, deltas, weights, grams, alpha=1.0, input_dim=None):
    stats = {"gram": grams}
    if input_dim is not None:
        stats["gram_input_dim"] = torch.full((deltas.shape[0],), input_dim)
    ctx = MethodContext(name="w", statistics=stats)
    return get_method("regmean").fn(base, deltas, weights, alpha=alpha, ctx=ctx)


def test_regmean_alpha_1_is_the_least_squares_fit_to_every_models_outputs():
    # W* = argmin_W sum_i ||X_i W^T - X_i W_i^T||^2, solved by lstsq on the stacked system (float64).
    base = torch.randn(3, 6)
    models = [base + 0.3 * torch.randn(3, 6) for _ in range(3)]
    xs = [torch.randn(40, 6) * torch.tensor([1, 2, 3, 0.5, 1, 4.0]) for _ in range(3)]
    stacked_x = torch.cat(xs).double()
    stacked_y = torch.cat([x.double() @ w.double().T for x, w in zip(xs, models)])
    expected = torch.linalg.lstsq(stacked_x, stacked_y).solution.T
    # The method's Gram matrices are per-row means: the fit weighs each model by its row count, so equal counts.
    grams = torch.stack([x.T @ x / x.shape[0] for x in xs])
    deltas = torch.stack([m - base for m in models])
    merged = _regmean(base, deltas, torch.ones(3), grams)
    torch.testing.assert_close(merged.double(), expected, atol=1e-4, rtol=1e-4)


def test_regmean_weights_scale_each_models_equations():
    base = torch.zeros(2, 4)
    models = [torch.randn(2, 4) for _ in range(2)]
    xs = [torch.randn(30, 4) for _ in range(2)]
    w = torch.tensor([3.0, 1.0])
    stacked_x = torch.cat([x * w[i].sqrt() for i, x in enumerate(xs)]).double()
    stacked_y = torch.cat(
        [(x * w[i].sqrt()).double() @ m.double().T for i, (x, m) in enumerate(zip(xs, models))]
    )
    expected = torch.linalg.lstsq(stacked_x, stacked_y).solution.T
    grams = torch.stack([x.T @ x / 30 for x in xs])
    merged = _regmean(base, torch.stack(models), w, grams)
    torch.testing.assert_close(merged.double(), expected, atol=1e-4, rtol=1e-4)


def test_regmean_alpha_0_weighs_each_input_column_by_its_energy():
    base = torch.randn(3, 4)
    deltas = torch.randn(2, 3, 4)
    grams = torch.stack([torch.randn(4, 4) for _ in range(2)])
    grams = grams @ grams.transpose(1, 2) + torch.eye(4)
    merged = _regmean(base, deltas, torch.ones(2), grams, alpha=0.0)
    d = torch.diagonal(grams, dim1=1, dim2=2)  # [K, in]
    expected = base + (deltas * d[:, None, :]).sum(0) / d.sum(0)
    torch.testing.assert_close(merged, expected)


def test_regmean_conv1d_layout_is_the_transposed_problem():
    base = torch.randn(5, 3)  # GPT-2 Conv1D: [in, out]
    deltas = torch.randn(2, 5, 3)
    grams = torch.stack([torch.randn(5, 5) for _ in range(2)])
    grams = grams @ grams.transpose(1, 2)
    as_conv = _regmean(base, deltas, torch.ones(2), grams, alpha=0.7, input_dim=0)
    as_linear = _regmean(base.T, deltas.transpose(1, 2), torch.ones(2), grams, alpha=0.7)
    torch.testing.assert_close(as_conv, as_linear.T)


def test_regmean_leaves_weights_of_inputs_no_model_saw_at_the_base():
    base = torch.randn(2, 3)
    deltas = torch.randn(2, 2, 3)
    grams = torch.zeros(2, 3, 3)
    grams[:, :2, :2] = torch.eye(2) * torch.tensor([1.0, 2.0]).reshape(2, 1, 1)
    merged = _regmean(base, deltas, torch.ones(2), grams)
    torch.testing.assert_close(merged[:, 2], base[:, 2])
    expected = base[:, :2] + (deltas[0, :, :2] * 1 + deltas[1, :, :2] * 2) / 3
    torch.testing.assert_close(merged[:, :2], expected)


def test_regmean_without_a_gram_averages_and_refuses_a_misfit():
    base = torch.randn(4)
    deltas = torch.randn(3, 4)
    w = torch.tensor([1.0, 2.0, 1.0])
    out = get_method("regmean").fn(base, deltas, w, alpha=0.9, ctx=MethodContext(name="b"))
    torch.testing.assert_close(out, base + (deltas * w[:, None]).sum(0) / 4)
    with pytest.raises(ParameterError, match="do not fit"):
        _regmean(torch.randn(3, 4), torch.randn(2, 3, 4), torch.ones(2), torch.randn(2, 3, 3))


def test_regmean_through_merge_state_dicts_with_collected_statistics():
    base_model = TwoLayer()
    experts = [TwoLayer() for _ in range(2)]
    base = {k: v.detach().clone() for k, v in base_model.state_dict().items()}
    states = [{k: v.detach().clone() for k, v in m.state_dict().items()} for m in experts]
    xs = [torch.randn(16, 5), torch.randn(16, 5) * 2]
    stats = [collect_gram(m, [(x,)]) for m, x in zip(experts, xs)]
    merged = merge_state_dicts(base, states, "regmean", statistics=stats, alpha=1.0)
    # first.weight: least squares on the two experts' own inputs
    g = [s.tensors["gram"]["first.weight"] for s in stats]
    ws = [s["first.weight"] for s in states]
    expected = sum(w @ gi for w, gi in zip(ws, g)) @ torch.linalg.inv(sum(g))
    torch.testing.assert_close(merged["first.weight"], expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(merged["first.bias"], (states[0]["first.bias"] + states[1]["first.bias"]) / 2)
    with pytest.raises(StatisticsError, match="give one per model"):
        merge_state_dicts(base, states, "regmean", statistics=stats[:1])
    partial = ModelStatistics()
    partial.add("gram", "first.weight", g[0])
    with pytest.raises(StatisticsError, match="some models but not others"):
        merge_state_dicts(base, states, "regmean", statistics=[stats[0], partial])
