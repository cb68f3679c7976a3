"""Merge methods, one module per method.  Importing this package registers all of them."""

from __future__ import annotations

import importlib
import pkgutil

from transfuse.methods.context import MethodContext, MissingStatisticsError
from transfuse.methods.registry import (
    FAMILIES,
    MethodFamily,
    MethodSpec,
    ParamSpec,
    available_methods,
    get_method,
    register,
)

# Every module in this package registers its method on import; new files appear without editing this list.
# (Modules starting with "_" hold code shared by several methods; registry and context are the contract.)
for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_") and _module.name not in ("registry", "context"):
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "FAMILIES",
    "MethodContext",
    "MethodFamily",
    "MethodSpec",
    "MissingStatisticsError",
    "ParamSpec",
    "available_methods",
    "get_method",
    "register",
]
