"""The report's two figures (matplotlib, no display needed): normalized accuracy per model, accuracy per task."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from transfuse.bench.report import ordered_rows


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)  # files only: works without a display
    import matplotlib.pyplot as plt

    return plt


def plot_normalized(report: Mapping[str, Any], path: str | Path) -> Path:
    """Horizontal bars: each method's normalized accuracy, best at the top; baselines as vertical lines."""
    plt = _pyplot()
    results = report["results"]
    methods = [n for n in ordered_rows(report) if results[n]["kind"] == "method"]
    values = [_value(results[n]["normalized"]) for n in methods]
    fig, ax = plt.subplots(figsize=(7.5, 0.35 * max(len(methods), 3) + 1.6), layout="constrained")
    ax.barh(range(len(methods)), values, color="#4c72b0")
    ax.set_yticks(range(len(methods)), methods)
    ax.invert_yaxis()
    for i, v in enumerate(values):
        if not math.isnan(v):
            ax.text(v, i, f" {v:.3f}", va="center", fontsize=8)
    styles = {"pretrained": ("#c44e52", "--"), "multitask": ("#55a868", "-."), "individual": ("#333333", ":")}
    for name, (color, style) in styles.items():
        if name in results:
            x = _value(results[name]["normalized"])
            ax.axvline(x, color=color, linestyle=style, label=f"{name} ({x:.3f})")
    finite = [v for v in values if not math.isnan(v)] + [
        _value(results[n]["normalized"]) for n in styles if n in results
    ]
    finite = [v for v in finite if not math.isnan(v)]
    low = min(finite, default=0.0)
    ax.set_xlim(max(0.0, low - 0.05), max(finite, default=1.0) + 0.06)
    ax.set_xlabel("normalized accuracy (merged / expert, mean over tasks)")
    ax.set_title(f"{report['pool']}: {len(report['tasks'])} tasks, {report['config']['preset']} preset")
    ax.legend(loc="lower right", fontsize=8)
    fig.savefig(path, dpi=120, format="png")
    plt.close(fig)
    return Path(path)


def plot_per_task(report: Mapping[str, Any], path: str | Path) -> Path:
    """Heat map of test accuracy: one row per model (baselines first), one column per task."""
    plt = _pyplot()
    results = report["results"]
    tasks = report["tasks"]
    rows = ordered_rows(report)
    grid = [[_value(results[r]["per_task"].get(t)) for t in tasks] for r in rows]
    fig, ax = plt.subplots(figsize=(1.0 * len(tasks) + 3.0, 0.35 * len(rows) + 2.0), layout="constrained")
    image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(len(tasks)), tasks, rotation=35, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            if not math.isnan(v):
                ax.text(
                    j,
                    i,
                    f"{v:.2f}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if v < 0.6 else "black",
                )
    fig.colorbar(image, ax=ax, label="test accuracy")
    ax.set_title("accuracy per task")
    fig.savefig(path, dpi=120, format="png")
    plt.close(fig)
    return Path(path)


def _value(x: Any) -> float:
    return float(x) if isinstance(x, (int, float)) else math.nan
