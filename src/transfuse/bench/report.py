"""The benchmark's report: one JSON document, a markdown rendering of it, and the files written to the out dir.

``report.json`` (schema version 1)::

    {"schema": 1, "pool": "text8", "tasks": [...],
     "results": {"<baseline or method>": {"kind": "baseline" | "method",
                                          "per_task": {task: acc}, "mean": m, "normalized": n,
                                          "gain_retained": g | null, "params": {...},
                                          # methods only:
                                          "chosen_on": "validation" | "defaults (no grid)",
                                          "candidates": [{"params": ..., "validation_mean": v} | {..., "error"}],
                                          "seconds": s,
                                          "vs_task_arithmetic": {"difference", "low", "high", "p_value"}}},
     "skipped": {method: reason},
     "experts": {task: {"path", "test_accuracy", "train_seconds", "recipe_hash"}},
     "multitask": {"path", "steps", "test_accuracy"},
     "config": {...BenchConfig...}, "run": {"timings": {...}, "evaluation_cache": {...}, ...}}

The baselines are ``pretrained`` (the backbone with each expert's head), ``individual`` (each expert on its own
task) and ``multitask`` (one encoder trained on all tasks with the same total budget).  ``normalized`` divides
by ``individual``'s per-task accuracy; ``gain_retained`` is the share of the experts' gain over ``pretrained``
that is kept (see :mod:`transfuse.eval.metrics`).  ``vs_task_arithmetic`` is a paired bootstrap of the
mean-accuracy difference on the same test items (1000 resamples, 95% interval).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from transfuse.bench.config import BenchConfig
from transfuse.eval.metrics import paired_bootstrap
from transfuse.io.files import json_safe, write_atomically, write_text_atomically

REPORT_SCHEMA = 1
BASELINES = ("pretrained", "individual", "multitask")
REFERENCE_METHOD = "task_arithmetic"


def build_report(
    config: BenchConfig,
    sweep: Mapping[str, Any],
    experts: Mapping[str, Any],
    multitask: Any,
    run_info: Mapping[str, Any],
) -> dict[str, Any]:
    """Assemble ``report.json``'s content from a sweep (:func:`~transfuse.eval.run_method_sweep`) and its models."""
    results: dict[str, Any] = {}
    baseline_params = {
        "pretrained": {"backbone": run_info.get("backbone"), "heads": "each expert's own"},
        "individual": {"steps": config.steps, "batch_size": config.batch_size, "seed": config.seed},
        "multitask": {
            "steps": multitask.info["recipe"]["steps"] if multitask is not None else None,
            "schedule": "round-robin over tasks, same total budget as the experts",
        },
    }
    for name in BASELINES:
        if name in sweep["baselines"]:
            results[name] = {"kind": "baseline", **sweep["baselines"][name], "params": baseline_params[name]}
    correct = sweep.get("correct", {})
    for name, entry in sweep["results"].items():
        row = {"kind": "method", **{k: v for k, v in entry.items() if k != "overrides"}}
        if name != REFERENCE_METHOD and REFERENCE_METHOD in correct and name in correct:
            boot = paired_bootstrap(correct[name], correct[REFERENCE_METHOD], seed=config.seed)
            row["vs_task_arithmetic"] = {
                "difference": boot.difference,
                "low": boot.low,
                "high": boot.high,
                "p_value": boot.p_value,
            }
        results[name] = row
    return {
        "schema": REPORT_SCHEMA,
        "pool": config.pool,
        "tasks": list(sweep["tasks"]),
        "results": results,
        "skipped": dict(sweep.get("skipped", {})),
        "experts": {
            task: {
                "path": str(e.path),
                "test_accuracy": e.test_accuracy.get(task),
                "train_seconds": e.info.get("train_seconds"),
                "recipe_hash": e.recipe_hash,
            }
            for task, e in experts.items()
        },
        "multitask": (
            {
                "path": str(multitask.path),
                "steps": multitask.info["recipe"]["steps"],
                "test_accuracy": multitask.test_accuracy,
            }
            if multitask is not None
            else None
        ),
        "config": config.to_dict(),
        "run": dict(run_info),
    }


def ordered_rows(report: Mapping[str, Any]) -> list[str]:
    """Result names in display order: baselines first, then methods by normalized accuracy (best first)."""
    results = report["results"]
    baselines = [n for n in BASELINES if n in results]
    methods = [n for n in results if results[n].get("kind") != "baseline"]
    methods.sort(key=lambda n: (-_num(results[n]["normalized"]), n))
    return baselines + methods


