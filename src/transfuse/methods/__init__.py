"""Data-free merge methods, one module per method.  Importing this package registers all of them."""

from __future__ import annotations

import importlib
import pkgutil

from transfuse.methods.registry import MethodSpec, ParamSpec, available_methods, get_method, register

# Every module in this package registers its method on import; new files appear without editing this list.
for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_") and _module.name != "registry":
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["MethodSpec", "ParamSpec", "available_methods", "get_method", "register"]
