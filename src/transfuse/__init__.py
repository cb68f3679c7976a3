"""transfuse: choose, combine and measure fine-tuned models.

Merging: ``merge(recipe, out_dir)`` streams a recipe's checkpoints into a new model dir;
``merge_state_dicts(base, models, method, **params)`` merges in-memory state dicts.
"""

from __future__ import annotations

__version__ = "0.1.0"

from transfuse.api import merge, merge_state_dicts  # noqa: E402

__all__ = ["__version__", "merge", "merge_state_dicts"]
