"""The dtypes a merge can write: one table for the recipe's ``dtype`` / ``out_dtype``, the plan and the CLI's
``--dtype``.  Importing this module does not import torch (the CLI checks ``--dtype`` before loading it)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# Names as the recipe (and MergeKit's schema) spells them, which are also torch's attribute names.
DTYPE_NAMES = ("float32", "float16", "bfloat16", "float64")


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of one of :data:`DTYPE_NAMES`; any other name is a ``ValueError`` listing them."""
    if name not in DTYPE_NAMES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPE_NAMES)}, got {name!r}")
    import torch

    return getattr(torch, name)
