"""Fisher collection and Fisher merging, against closed forms (softmax regression's per-example gradients)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from transfuse import merge_state_dicts
from transfuse.methods import MethodContext, get_method
from transfuse.statistics import StatisticsError, collect_fisher


def _softmax_regression(classes: int = 3, features: int = 4) -> nn.Linear:
    torch.manual_seed(1)
    return nn.Linear(features, classes)


def _closed_form(model: nn.Linear, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None):
    """Per-example gradient of log p(y|x) for logits = W x + b: dW = (e_y - p) x^T, db = e_y - p; for token
    sequences the example's gradient sums over its unmasked tokens.  Returns the mean squared gradients."""
    with torch.no_grad():
        p = torch.softmax(model(x), -1)
    e = torch.nn.functional.one_hot(y, p.shape[-1]).float()
    r = e - p
    if x.dim() == 2:
        gw = r[:, :, None] * x[:, None, :]
        gb = r
    else:
        m = mask.float()[..., None]
        gw = torch.einsum("btc,btf->bcf", r * m, x)
        gb = (r * m).sum(1)
    return gw.square().mean(0), gb.square().mean(0)


def test_fisher_with_given_labels_is_the_mean_squared_per_example_gradient():
    model = _softmax_regression()
    x = torch.randn(10, 4)
    y = torch.randint(0, 3, (10,))
    batches = [{"x": x[:6], "y": y[:6]}, {"x": x[6:], "y": y[6:]}]
    stats = collect_fisher(
        model, batches, logits=lambda m, b: m(b["x"]), labels="given", label_fn=lambda b: b["y"]
    )
    fw, fb = _closed_form(model, x, y)
    torch.testing.assert_close(stats.tensors["fisher"]["weight"], fw)
    torch.testing.assert_close(stats.tensors["fisher"]["bias"], fb)
    assert stats.examples == 10


def test_fisher_of_token_outputs_sums_each_examples_unmasked_tokens():
    model = _softmax_regression()
    x = torch.randn(3, 5, 4)
    y = torch.randint(0, 3, (3, 5))
    mask = torch.ones(3, 5, dtype=torch.long)
    mask[1, 3:] = 0
    mask[2, 1:] = 0
    batch = {"x": x, "y": y, "attention_mask": mask}
    stats = collect_fisher(
        model, [batch], logits=lambda m, b: m(b["x"]), labels="given", label_fn=lambda b: b["y"]
    )
    fw, fb = _closed_form(model, x, y, mask)
    torch.testing.assert_close(stats.tensors["fisher"]["weight"], fw)
    torch.testing.assert_close(stats.tensors["fisher"]["bias"], fb)
    assert stats.tokens == int(mask.sum())


def test_ignored_labels_do_not_count():
    model = _softmax_regression()
    x = torch.randn(4, 4)
    y = torch.tensor([0, -100, 2, 1])
    stats = collect_fisher(
        model, [(x, y)], logits=lambda m, b: m(b[0]), labels="given", label_fn=lambda b: b[1]
    )
    keep = y != -100
    fw, _ = _closed_form(model, x[keep], y[keep])
    torch.testing.assert_close(stats.tensors["fisher"]["weight"], fw)
    assert stats.examples == 3


def test_sampled_labels_estimate_the_true_fisher():
    # E_y~p[(e_y - p)_c^2] x_f^2 = sum_y p_y (e_y - p)_c^2 x_f^2: the true Fisher; the one-sample estimate over
    # 4000 examples lies within a few percent of it.
    model = _softmax_regression()
    x = torch.randn(4000, 4)
    stats = collect_fisher(
        model, [(x[i : i + 500],) for i in range(0, 4000, 500)], logits=lambda m, b: m(b[0])
    )
    with torch.no_grad():
        p = torch.softmax(model(x), -1)
    expected_r2 = p * (1 - p) ** 2 + (p * p) * (1 - p)  # sum_y p_y (1[y=c] - p_c)^2 = p_c (1 - p_c)
    expected = (expected_r2[:, :, None] * x[:, None, :].square()).mean(0)
    rel = (stats.tensors["fisher"]["weight"] - expected).abs().sum() / expected.sum()
    assert rel < 0.05, rel
    again = collect_fisher(
        model, [(x[i : i + 500],) for i in range(0, 4000, 500)], logits=lambda m, b: m(b[0])
    )
    torch.testing.assert_close(again.tensors["fisher"]["weight"], stats.tensors["fisher"]["weight"])


