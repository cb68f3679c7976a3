"""Scores of a merged model relative to its experts, and a paired bootstrap for comparing two methods.

All functions take ``{task: accuracy}`` dicts (as :func:`transfuse.eval.evaluate` returns) and average over the
tasks of the first argument with equal weight per task.

- mean accuracy:        ``(1/T) sum_t merged_t``
- normalized accuracy:  ``(1/T) sum_t merged_t / expert_t``  (Ilharco et al. 2023; Yadav et al. 2023)
- gain retained:        ``(1/T) sum_t (merged_t - pretrained_t) / (expert_t - pretrained_t)``

Why both of the last two: with strong task heads the pretrained encoder alone often reaches 80-86% normalized
accuracy (measured on TEXT-8, see ``DATA.md``), which compresses every method into the top fifth of the scale.
Gain retained puts the pretrained floor at 0 and the expert at 1, so it separates methods better; it is
undefined for a task whose expert does not beat the pretrained encoder, and such tasks are left out.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np


def _check_tasks(merged: Mapping[str, float], *references: Mapping[str, float]) -> list[str]:
    tasks = list(merged)
    if not tasks:
        raise ValueError("no tasks: the accuracy dict is empty")
    for ref in references:
        missing = [t for t in tasks if t not in ref]
        if missing:
            raise KeyError(f"no reference accuracy for tasks {missing}")
    return tasks


def mean_accuracy(accuracy: Mapping[str, float]) -> float:
    """Mean of the per-task accuracies (each task weighs the same, whatever its size)."""
    tasks = _check_tasks(accuracy)
    return float(sum(accuracy[t] for t in tasks) / len(tasks))


def per_task_normalized(merged: Mapping[str, float], experts: Mapping[str, float]) -> dict[str, float]:
    """``merged[t] / experts[t]`` per task (``nan`` where the expert scores 0)."""
    return {t: merged[t] / experts[t] if experts[t] else math.nan for t in _check_tasks(merged, experts)}


def normalized_accuracy(merged: Mapping[str, float], experts: Mapping[str, float]) -> float:
    """Mean over tasks of ``merged[t] / experts[t]``: 1.0 means every expert's accuracy is kept."""
    return float(np.mean(list(per_task_normalized(merged, experts).values())))


def per_task_gain(
    merged: Mapping[str, float],
    experts: Mapping[str, float],
    pretrained: Mapping[str, float],
    *,
    min_gain: float = 1e-9,
) -> dict[str, float | None]:
    """``(merged[t] - pretrained[t]) / (experts[t] - pretrained[t])`` per task; ``None`` where the expert's
    gain over the pretrained encoder is at most `min_gain` (the ratio is undefined or meaningless there)."""
    out: dict[str, float | None] = {}
    for t in _check_tasks(merged, experts, pretrained):
        gain = experts[t] - pretrained[t]
        out[t] = (merged[t] - pretrained[t]) / gain if gain > min_gain else None
    return out


def gain_retained(
    merged: Mapping[str, float],
    experts: Mapping[str, float],
    pretrained: Mapping[str, float],
    *,
    min_gain: float = 1e-9,
) -> float:
    """Mean over tasks of the share of the fine-tuning gain the merge keeps:
    ``(merged - pretrained) / (expert - pretrained)``; 0 = no better than the pretrained encoder, 1 = as good
    as the expert, < 0 = worse than pretrained.  Tasks whose expert gains at most `min_gain` over the
    pretrained encoder are left out; ``nan`` if none is left."""
    values = [
        v for v in per_task_gain(merged, experts, pretrained, min_gain=min_gain).values() if v is not None
    ]
    return float(np.mean(values)) if values else math.nan


@dataclass(frozen=True)
class BootstrapResult:
    """``difference`` = mean accuracy of A minus B, with a percentile `confidence` interval [low, high].

    ``p_value``: two-sided bootstrap p-value of "no difference" (twice the smaller share of resampled
    differences on either side of 0, at most 1; its resolution is ``1 / n``).
    """

    difference: float
    low: float
    high: float
    p_value: float
    confidence: float
    n: int

    def __str__(self) -> str:
        pct = round(self.confidence * 100)
        return (
            f"{self.difference * 100:+.2f} points [{pct}% CI {self.low * 100:+.2f}, {self.high * 100:+.2f}], "
            f"p={self.p_value:.3g}"
        )


def paired_bootstrap(
    correct_a: Sequence[bool] | np.ndarray | Mapping[str, Sequence[bool] | np.ndarray],
    correct_b: Sequence[bool] | np.ndarray | Mapping[str, Sequence[bool] | np.ndarray],
    n: int = 1000,
    seed: int = 0,
    *,
    confidence: float = 0.95,
) -> BootstrapResult:
    """Paired bootstrap of the accuracy difference A - B on the SAME test items.

    `correct_a[i]` and `correct_b[i]` say whether methods A and B got item *i* right.  Each of the `n`
    resamples draws items with replacement, the same items for A and B, so the spread reflects only how
    much the difference depends on which items were drawn.

    Given ``{task: correctness array}`` dicts (``evaluate(..., return_correct=True)``), items are resampled
    within each task (stratified) and the statistic is the difference of mean per-task accuracies -- the
    same equal-weight-per-task mean as :func:`mean_accuracy`.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if isinstance(correct_a, Mapping) != isinstance(correct_b, Mapping):
        raise TypeError("give both correctness arguments as arrays, or both as {task: array} dicts")
    if isinstance(correct_a, Mapping):
        if set(correct_a) != set(correct_b):
            raise KeyError(
                f"the two results cover different tasks: {sorted(correct_a)} vs {sorted(correct_b)}"
            )
        strata = [(_as_bool(correct_a[t]), _as_bool(correct_b[t])) for t in correct_a]
    else:
        strata = [(_as_bool(correct_a), _as_bool(correct_b))]
    rng = np.random.default_rng(seed)
    observed = 0.0
    resampled = np.zeros(n)
    for a, b in strata:
        if a.shape != b.shape or a.ndim != 1:
            raise ValueError(f"paired results need equal 1-D shapes, got {a.shape} and {b.shape}")
        if a.size == 0:
            raise ValueError("a task has no items")
        diff = a.astype(np.float64) - b.astype(np.float64)
        observed += diff.mean()
        index = rng.integers(0, diff.size, size=(n, diff.size))
        resampled += diff[index].mean(axis=1)
    observed /= len(strata)
    resampled /= len(strata)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(resampled, [alpha, 1 - alpha])
    p_value = min(1.0, 2 * min(float(np.mean(resampled <= 0)), float(np.mean(resampled >= 0))))
    return BootstrapResult(float(observed), float(low), float(high), p_value, confidence, n)


def _as_bool(values: Sequence[bool] | np.ndarray) -> np.ndarray:
    return np.asarray(values, dtype=bool)
