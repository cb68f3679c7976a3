"""EMR-Merging's math against slow per-entry loops, and the builder's materialised tasks against hand computation."""

from __future__ import annotations

import math

import pytest
import torch

from transfuse.errors import (
    DtypeMismatchError,
    MissingTensorError,
    NonFiniteTensorError,
    NotSameBaseError,
    ParameterError,
    ShapeMismatchError,
)
from transfuse.routed.bitpack import unpack_bits
from transfuse.routed.emr import elect, emr_merge, rescaler_terms, rescalers
from transfuse.routed.errors import ModuleMismatchError

from .conftest import TinyMLP


def _slow_elect(deltas: list[list[float]]) -> tuple[list[float], list[list[bool]]]:
    """Per entry: sign of the sum (-1 at 0, as the authors' code), max |tau_i| among agreeing tasks."""
    k, n = len(deltas), len(deltas[0])
    unified, masks = [], [[False] * n for _ in range(k)]
    for j in range(n):
        s = sum(deltas[i][j] for i in range(k))
        sign = 1.0 if s > 0 else -1.0
        best = 0.0
        for i in range(k):
            if deltas[i][j] * sign > 0:
                best = max(best, abs(deltas[i][j]))
        unified.append(sign * best)
        for i in range(k):
            masks[i][j] = deltas[i][j] * unified[j] > 0  # the paper's M_i = (tau_i * tau_uni > 0)
    return unified, masks


def test_elect_matches_a_per_entry_loop():
    g = torch.Generator().manual_seed(1)
    deltas = torch.randn(4, 5, 7, generator=g)
    deltas[:, 0, 0] = 0.0  # all zero: unified 0, no mask
    deltas[:, 0, 1] = torch.tensor([1.0, -1.0, 0.5, -0.5])  # exact zero sum: -1 elected
    deltas[0, 1, :] = 0.0  # one task unchanged in a row
    unified, masks = elect(deltas)
    flat = deltas.reshape(4, -1).tolist()
    want_u, want_m = _slow_elect(flat)
    assert unified.reshape(-1).tolist() == pytest.approx(want_u, abs=0)
    assert masks.reshape(4, -1).tolist() == want_m
    assert unified[0, 1].item() == -1.0 and masks[:, 0, 1].tolist() == [False, True, False, True]
    assert unified[0, 0].item() == 0.0 and not masks[:, 0, 0].any()


@pytest.mark.parametrize("weighting", ["tensor_mean", "entry_sum"])
def test_rescalers_over_several_tensors_match_a_loop(weighting):
    g = torch.Generator().manual_seed(2)
    tensors = [
        torch.randn(3, 6, generator=g),
        torch.randn(3, 2, 2, generator=g),
        torch.randn(3, 11, generator=g),
    ]
    num = torch.zeros(3, dtype=torch.float64)
    den = torch.zeros(3, dtype=torch.float64)
    for d in tensors:
        u, m = elect(d)
        a, b = rescaler_terms(d, u, m, weighting=weighting)
        num, den = num + a, den + b
    got = rescalers(num, den)
    # the loop: one scalar per task over the whole model, each tensor weighted 1/numel or 1
    for i in range(3):
        top = bottom = 0.0
        for d in tensors:
            flat = d.reshape(3, -1).tolist()
            u, m = _slow_elect(flat)
            w = 1.0 / len(u) if weighting == "tensor_mean" else 1.0
            top += w * sum(abs(x) for x in flat[i])
            bottom += w * sum(abs(u[j]) for j in range(len(u)) if m[i][j])
        assert got[i].item() == pytest.approx(top / bottom, rel=1e-6)


def test_a_task_that_agrees_nowhere_gets_rescaler_one():
    deltas = torch.tensor([[1.0, 2.0], [-0.1, -0.1]])  # task 1 disagrees with the elected + everywhere
    u, m = elect(deltas)
    lam = rescalers(*rescaler_terms(deltas, u, m))
    assert not m[1].any() and lam[1].item() == 1.0