def test_argmax_labels_use_the_models_top_class():
    model = _softmax_regression()
    x = torch.randn(8, 4)
    with torch.no_grad():
        top = model(x).argmax(-1)
    stats = collect_fisher(model, [(x,)], logits=lambda m, b: m(b[0]), labels="argmax")
    fw, _ = _closed_form(model, x, top)
    torch.testing.assert_close(stats.tensors["fisher"]["weight"], fw)


def test_fisher_collection_errors():
    model = _softmax_regression()
    with pytest.raises(StatisticsError, match="labels must be one of"):
        collect_fisher(model, [], logits=lambda m, b: m(b), labels="true")  # type: ignore[arg-type]
    with pytest.raises(StatisticsError, match="needs label_fn"):
        collect_fisher(model, [], logits=lambda m, b: m(b), labels="given")
    with pytest.raises(StatisticsError, match="no examples"):
        collect_fisher(model, [], logits=lambda m, b: m(b[0]))
    frozen = _softmax_regression().requires_grad_(False)
    with pytest.raises(StatisticsError, match="no trainable parameters"):
        collect_fisher(frozen, [(torch.randn(2, 4),)], logits=lambda m, b: m(b[0]))


def _fisher(base, deltas, weights, f, epsilon=0.0):
    ctx = MethodContext(name="t", statistics={"fisher": f})
    return get_method("fisher").fn(base, deltas, weights, epsilon=epsilon, ctx=ctx)


def test_fisher_merge_is_the_fisher_weighted_average_entry_by_entry():
    base = torch.randn(3, 2)
    deltas = torch.randn(2, 3, 2)
    f = torch.rand(2, 3, 2) + 0.1
    w = torch.tensor([1.0, 3.0])
    out = _fisher(base, deltas, w, f)
    models = base + deltas
    expected = torch.empty(3, 2)
    for i in range(3):
        for j in range(2):
            num = sum(w[k] * f[k, i, j] * models[k, i, j] for k in range(2))
            den = sum(w[k] * f[k, i, j] for k in range(2))
            expected[i, j] = num / den
    torch.testing.assert_close(out, expected)


def test_fisher_epsilon_and_zero_fisher_fall_back_to_the_weighted_mean():
    base = torch.zeros(4)
    deltas = torch.tensor([[1.0, 2, 3, 4], [3.0, 2, 1, 0]])
    w = torch.tensor([1.0, 1.0])
    zero = torch.zeros(2, 4)
    torch.testing.assert_close(_fisher(base, deltas, w, zero), deltas.mean(0))
    f = torch.tensor([[1.0, 0, 0, 0], [0.0, 0, 0, 0]])
    out = _fisher(base, deltas, w, f, epsilon=1e-6)
    assert out[0] == pytest.approx(1.0, abs=1e-5)  # only model 0 is sensitive there
    torch.testing.assert_close(out[1:], deltas.mean(0)[1:])  # nobody is: the mean
    no_stats = get_method("fisher").fn(base, deltas, w, epsilon=1e-6, ctx=MethodContext(name="buffer"))
    torch.testing.assert_close(no_stats, deltas.mean(0))


def test_fisher_merge_of_two_collected_models_through_merge_state_dicts():
    experts = [_softmax_regression(), nn.Linear(4, 3)]
    base = {k: torch.zeros_like(v) for k, v in experts[0].state_dict().items()}
    states = [{k: v.detach().clone() for k, v in e.state_dict().items()} for e in experts]
    xs = [torch.randn(20, 4), torch.randn(20, 4)]
    stats = [
        collect_fisher(e, [(x,)], logits=lambda m, b: m(b[0]), labels="argmax") for e, x in zip(experts, xs)
    ]
    merged = merge_state_dicts(base, states, "fisher", statistics=stats, epsilon=0.0)
    f = [s.tensors["fisher"]["weight"] for s in stats]
    expected = (f[0] * states[0]["weight"] + f[1] * states[1]["weight"]) / (f[0] + f[1])
    torch.testing.assert_close(merged["weight"], expected)
