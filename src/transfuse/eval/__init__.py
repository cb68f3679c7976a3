"""Evaluate any encoder on a task pool, score merges against their experts, and sweep merge methods.

>>> from transfuse.eval import evaluate, normalized_accuracy, paired_bootstrap, run_method_sweep
>>> acc, correct = evaluate(merged_state, expert_heads, suite, return_correct=True)
>>> normalized_accuracy(acc, expert_acc), gain_retained(acc, expert_acc, pretrained_acc)
"""

from __future__ import annotations

from transfuse.eval.harness import EvaluationError, clear_token_cache, evaluate, tokenized
from transfuse.eval.metrics import (
    BootstrapResult,
    gain_retained,
    mean_accuracy,
    normalized_accuracy,
    paired_bootstrap,
    per_task_gain,
    per_task_normalized,
)
from transfuse.eval.sweep import DEFAULT_GRIDS, method_grid, run_method_sweep

__all__ = [
    "DEFAULT_GRIDS",
    "BootstrapResult",
    "EvaluationError",
    "clear_token_cache",
    "evaluate",
    "gain_retained",
    "mean_accuracy",
    "method_grid",
    "normalized_accuracy",
    "paired_bootstrap",
    "per_task_gain",
    "per_task_normalized",
    "run_method_sweep",
    "tokenized",
]
