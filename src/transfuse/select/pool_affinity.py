"""Measure task affinity on a pool of experts and write it out: ``affinity.json``, ``affinity.md``, heat maps.

>>> result = measure_affinity(suite, experts, Encoder.load().state_dict(), max_examples=150)
>>> write_affinity(result, "affinity-report")
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from transfuse.data.task import Task, TaskSuite
from transfuse.io.files import json_safe, write_atomically
from transfuse.select.affinity import (
    cosine_matrix,
    interference_matrix,
    predictiveness,
    sign_conflict_matrix,
    task_vectors,
)


def measure_affinity(
    suite: TaskSuite | Sequence[Task],
    experts: Mapping[str, Any],
    base: Mapping[str, torch.Tensor],
    *,
    lambda_: float = 1.0,
    density: float = 0.2,
    max_examples: int | None = 150,
    max_length: int = 48,
    device: str = "cpu",
    backbone_dir: str | Path | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Cosine, sign-conflict and measured-interference matrices of `experts` (``{task: Expert | dir}``) on
    `suite`'s test split (first `max_examples` per task), and how well the cheap signals predict interference.

    The pairwise merge is task arithmetic with `lambda_`. The default 1.0 keeps each task vector whole, so an accuracy
    drop comes from the other task's vector; 0.5 (the average) also halves each vector, which mixes dilution
    into the measure. The sign
    conflicts are counted on the top-`density` entries of each task vector.
    """
    from transfuse.api import merge_state_dicts
    from transfuse.eval import evaluate
    from transfuse.models.backbone import Encoder
    from transfuse.models.head import load_heads

    tasks = {t.name: t for t in suite}
    names = [n for n in tasks if n in experts]
    dirs = {n: Path(getattr(experts[n], "path", experts[n])) for n in names}
    states = {n: Encoder.load(dirs[n]).state_dict() for n in names}
    base = {k: v for k, v in base.items() if k in states[names[0]]} if names else dict(base)
    vectors = task_vectors(base, states)
    cosine = cosine_matrix(vectors)
    conflicts = sign_conflict_matrix(vectors, density=density)
    del vectors

    heads = {n: load_heads(dirs[n], device=device)[n] for n in names}
    architecture = backbone_dir if backbone_dir is not None else dirs[names[0]]
    encoder = Encoder.from_state_dict(base, architecture, device=device)
    eval_kwargs = dict(max_examples=max_examples, max_length=max_length, device=device)

    def accuracy(state: Mapping[str, torch.Tensor], on: Sequence[str]) -> dict[str, float]:
        encoder.load_state_dict(state)
        return evaluate(encoder, {n: heads[n] for n in on}, [tasks[n] for n in on], **eval_kwargs)

    expert_accuracy = {n: accuracy(states[n], [n])[n] for n in names}
    pretrained_accuracy = accuracy(base, names)

    def merge_pair(a: str, b: str) -> dict[str, torch.Tensor]:
        return merge_state_dicts(base, [states[a], states[b]], "task_arithmetic", **{"lambda": lambda_})

    interference, pair_accuracy = interference_matrix(names, merge_pair, accuracy, expert_accuracy, log=log)
    return {
        "tasks": names,
        "settings": {
            "merge": "task_arithmetic",
            "lambda": lambda_,
            "density": density,
            "max_examples": max_examples,
            "split": "test",
        },
        "expert_accuracy": expert_accuracy,
        "pretrained_accuracy": pretrained_accuracy,
        "pair_accuracy": pair_accuracy,
        "matrices": {
            "cosine": cosine.tolist(),
            "sign_conflict": conflicts.tolist(),
            "interference": interference.tolist(),
        },
        "predicts_interference": {
            "cosine": predictiveness(cosine, interference),
            "sign_conflict": predictiveness(conflicts, interference),
        },
    }


def render_affinity_markdown(result: Mapping[str, Any]) -> str:
    names = result["tasks"]
    s = result["settings"]
    lines = [
        f"# Task affinity of {len(names)} experts",
        "",
        f"Pairwise task-arithmetic merges (lambda={s['lambda']}) scored on the first {s['max_examples'] or 'all'} "
        f"test examples per task; sign conflicts among the top-{s['density']:.0%} entries of each task vector.",
        "",
        "| cheap signal | Spearman vs interference | Kendall vs interference | pairs |",
        "|---|---:|---:|---:|",
    ]
    for signal, stats in result["predicts_interference"].items():
        lines.append(f"| {signal} | {_f(stats['spearman'])} | {_f(stats['kendall'])} | {stats['pairs']} |")
    lines += [
        "",
        "A useful signal has cosine correlating negatively and sign conflict positively with interference.",
    ]
    titles = {
        "cosine": "Task-vector cosine similarity",
        "sign_conflict": "Sign-conflict rate",
        "interference": "Measured interference (accuracy drop, points)",
    }
    for key, title in titles.items():
        matrix = np.asarray(result["matrices"][key]) * (100 if key == "interference" else 1)
        lines += ["", f"## {title}", "", "| | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
        for name, row in zip(names, matrix):
            lines.append(
                f"| {name} | " + " | ".join(_f(v, 1 if key == "interference" else 3) for v in row) + " |"
            )
    return "\n".join(lines) + "\n"


def write_affinity(result: Mapping[str, Any], out_dir: str | Path, *, plots: bool = True) -> list[Path]:
    """Write ``affinity.json``, ``affinity.md`` and (with `plots`) ``affinity.png`` into `out_dir`, each
    file renamed into place only when complete."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = [
        write_atomically(
            out / "affinity.json", lambda p: p.write_text(json.dumps(json_safe(result), indent=2) + "\n")
        ),
        write_atomically(out / "affinity.md", lambda p: p.write_text(render_affinity_markdown(result))),
    ]
    if plots:
        written.append(write_atomically(out / "affinity.png", lambda p: _plot(result, p)))
    return written


def _plot(result: Mapping[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    names = result["tasks"]
    keys = [("cosine", "task-vector cosine", "coolwarm"), ("sign_conflict", "sign conflict", "viridis")]
    keys.append(("interference", "interference (points)", "magma_r"))
    fig, axes = plt.subplots(
        1, 3, figsize=(6 + 1.6 * len(names), 0.55 * len(names) + 2.5), layout="constrained"
    )
    for ax, (key, title, cmap) in zip(axes, keys):
        matrix = np.asarray(result["matrices"][key], dtype=float) * (100 if key == "interference" else 1)
        shown = matrix.copy()
        np.fill_diagonal(shown, np.nan)  # the diagonal is trivial (1 or 0): keep it out of the colour scale
        image = ax.imshow(shown, cmap=cmap)
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(len(names)), names, fontsize=7)
        ax.set_title(title, fontsize=9)
        for i, row in enumerate(shown):
            for j, v in enumerate(row):
                if not math.isnan(v):
                    r, g, b, _ = image.cmap(image.norm(v))
                    ink = (
                        "white" if 0.299 * r + 0.587 * g + 0.114 * b < 0.5 else "black"
                    )  # readable on any cell
                    text = f"{v:.2f}" if key != "interference" else f"{v:.1f}"
                    ax.text(j, i, text, ha="center", va="center", fontsize=6, color=ink)
        fig.colorbar(image, ax=ax, shrink=0.8)
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


def _f(x: float, digits: int = 3) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"