def render_markdown(report: Mapping[str, Any]) -> str:
    """The report as a markdown page: the main table, per-task accuracies, what was skipped, timings."""
    config = report["config"]
    results = report["results"]
    tasks = report["tasks"]
    run = report.get("run", {})
    lines = [
        f"# transfuse bench: {report['pool']} ({config['preset']} preset)",
        "",
        f"{len(tasks)} tasks, experts fine-tuned {config['steps']} steps each (batch {config['batch_size']}, "
        f"length {config['max_length']}, seed {config['seed']}); test: "
        f"{_count(config['test_examples'])} examples per task; parameters chosen on "
        f"{_count(config['validation_examples'])} validation examples per task (grid: {config['grid']}).",
        "",
        "| model | params | mean acc | normalized | gain kept | vs task arithmetic [95% CI] |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for name in ordered_rows(report):
        row = results[name]
        data = row.get("data")
        label = f"{name} (+data)" if data else name
        lines.append(
            f"| {'*' + name + '*' if row['kind'] == 'baseline' else label} | {tuned_params(row)} "
            f"| {_fmt(row['mean'])} | {_fmt(row['normalized'])} | {_fmt(row.get('gain_retained'))} "
            f"| {_versus(row.get('vs_task_arithmetic'))} |"
        )
    lines += [
        "",
        "*normalized*: mean over tasks of accuracy / the task's expert's accuracy. *gain kept*: mean share of each "
        "expert's gain over the pretrained encoder that the model keeps. Baselines in italics.",
    ]
    with_data = [n for n in ordered_rows(report) if results[n].get("data")]
    if with_data:
        lines.append("")
        for name in with_data:
            d = results[name]["data"]
            if "uses" in d:
                storage = results[name].get("storage")
                extra = (
                    f"; {storage['bytes_per_added_task'] / 1e6:.2f} MB per added task "
                    f"({storage['bytes_per_added_task'] / storage['full_expert_bytes']:.1%} of an expert)"
                    if storage
                    else ""
                )
                lines.append(f"*{name} (+data)*: {results[name].get('family', '')}, uses {d['uses']}{extra}.")
                continue
            lines.append(
                f"*{name} (+data)*: also uses {', '.join(d['statistics'])} statistics of each expert on "
                f"{d['examples_per_task']} {d['split']} examples per task ({d.get('statistics_seconds', 0):.0f} s)."
            )
    lines += [
        "",
        "## Accuracy per task",
        "",
        "| model | " + " | ".join(tasks) + " |",
        "|---|" + "---:|" * len(tasks),
    ]
    for name in ordered_rows(report):
        per_task = results[name]["per_task"]
        lines.append(f"| {name} | " + " | ".join(_fmt(per_task.get(t)) for t in tasks) + " |")
    if report.get("skipped"):
        lines += ["", "## Skipped", ""]
        lines += [f"- {name}: {reason}" for name, reason in report["skipped"].items()]
    timings = run.get("timings", {})
    if timings:
        trained = run.get("trained_now", {})
        cache = run.get("evaluation_cache") or {}
        lines += [
            "",
            "## Run",
            "",
            f"- total {timings.get('total_s', 0):.0f} s: experts {timings.get('experts_s', 0):.0f} s "
            f"({len(trained.get('experts', []))} trained now), multi-task {timings.get('multitask_s', 0):.0f} s "
            f"({'trained now' if trained.get('multitask') else 'cached'}), sweep {timings.get('sweep_s', 0):.0f} s"
            + (f" ({cache.get('hits', 0)} evaluations from the cache)" if cache else ""),
            f"- environment: {json.dumps(run.get('environment', {}))}",
        ]
    return "\n".join(lines) + "\n"


def write_report(report: Mapping[str, Any], out_dir: str | Path, *, plots: bool = True) -> list[Path]:
    """Write ``report.json``, ``report.md`` and (with `plots`) the PNG plots into `out_dir`.

    Each file is written beside its final name and renamed into place when complete; other files in
    `out_dir` are left alone.  Returns the paths written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = [
        write_text_atomically(
            out / "report.json", json.dumps(json_safe(report), indent=2, allow_nan=False) + "\n"
        ),
        write_text_atomically(out / "report.md", render_markdown(report)),
    ]
    if plots:
        from transfuse.bench.plots import plot_normalized, plot_per_task

        for name, draw in (("normalized.png", plot_normalized), ("per_task.png", plot_per_task)):
            written.append(write_atomically(out / name, lambda tmp, draw=draw: draw(report, tmp)))
    return written


def _num(x: Any) -> float:
    return float(x) if isinstance(x, (int, float)) and not math.isnan(x) else -math.inf


def _fmt(x: Any) -> str:
    return f"{x:.3f}" if isinstance(x, (int, float)) and not math.isnan(x) else "—"


def _count(n: int | None) -> str:
    return "all" if n is None else str(n)


def tuned_params(row: Mapping[str, Any]) -> str:
    """The chosen values of the parameters a method's grid varied (``defaults`` if none; ``""`` for a baseline)."""
    if row["kind"] == "baseline":
        return ""
    tuned = {k for candidate in row.get("candidates", []) for k in candidate.get("params", {})}
    return ", ".join(f"{k}={v}" for k, v in row.get("params", {}).items() if k in tuned) or "defaults"


def _versus(entry: Mapping[str, float] | None) -> str:
    if not entry:
        return ""
    return f"{100 * entry['difference']:+.1f} [{100 * entry['low']:+.1f}, {100 * entry['high']:+.1f}]"
