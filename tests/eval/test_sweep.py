"""The method sweep on two tiny experts: its schema, its choice on validation, and its numbers."""

from __future__ import annotations

import json

import pytest
import torch

from transfuse import merge_state_dicts
from transfuse.eval import evaluate, mean_accuracy, method_grid, normalized_accuracy, run_method_sweep
from transfuse.methods import get_method
from transfuse.models import Encoder
from transfuse.train import train_experts, train_multitask

FAST = dict(steps=20, batch_size=8, encoder_lr=3e-3, head_lr=3e-2, progress=False)
GRIDS = {"task_arithmetic": {"lambda": [0.3, 1.0]}, "ties": [{"density": 0.5, "lambda": 0.8}]}


@pytest.fixture(scope="module")
def trained(tiny_backbone, suite, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    experts = train_experts(suite, cache, backbone_dir=tiny_backbone, **FAST)
    multitask = train_multitask(
        suite,
        cache,
        backbone_dir=tiny_backbone,
        steps_per_task=20,
        batch_size=8,
        encoder_lr=3e-3,
        head_lr=3e-2,
        progress=False,
    )
    return experts, multitask


def test_sweep_schema_and_choice(tiny_backbone, suite, trained):
    experts, multitask = trained
    base = Encoder.load(tiny_backbone).state_dict()
    result = run_method_sweep(
        suite,
        experts,
        base,
        ["task_arithmetic", "ties", "slerp"],
        grids=GRIDS,
        multitask=multitask,
        progress=False,
    )
    json.dumps(result)  # JSON-serializable as it is

    assert result["tasks"] == ["colour", "animal"] and result["num_experts"] == 2
    assert set(result["results"]) == {"task_arithmetic", "ties"}
    assert "exactly 1" in result["skipped"]["slerp"]
    assert set(result["baselines"]) == {"pretrained", "individual", "multitask"}

    individual = result["baselines"]["individual"]["per_task"]
    # the experts' own encoders score what they scored when trained
    assert individual == pytest.approx({n: e.test_accuracy[n] for n, e in experts.items()}, abs=1e-6)
    assert result["baselines"]["individual"]["normalized"] == pytest.approx(1.0)

    for name, entry in result["results"].items():
        assert set(entry["per_task"]) == {"colour", "animal"}
        assert entry["mean"] == pytest.approx(mean_accuracy(entry["per_task"]))
        assert entry["normalized"] == pytest.approx(normalized_accuracy(entry["per_task"], individual))
        scored = [c for c in entry["candidates"] if "validation_mean" in c]
        best = max(c["validation_mean"] for c in scored)
        chosen = next(c for c in scored if c["validation_mean"] == best)  # first best wins ties
        assert entry["overrides"] == chosen["params"]
        assert entry["params"] == {
            **{k: v for k, v in get_method(name).defaults().items() if k != "weight"},
            **chosen["params"],
        }
        assert len(result["correct"][name]["colour"]) == len(suite["colour"].test)

    ta = result["results"]["task_arithmetic"]
    assert [c["params"] for c in ta["candidates"]] == [{}, {"lambda": 0.3}]  # lambda 1.0 is the default
    # the reported test numbers are those of that merge, evaluated directly
    states = [e.encoder_state_dict() for e in experts.values()]
    merged = merge_state_dicts(base, states, "task_arithmetic", **ta["overrides"])
    heads = {n: e.path for n, e in experts.items()}
    assert evaluate(merged, heads, suite, backbone_dir=tiny_backbone) == ta["per_task"]


def test_single_expert_sweep_runs_slerp_and_defaults_only(tiny_backbone, suite, trained):
    experts, _ = trained
    one = suite.select(["colour"])
    base = {k: v.clone() for k, v in Encoder.load(tiny_backbone).state_dict().items()}
    result = run_method_sweep(
        one, [experts["colour"]], base, ["slerp", "nearswap", "model_stock", "linear"], progress=False
    )
    slerp = result["results"]["slerp"]
    # slerp has no default t: the "defaults" candidate takes the grid's middle value, tried once
    assert [c["params"] for c in slerp["candidates"]] == [{"t": 0.5}, {"t": 0.25}, {"t": 0.75}]
    assert not any("error" in c for c in slerp["candidates"])
    assert slerp["params"]["t"] in (0.25, 0.5, 0.75)
    nearswap = result["results"]["nearswap"]
    assert [c["params"] for c in nearswap["candidates"]] == [{"t": 1e-3}, {"t": 1e-4}, {"t": 1e-2}]
    assert not any("error" in c for c in nearswap["candidates"])
    assert "at least 2" in result["skipped"]["model_stock"]
    assert result["results"]["linear"]["chosen_on"] == "defaults (no grid)"
    no_grid = run_method_sweep(
        one, [experts["colour"]], base, ["task_arithmetic", "nearswap"], grid=False, progress=False
    )
    assert [c["params"] for c in no_grid["results"]["task_arithmetic"]["candidates"]] == [{}]
    assert [c["params"] for c in no_grid["results"]["nearswap"]["candidates"]] == [{"t": 1e-3}]
    assert no_grid["results"]["nearswap"]["params"]["t"] == 1e-3
    assert all(torch.equal(v, base[k]) for k, v in Encoder.load(tiny_backbone).state_dict().items())


def test_default_grids_cover_every_method():
    from transfuse.methods import available_methods

    for spec in available_methods(family="data-free"):
        for point in method_grid(spec):
            for name, value in point.items():
                spec.param(name).validate(value)
    assert method_grid(get_method("ties")) == [{"density": d} for d in (0.1, 0.2, 0.3, 0.5, 0.7)]
    assert {"density": 0.5, "lambda": 0.3} in method_grid(get_method("dare_linear"))


def test_default_candidate_fills_required_parameters_from_the_grid():
    from transfuse.eval import EvaluationError
    from transfuse.eval.sweep import default_candidate

    assert default_candidate(get_method("task_arithmetic")) == {}  # every parameter has a default
    assert method_grid(get_method("nearswap")) == [{"t": 1e-4}, {"t": 1e-3}, {"t": 1e-2}]
    assert default_candidate(get_method("nearswap")) == {"t": 1e-3}
    assert default_candidate(get_method("slerp")) == {"t": 0.5}
    # the middle of the values, sorted, whatever the grid's order; the lower middle of an even count
    assert default_candidate(get_method("nearswap"), {"nearswap": {"t": [0.5, 0.01, 0.1]}}) == {"t": 0.1}
    assert default_candidate(get_method("nearswap"), {"nearswap": [{"t": 0.2}, {"t": 0.1}]}) == {"t": 0.1}
    with pytest.raises(EvaluationError, match="no default"):
        default_candidate(get_method("nearswap"), {"nearswap": {}})


def test_cached_sweep_reruns_without_merging_or_evaluating(
    tiny_backbone, suite, trained, tmp_path, monkeypatch
):
    from transfuse.eval.cache import EvaluationCache

    experts, _ = trained
    base = Encoder.load(tiny_backbone).state_dict()
    kwargs = dict(grids=GRIDS, progress=False)
    first = run_method_sweep(
        suite, experts, base, ["task_arithmetic", "dare_ties"], cache=EvaluationCache(tmp_path), **kwargs
    )

    def no_merging(*args, **kw):
        raise AssertionError("a cached sweep merged again")

    def no_evaluating(*args, **kw):
        raise AssertionError("a cached sweep evaluated again")

    monkeypatch.setattr("transfuse.api.merge_state_dicts", no_merging)
    monkeypatch.setattr("transfuse.eval.sweep.evaluate", no_evaluating)
    cache = EvaluationCache(tmp_path)
    again = run_method_sweep(suite, experts, base, ["task_arithmetic", "dare_ties"], cache=cache, **kwargs)
    assert cache.misses == 0 and cache.hits > 0
    assert again["results"] == {
        m: {**r, "seconds": again["results"][m]["seconds"]} for m, r in first["results"].items()
    }
    assert again["correct"] == first["correct"]


@pytest.mark.parametrize("method", ["tsv", "iso_c", "iso_cts"])
def test_output_scale_methods_merge_once_and_rescale(tiny_backbone, trained, method, monkeypatch):
    """alpha only scales the merged delta: the sweep's rescaled merge equals a direct merge at that alpha."""
    from transfuse.eval.sweep import _LazyMerge

    experts, _ = trained
    base = Encoder.load(tiny_backbone).state_dict()
    states = [Encoder.load(e.path).state_dict() for e in experts.values()]
    base = {k: v for k, v in base.items() if k in states[0]}
    spec = get_method(method)
    assert spec.output_scale == "alpha"
    unit = _LazyMerge(spec, base, states, {"alpha": 1.0}, 0, "cpu")
    scaled = _LazyMerge(spec, base, states, {"alpha": 1.7}, 0, "cpu")
    scaled.unit = unit
    direct = merge_state_dicts(base, states, method, alpha=1.7)
    got = scaled.state()
    for name in direct:
        torch.testing.assert_close(got[name], direct[name], rtol=1e-5, atol=1e-6)
    calls = []
    monkeypatch.setattr("transfuse.api.merge_state_dicts", lambda *a, **k: calls.append(1))
    again = _LazyMerge(spec, base, states, {"alpha": 0.5}, 0, "cpu")
    again.unit = unit
    again.state()
    assert calls == []  # the unit merge is reused


def test_statistics_methods_get_each_experts_train_statistics(tiny_backbone, suite, trained, tmp_path):
    from transfuse.eval.expert_statistics import expert_statistics
    from transfuse.models.head import load_heads

    experts, _ = trained
    base = Encoder.load(tiny_backbone).state_dict()
    stats_cache = tmp_path / "stats"
    result = run_method_sweep(
        suite, experts, base, ["regmean", "fisher"], grid=False, progress=False,
        statistics_examples=24, statistics_cache=stats_cache,
    )  # fmt: skip
    assert set(result["results"]) == {"regmean", "fisher"}
    for name in ("regmean", "fisher"):
        data = result["results"][name]["data"]
        assert data["split"] == "train" and data["examples_per_task"] == 24
    assert len(list(stats_cache.glob("*.safetensors"))) == 2  # one file per expert, both kinds in it
    # The reported numbers are those of a merge with statistics computed independently of the sweep.
    stats = []
    for task in suite:
        expert = experts[task.name]
        encoder = Encoder.load(expert.path)
        head = load_heads(expert.path)[task.name]
        stats.append(expert_statistics(encoder, head, task, ["gram"], examples=24))
    states = [e.encoder_state_dict() for e in experts.values()]
    merged = merge_state_dicts(base, states, "regmean", statistics=stats)
    heads = {n: e.path for n, e in experts.items()}
    assert (
        evaluate(merged, heads, suite, backbone_dir=tiny_backbone) == result["results"]["regmean"]["per_task"]
    )
    # Fisher of the train split with sampled labels, checked for the one property the sweep relies on: it is
    # positive somewhere in every linear weight the head depends on (not the unused pooler), so the merge is not
    # the plain average.
    fisher = expert_statistics(Encoder.load(experts["colour"].path), load_heads(experts["colour"].path)["colour"],
                               suite["colour"], ["fisher"], examples=24)  # fmt: skip
    assert all(bool((t > 0).any()) for n, t in fisher.tensors["fisher"].items()
               if n.endswith("dense.weight") and not n.startswith("pooler"))  # fmt: skip
    assert not bool(fisher.tensors["fisher"]["pooler.dense.weight"].any())


def test_emr_is_scored_with_each_tasks_own_parameters(tiny_backbone, suite, trained):
    from transfuse.routed.emr import emr_merge

    experts, _ = trained
    base = Encoder.load(tiny_backbone).state_dict()
    result = run_method_sweep(suite, experts, base, ["emr", "task_arithmetic"], grid=False, progress=False)
    emr = result["results"]["emr"]
    assert emr["family"] == "routed" and "task id" in emr["data"]["uses"]
    assert (
        0 < emr["storage"]["bytes_per_added_task"] < emr["storage"]["full_expert_bytes"] / 20
    )  # ~1 bit/param
    states = {n: e.encoder_state_dict() for n, e in experts.items()}
    routed = emr_merge(base, states, Encoder.from_state_dict(base, tiny_backbone).model)
    for task in suite:
        state = {**base, **routed.task_parameters(task.name)}
        got = evaluate(state, {task.name: experts[task.name].path}, [task], backbone_dir=tiny_backbone)
        assert got[task.name] == emr["per_task"][task.name]
    with pytest.raises(Exception, match="emr"):
        run_method_sweep(suite, experts, base, ["emrr"], progress=False)


def test_regmean_plusplus_runs_in_the_sweep_on_train_examples(tiny_backbone, suite, trained):
    from transfuse.eval.expert_statistics import train_batches
    from transfuse.statistics.regmean_plusplus import regmean_plusplus

    experts, _ = trained
    base = Encoder.load(tiny_backbone).state_dict()
    result = run_method_sweep(
        suite, experts, base, ["regmean_plusplus"], progress=False, statistics_examples=16
    )
    entry = result["results"]["regmean_plusplus"]
    assert "train" in entry["data"]["uses"] and entry["params"] == {"alpha": 0.9}
    encoder = Encoder.from_state_dict(base, tiny_backbone)
    batches = [
        [{k: v for k, v in b.items() if k != "labels"} for b in train_batches(encoder, t, 16)] for t in suite
    ]
    merged = regmean_plusplus(
        encoder.model, base, [e.encoder_state_dict() for e in experts.values()], batches,
        forward=lambda m, b: m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]),
    )  # fmt: skip
    heads = {n: e.path for n, e in experts.items()}
    assert evaluate(merged, heads, suite, backbone_dir=tiny_backbone) == entry["per_task"]


