"""transfuse: choose, combine and measure fine-tuned models.

Merging: ``merge(recipe, out_dir)`` streams a recipe's checkpoints into a new model dir;
``merge_state_dicts(base, models, method, **params)`` merges in-memory state dicts.
"""

from __future__ import annotations

import os

# Merging allocates and frees buffers of up to hundreds of MB per tensor; with 4 KiB pages every fresh buffer
# costs more in page faults than the merge math (a bf16->fp32 copy of 49M values into a fresh buffer: 0.18 s,
# 0.05-0.07 s with transparent huge pages, measured here).  torch reads this once, at its first allocation, so it
# must be set before torch is imported; set THP_MEM_ALLOC_ENABLE=0 to opt out.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

__version__ = "0.1.0"

from transfuse.api import merge, merge_state_dicts  # noqa: E402
from transfuse.data import load_task_suite  # noqa: E402
from transfuse.eval import evaluate  # noqa: E402
from transfuse.select.rank import rank_sources  # noqa: E402

__all__ = ["__version__", "evaluate", "load_task_suite", "merge", "merge_state_dicts", "rank_sources"]
