"""transfuse: choose, combine and measure fine-tuned models.

Merging: ``merge(recipe, out_dir)`` streams a recipe's checkpoints into a new model dir;
``merge_state_dicts(base, models, method, **params)`` merges in-memory state dicts.

The public functions are imported on first use (PEP 562), so ``import transfuse.methods`` or ``transfuse.io``
does not load the evaluation, selection or benchmark layers.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

# Merging allocates and frees buffers of up to hundreds of MB per tensor; with 4 KiB pages every fresh buffer
# costs more in page faults than the merge math (a bf16->fp32 copy of 49M values into a fresh buffer: 0.18 s,
# 0.05-0.07 s with transparent huge pages, measured here).  torch reads this once, at its first allocation, so it
# must be set before torch is imported; set THP_MEM_ALLOC_ENABLE=0 to opt out.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from transfuse._lazy import lazy_exports  # noqa: E402
from transfuse._version import __version__  # noqa: E402

if TYPE_CHECKING:
    from transfuse.api import merge, merge_state_dicts
    from transfuse.data.task import load_task_suite
    from transfuse.eval.harness import evaluate
    from transfuse.routed.store import load
    from transfuse.select.rank import rank_sources

# public name -> the module of this package that defines it
_DEFINED_IN = {
    "merge": "api",
    "merge_state_dicts": "api",
    "load_task_suite": "data.task",
    "evaluate": "eval.harness",
    "load": "routed.store",
    "rank_sources": "select.rank",
}
# a literal list, so that type checkers see the public API (the TYPE_CHECKING imports above)
__all__ = ["__version__", "evaluate", "load", "load_task_suite", "merge", "merge_state_dicts", "rank_sources"]
__getattr__, __dir__ = lazy_exports(__name__, _DEFINED_IN)