def test_adamerging_adapts_on_unlabeled_test_inputs_and_is_scored_as_a_merge(tiny_backbone, suite, trained):
    experts, _ = trained
    base = Encoder.load(tiny_backbone).state_dict()
    result = run_method_sweep(
        suite, experts, base, ["adamerging_task"], progress=False, adaptive_steps=3, adaptive_budget_s=None,
        backbone_dir=tiny_backbone,
    )  # fmt: skip
    entry = result["results"]["adamerging_task"]
    assert entry["family"] == "test-time" and "unlabeled test inputs" in entry["data"]["uses"]
    assert entry["params"] == {"granularity": "task", "init": 0.3, "steps": 3}
    assert entry["adaptation"]["coefficients"] == 2
    assert entry["adaptation"]["entropy_last"] is not None


def test_wemoe_trains_its_routers_on_test_inputs_and_is_scored_without_task_ids(
    tiny_backbone, suite, trained
):
    experts, _ = trained
    base = Encoder.load(tiny_backbone).state_dict()
    result = run_method_sweep(
        suite, experts, base, ["task_arithmetic", "wemoe"], grid=False, progress=False, adaptive_steps=2,
        adaptive_budget_s=None, backbone_dir=tiny_backbone,
    )  # fmt: skip
    entry = result["results"]["wemoe"]
    assert entry["family"] == "routed" and "no task id" in entry["data"]["uses"]
    assert entry["params"] == {
        "init_lambda": 1.0,
        "steps": 2,
    }  # task arithmetic's lambda (grid off: default 1)
    assert entry["adaptation"]["entropy_first"] is not None
    # each added task stores its MLP task vectors and router rows: less than a whole expert
    assert 0 < entry["storage"]["bytes_per_added_task"] < entry["storage"]["full_expert_bytes"]
    assert len(result["correct"]["wemoe"]["colour"]) == len(suite["colour"].test)


def test_atlas_learns_block_coefficients_from_few_labeled_train_examples(tiny_backbone, suite, trained):
    from collections import Counter

    from transfuse.eval.model_methods import few_shot_examples

    experts, _ = trained
    task = suite["colour"]
    texts, labels = few_shot_examples(task, 2, seed=0)
    train = {(e.text, e.label) for e in task.train}
    assert set(zip(texts, labels)) <= train  # only train examples, never validation or test
    assert all(n == min(2, task.class_counts("train")[c]) for c, n in Counter(labels).items())
    assert set(labels) == {e.label for e in task.train}
    base = Encoder.load(tiny_backbone).state_dict()
    result = run_method_sweep(
        suite, experts, base, ["atlas"], progress=False, adaptive_steps=2, adaptive_budget_s=None,
        backbone_dir=tiny_backbone,
    )  # fmt: skip
    entry = result["results"]["atlas"]
    assert "labeled train examples per class" in entry["data"]["uses"]
    assert entry["params"]["objective"] == "cross_entropy" and entry["params"]["granularity"] == "block"
    assert entry["adaptation"]["steps"] == 2 and entry["adaptation"]["coefficients"] > 2
