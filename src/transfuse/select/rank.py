"""Rank candidate source models for a target task with a transferability metric, without fine-tuning any.

Each candidate is an encoder directory (a Hugging Face model dir, e.g. a backbone, a transfuse expert or a merged
model).  Its mean-pooled features of the target's training texts are scored with the metric against the
target's labels; the candidates are returned best first.

Feature metrics (:data:`FEATURE_METRICS`) need only the encoder.  ``leep`` and ``nce`` score the candidate's own
classifier (its task head over the SOURCE label set), so they need a candidate with exactly one head (a transfuse
expert); for other candidates they are an error that says so.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

import transfuse.select as select  # the metric functions, looked up by name
from transfuse.data.task import Task
from transfuse.errors import TransfuseError
from transfuse.models.backbone import Encoder, resolve_backbone_dir
from transfuse.models.head import load_heads


class RankingError(TransfuseError, ValueError):
    """A ranking request cannot be served: unknown metric, no candidates, a candidate without what a metric needs."""


# The one list of metric names (the CLI, the experiments and the tests take theirs from here); each is the name of
# a function of transfuse.select.
FEATURE_METRICS = ("logme", "nleep", "h_score", "shrinkage_h_score", "gbc", "transrate", "sfda", "tmi")
HEAD_METRICS = ("leep", "nce")
METRICS = FEATURE_METRICS + HEAD_METRICS


@dataclass(frozen=True)
class RankedCandidate:
    """One candidate's score (higher = expected to transfer better) and rank (1 = best)."""

    name: str
    path: str
    score: float
    rank: int
    metric: str
    seconds: float
    num_parameters: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def rank_sources(
    target: Task,
    candidates: Mapping[str, str | Path] | Sequence[str | Path],
    metric: str = "logme",
    *,
    split: str = "train",
    max_examples: int | None = 2000,
    max_length: int = 48,
    batch_size: int = 64,
    device: str = "cpu",
    log: Callable[[str], None] | None = None,
) -> list[RankedCandidate]:
    """Score every candidate encoder on `target` with `metric`; best first.

    - `candidates`: ``{name: model dir}`` or model dirs (named by :func:`candidate_name`);
    - `split` / `max_examples`: the target examples whose features are scored (the first `max_examples`
      of the split; the stored order is shuffled);
    - `metric`: one of :data:`METRICS`.
    """
    table = score_candidates(
        target,
        candidates,
        [metric],
        split=split,
        max_examples=max_examples,
        max_length=max_length,
        batch_size=batch_size,
        device=device,
        log=log,
    )
    rows = sorted(table, key=lambda row: _sort_key(row["scores"][metric]))
    return [
        RankedCandidate(
            row["name"],
            row["path"],
            row["scores"][metric],
            i + 1,
            metric,
            row["seconds"],
            row["num_parameters"],
        )
        for i, row in enumerate(rows)
    ]


def score_candidates(
    target: Task,
    candidates: Mapping[str, str | Path] | Sequence[str | Path],
    metrics: Sequence[str],
    *,
    split: str = "train",
    max_examples: int | None = 2000,
    max_length: int = 48,
    batch_size: int = 64,
    device: str = "cpu",
    log: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Every candidate scored by every metric in `metrics`, embedding the target's texts once per candidate.

    Returns ``[{"name", "path", "scores": {metric: value}, "seconds", "num_parameters"}]`` in candidate order.
    """
    unknown = [m for m in metrics if m not in METRICS]
    if unknown or not metrics:
        raise RankingError(f"unknown metric(s) {unknown or metrics}; choose from {', '.join(METRICS)}")
    named = _named(candidates)
    if not named:
        raise RankingError("no candidates to rank")
    examples = target.split(split)
    if max_examples is not None:
        examples = examples[:max_examples]
    if len({e.label for e in examples}) < 2:
        raise RankingError(f"task {target.name!r} has fewer than two classes in its {split!r} examples")
    # Fail before any work: every candidate exists, and has a head where a metric needs one.
    for name, path in named.items():
        resolve_backbone_dir(path)
        if any(m in HEAD_METRICS for m in metrics):
            _single_head(name, path)
    texts = [e.text for e in examples]
    labels = torch.tensor([e.label for e in examples])
    say = log or (lambda _msg: None)

    rows: list[dict[str, Any]] = []
    for name, path in named.items():
        start = time.perf_counter()
        encoder = Encoder.load(path, device=device)
        features = encoder.encode(texts, max_length=max_length, batch_size=batch_size).cpu()
        scores = {m: _score(m, name, path, features, labels) for m in metrics}
        seconds = time.perf_counter() - start
        rows.append(
            {
                "name": name,
                "path": str(path),
                "scores": scores,
                "seconds": round(seconds, 3),
                "num_parameters": sum(p.numel() for p in encoder.model.parameters()),
            }
        )
        say(f"{name}: " + ", ".join(f"{m} {v:.4f}" for m, v in scores.items()) + f" ({seconds:.1f} s)")
        del encoder
    return rows


def _sort_key(value: float) -> float:
    return float("inf") if math.isnan(value) else -value  # best first, NaN last


def _score(metric: str, name: str, path: Path, features: torch.Tensor, labels: torch.Tensor) -> float:
    if metric in FEATURE_METRICS:
        return float(getattr(select, metric)(features, labels))
    head = _single_head(name, path)
    with torch.inference_mode():
        logits = head(features)
    if metric == "leep":
        return float(select.leep(torch.softmax(logits.double(), dim=1), labels))
    return float(select.nce(logits.argmax(dim=1), labels))


def _single_head(name: str, path: Path) -> Any:
    try:
        heads = load_heads(path)
    except TransfuseError:
        heads = {}
    if len(heads) != 1:
        raise RankingError(
            f"candidate {name!r} ({path}) has {len(heads)} task heads; leep and nce score a candidate's own "
            "classifier, so they need exactly one (a transfuse expert). Use a feature metric such as logme."
        )
    return next(iter(heads.values()))


def candidate_name(path: str | Path) -> str:
    """How a candidate dir is named in a ranking: a transfuse expert by its task (its folder is a recipe hash),
    any other dir by its folder name."""
    path = Path(path)
    return _expert_name(path) or path.name or str(path)


def _expert_name(path: Path) -> str | None:
    import json

    try:
        info = json.loads((path / "expert.json").read_text())
    except (OSError, ValueError):
        return None
    tasks = info.get("tasks") or []
    return f"{tasks[0]} expert" if len(tasks) == 1 else "multitask" if tasks else None


def _named(candidates: Mapping[str, str | Path] | Sequence[str | Path]) -> dict[str, Path]:
    if isinstance(candidates, Mapping):
        return {str(k): Path(v) for k, v in candidates.items()}
    named: dict[str, Path] = {}
    for item in candidates:
        path = Path(item)
        name = candidate_name(path)
        while name in named:  # two folders with one name: keep both, distinguishable
            name = f"{name}'"
        named[name] = path
    return named
