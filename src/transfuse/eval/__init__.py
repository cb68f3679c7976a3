"""Evaluate any encoder on a task pool, score merges against their experts, and sweep merge methods.

>>> from transfuse.eval import evaluate, normalized_accuracy, paired_bootstrap, run_method_sweep
>>> acc, correct = evaluate(merged_state, expert_heads, suite, return_correct=True)
>>> normalized_accuracy(acc, expert_acc), gain_retained(acc, expert_acc, pretrained_acc)

Each name is imported from its module on first use, so importing one module of this package loads only that one.
"""

from __future__ import annotations

from transfuse._lazy import lazy_exports

# public name -> the module of this package that defines it
_DEFINED_IN = {
    "DEFAULT_GRIDS": "sweep",
    "BootstrapResult": "metrics",
    "EvaluationError": "harness",
    "clear_token_cache": "harness",
    "evaluate": "harness",
    "gain_retained": "metrics",
    "mean_accuracy": "metrics",
    "method_grid": "sweep",
    "normalized_accuracy": "metrics",
    "paired_bootstrap": "metrics",
    "per_task_gain": "metrics",
    "per_task_normalized": "metrics",
    "run_method_sweep": "sweep",
    "tokenized": "harness",
}
__all__ = sorted(_DEFINED_IN)
__getattr__, __dir__ = lazy_exports(__name__, _DEFINED_IN)
