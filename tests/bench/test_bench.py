"""`transfuse bench --quick` end to end on TEXT-8 with a tiny random backbone; the report's schema and numbers
re-derived through the evaluation harness; the caches; every documented error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from transfuse import merge_state_dicts
from transfuse.bench import PRESETS, BenchConfig, BenchConfigError, render_markdown, run_bench
from transfuse.bench.config import QUICK_TASKS
from transfuse.cli import app
from transfuse.data import load_task_suite
from transfuse.eval import evaluate
from transfuse.methods import available_methods
from transfuse.models import Encoder
from transfuse.train import load_expert

runner = CliRunner()
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def quick_run(text8_backbone, tmp_path_factory):
    """One cold `transfuse bench --quick` run, then the same command again (warm)."""
    root = tmp_path_factory.mktemp("bench")
    args = ["bench", "--quick", "--backbone", str(text8_backbone), "--cache-dir", str(root / "cache")]
    cold = runner.invoke(app, [*args, "--out", str(root / "cold"), "--no-progress"])
    assert cold.exit_code == 0, cold.output
    warm = runner.invoke(app, [*args, "--out", str(root / "warm"), "--no-progress", "--no-plots"])
    assert warm.exit_code == 0, warm.output
    load = lambda name: json.loads((root / name / "report.json").read_text())  # noqa: E731
    return root, load("cold"), load("warm"), cold.output


def test_quick_writes_every_file(quick_run):
    root, report, _, output = quick_run
    out = root / "cold"
    assert sorted(p.name for p in out.iterdir()) == [
        "normalized.png",
        "per_task.png",
        "report.json",
        "report.md",
    ]
    for png in ("normalized.png", "per_task.png"):
        assert (out / png).read_bytes()[:8] == PNG_MAGIC
    markdown = (out / "report.md").read_text()
    assert markdown == render_markdown(report)
    assert "| task_arithmetic |" in markdown and "*multitask*" in markdown
    assert "task_arithmetic" in output and "wrote" in output  # the table printed at the end


def test_report_schema(quick_run):
    _, report, _, _ = quick_run
    assert report["schema"] == 1 and report["pool"] == "text8"
    assert report["tasks"] == list(QUICK_TASKS)
    expected_methods = {
        s.name for s in available_methods(family="data-free") if s.max_models is None or s.max_models >= 3
    }
    assert set(report["results"]) == {"pretrained", "individual", "multitask"} | expected_methods
    assert "slerp" in report["skipped"]
    for name, row in report["results"].items():
        assert row["kind"] == ("baseline" if name in ("pretrained", "individual", "multitask") else "method")
        assert set(row["per_task"]) == set(QUICK_TASKS)
        assert row["mean"] == pytest.approx(sum(row["per_task"].values()) / len(QUICK_TASKS))
        individual = report["results"]["individual"]["per_task"]
        ratios = [row["per_task"][t] / individual[t] for t in QUICK_TASKS]
        assert row["normalized"] == pytest.approx(sum(ratios) / len(ratios))
        assert isinstance(row["params"], dict)
    assert report["results"]["individual"]["normalized"] == pytest.approx(1.0)
    assert report["config"]["preset"] == "quick" and report["config"]["steps"] == PRESETS["quick"]["steps"]
    assert set(report["experts"]) == set(QUICK_TASKS)
    assert report["multitask"]["steps"] == PRESETS["quick"]["steps"] * len(QUICK_TASKS)
    assert "vs_task_arithmetic" in report["results"]["ties"]


def test_report_numbers_match_the_harness(quick_run, text8_backbone):
    """Re-derive three rows with evaluate() on the same test examples: pretrained, individual, a merge."""
    _, report, _, _ = quick_run
    suite = load_task_suite("text8", tasks=list(QUICK_TASKS), max_train=200)
    n = report["config"]["test_examples"]
    experts = {t: load_expert(report["experts"][t]["path"]) for t in QUICK_TASKS}
    heads = {t: e.path for t, e in experts.items()}
    base = Encoder.load(text8_backbone).state_dict()

    pretrained = evaluate(base, heads, suite, max_examples=n, backbone_dir=text8_backbone)
    assert pretrained == pytest.approx(report["results"]["pretrained"]["per_task"], abs=1e-9)
    for task in suite:
        own = evaluate(experts[task.name].path, heads, [task], max_examples=n)
        assert own[task.name] == pytest.approx(
            report["results"]["individual"]["per_task"][task.name], abs=1e-9
        )

    params = report["results"]["task_arithmetic"]["params"]
    merged = merge_state_dicts(
        base,
        [experts[t].encoder_state_dict() for t in QUICK_TASKS],
        "task_arithmetic",
        **{k: v for k, v in params.items() if k != "int8_mask"},
    )
    acc = evaluate(merged, heads, suite, max_examples=n, backbone_dir=text8_backbone)
    assert acc == pytest.approx(report["results"]["task_arithmetic"]["per_task"], abs=1e-9)

    # the weight average, formed by hand (no merge code): the report's `linear` row
    states = [experts[t].encoder_state_dict() for t in QUICK_TASKS]
    average = {
        k: (sum(s[k].double() for s in states) / len(states)).to(v.dtype) if v.is_floating_point() else v
        for k, v in base.items()
    }
    acc = evaluate(average, heads, suite, max_examples=n, backbone_dir=text8_backbone)
    assert acc == pytest.approx(report["results"]["linear"]["per_task"], abs=1e-9)


def test_warm_run_trains_and_evaluates_nothing_again(quick_run):
    _, cold, warm, _ = quick_run
    assert sorted(cold["run"]["trained_now"]["experts"]) == sorted(QUICK_TASKS)
    assert cold["run"]["trained_now"]["multitask"] is True
    assert warm["run"]["trained_now"] == {"experts": [], "multitask": False}
    assert warm["run"]["evaluation_cache"]["misses"] == 0 and warm["run"]["evaluation_cache"]["hits"] > 0
    for name, row in cold["results"].items():
        assert warm["results"][name]["per_task"] == row["per_task"], name


def test_without_evaluation_cache(text8_backbone, tmp_path):
    config = BenchConfig.preset_config(
        "quick", backbone=str(text8_backbone), methods=("task_arithmetic",), tasks=QUICK_TASKS[:2], steps=5
    )
    report = run_bench(config, cache_dir=tmp_path, evaluation_cache=False, progress=False)
    assert report["run"]["evaluation_cache"] is None
    assert set(report["results"]) == {"pretrained", "individual", "multitask", "task_arithmetic"}
    assert not (tmp_path / "evaluations").exists()


def test_a_folder_of_user_task_files_benchmarks_end_to_end(text8_backbone, tmp_path):
    # the user's own pool: one CSV / JSONL per task, no manifest
    pool = tmp_path / "my_pool"
    pool.mkdir()
    text8 = load_task_suite("text8", max_train=24)
    for name, suffix in (("bing_sentiment", ".csv"), ("wordnet_pos", ".jsonl")):
        task = text8[name]
        rows = [
            (e.text, task.label_names[e.label], split)
            for split in ("train", "test")
            for e in task.split(split)[:24]
        ]
        if suffix == ".csv":
            lines = ["text,label,split"] + [
                f'"{t.replace(chr(34), chr(39))}",{lab},{sp}' for t, lab, sp in rows
            ]
            (pool / f"mine_{name}{suffix}").write_text("\n".join(lines) + "\n")
        else:
            recs = [json.dumps({"text": t, "label": lab, "split": sp}) for t, lab, sp in rows]
            (pool / f"mine_{name}{suffix}").write_text("\n".join(recs) + "\n")
    args = ["bench", "--quick", "--pool", str(pool), "--methods", "task_arithmetic", "--steps", "3"]
    args += [
        "--backbone",
        str(text8_backbone),
        "--cache-dir",
        str(tmp_path / "cache"),
        "--out",
        str(tmp_path / "out"),
    ]
    result = runner.invoke(app, [*args, "--no-progress", "--no-plots"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["tasks"] == ["mine_bing_sentiment", "mine_wordnet_pos"]
    assert set(report["results"]["task_arithmetic"]["per_task"]) == set(report["tasks"])


# ---- errors, before any work -------------------------------------------------------------------------------


def _fails(args: list[str], *needles: str) -> None:
    result = runner.invoke(app, ["bench", *args, "--no-progress"])
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())  # rich wraps long messages
    for needle in needles:
        assert needle in text


def test_unknown_method_fails_before_training(text8_backbone, tmp_path):
    _fails(
        [
            "--quick",
            "--backbone",
            str(text8_backbone),
            "--cache-dir",
            str(tmp_path),
            "--methods",
            "ties,nope",
        ],
        "UnknownMethodError",
        "nope",
    )
    assert not (tmp_path / "experts").exists()


def test_cli_errors(text8_backbone, tmp_path):
    common = ["--backbone", str(text8_backbone), "--cache-dir", str(tmp_path)]
    _fails(["--quick", "--full", *common], "choose one")
    _fails(["--quick", "--grid", "huge", *common], "BenchConfigError", "grid")
    _fails(["--quick", "--steps", "0", *common], "steps must be a positive integer")
    _fails(["--quick", "--backbone", str(tmp_path)], "BackboneNotFoundError", "config.json")
    _fails(["--quick", "--tasks", "bing_sentiment", *common], "at least two experts")
    _fails(["--quick", "--tasks", "no_such_task", *common], "no_such_task")
    _fails(["--quick", "--pool", str(tmp_path / "missing.csv"), *common], "missing.csv")
    if not torch.cuda.is_available():
        _fails(["--quick", "--device", "cuda", *common], "no CUDA GPU")
    assert not (tmp_path / "experts").exists()


def test_config_validation():
    assert BenchConfig.preset_config("full").test_examples is None
    assert BenchConfig.preset_config("default", steps=7).steps == 7
    with pytest.raises(BenchConfigError, match="unknown preset"):
        BenchConfig.preset_config("fast")
    with pytest.raises(BenchConfigError, match="unknown benchmark option"):
        BenchConfig.preset_config("quick", stepz=3)
    with pytest.raises(BenchConfigError, match="test_examples"):
        BenchConfig(test_examples=0)
    with pytest.raises(BenchConfigError, match="methods is empty"):
        BenchConfig(methods=())


def test_nan_becomes_null_in_report_json(tmp_path, quick_run):
    from transfuse.bench import write_report

    _, report, _, _ = quick_run
    broken = json.loads(json.dumps(report))
    broken["results"]["ties"]["normalized"] = float("nan")
    write_report(broken, tmp_path, plots=True)
    assert json.loads((tmp_path / "report.json").read_text())["results"]["ties"]["normalized"] is None
    assert "| ties |" in (tmp_path / "report.md").read_text()
    assert Path(tmp_path / "normalized.png").read_bytes()[:8] == PNG_MAGIC