def test_materialised_task_is_base_plus_rescaled_masked_unified(mlp_experts):
    base, experts = mlp_experts
    model = emr_merge(base, experts, TinyMLP())
    assert "out.bias" not in model.parts.routed_names  # no expert changed it
    routed = [n for n in base if base[n].is_floating_point() and n != "out.bias"]
    assert sorted(model.parts.routed_names) == sorted(routed)
    # by hand: tau_i, the loop's election, the code's per-tensor-mean rescaler
    tasks = list(experts)
    taus = {n: [(experts[t][n] - base[n]).reshape(-1).tolist() for t in tasks] for n in routed}
    elected = {n: _slow_elect(taus[n]) for n in routed}
    for i, task in enumerate(tasks):
        top = sum(sum(abs(x) for x in taus[n][i]) / len(taus[n][i]) for n in routed)
        bottom = sum(
            sum(abs(u) for u, keep in zip(elected[n][0], elected[n][1][i]) if keep) / len(elected[n][0])
            for n in routed
        )
        lam = top / bottom
        assert model.parts.rescalers[task] == pytest.approx(lam, rel=1e-6)
        params = model.task_parameters(task)
        for n in routed:
            u, masks = elected[n]
            want = [
                b + (lam * uu if keep else 0.0)
                for b, uu, keep in zip(base[n].reshape(-1).tolist(), u, masks[i])
            ]
            assert params[n].reshape(-1).tolist() == pytest.approx(want, rel=1e-5, abs=1e-6)
            assert params[n].dtype == base[n].dtype


def test_one_expert_is_reproduced_exactly():
    torch.manual_seed(3)
    base = {k: v.clone() for k, v in TinyMLP().state_dict().items()}
    expert = {
        k: (v + 0.05 * torch.randn_like(v)) if v.is_floating_point() else v.clone() for k, v in base.items()
    }
    expert["inp.weight"][0, :2] = base["inp.weight"][0, :2]  # some entries unchanged: mask 0 there
    model = emr_merge(base, {"only": expert}, TinyMLP())
    assert model.parts.rescalers["only"] == 1.0
    for name in model.parts.routed_names:
        mask = unpack_bits(model.parts.masks["only"][name], base[name].shape)
        assert torch.equal(mask, expert[name] != base[name])
    params = model.task_parameters("only")
    for name in model.parts.routed_names:
        # base + 1 * (expert - base) in float32: the expert to the last bit or one rounding of it
        torch.testing.assert_close(params[name], expert[name], rtol=0, atol=1e-7)


def test_entry_sum_weighting_is_the_papers_ratio(mlp_experts):
    base, experts = mlp_experts
    model = emr_merge(base, experts, TinyMLP(), rescaler_weighting="entry_sum")
    names = model.parts.routed_names
    for task in experts:
        top = sum((experts[task][n] - base[n]).abs().sum().item() for n in names)
        bottom = sum(
            (model.parts.unified[n].abs() * unpack_bits(model.parts.masks[task][n], base[n].shape))
            .sum()
            .item()
            for n in names
        )
        assert model.parts.rescalers[task] == pytest.approx(top / bottom, rel=1e-6)
    assert model.parts.settings() == {"rescaler_weighting": "entry_sum"}


def test_bad_inputs_are_named_before_any_work(mlp_experts):
    base, experts = mlp_experts
    with pytest.raises(ParameterError, match="at least one"):
        emr_merge(base, {}, TinyMLP())
    with pytest.raises(ParameterError, match="rescaler_weighting"):
        emr_merge(base, experts, TinyMLP(), rescaler_weighting="mean")
    with pytest.raises(ParameterError, match="non-empty strings"):
        emr_merge(base, {"": experts["a"]}, TinyMLP())
    missing = {k: v for k, v in experts["a"].items() if k != "inp.bias"}
    with pytest.raises(MissingTensorError, match="inp.bias"):
        emr_merge(base, {"a": missing}, TinyMLP())
    with pytest.raises(NotSameBaseError, match="head"):
        emr_merge(base, {"a": {**experts["a"], "head.weight": torch.ones(2)}}, TinyMLP())
    with pytest.raises(ShapeMismatchError, match="inp.weight"):
        emr_merge(base, {"a": {**experts["a"], "inp.weight": torch.ones(8, 5)}}, TinyMLP())
    with pytest.raises(DtypeMismatchError, match="version"):
        emr_merge(base, {"a": {**experts["a"], "version": torch.tensor([3.0])}}, TinyMLP())
    with pytest.raises(NotSameBaseError, match="non-float"):
        emr_merge(base, {"a": {**experts["a"], "version": torch.tensor([4])}}, TinyMLP())
    nan = {**experts["b"], "out.weight": experts["b"]["out.weight"].clone()}
    nan["out.weight"][1, 1] = math.nan
    with pytest.raises(NonFiniteTensorError, match="'b'"):
        emr_merge(base, {"a": experts["a"], "b": nan}, TinyMLP())
    with pytest.raises(ModuleMismatchError, match="structure"):
        emr_merge(base, experts, torch.nn.Linear(4, 8))
