"""Lazy package exports (PEP 562): a package names what it exports and where each name is defined, and the
defining module is imported on first access.  So importing one module of a package (``transfuse.io.files``,
``transfuse.eval.metrics``) does not load its heavy siblings, and no module is reached through a package that
is still being imported."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(
    package: str, defined_in: Mapping[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for ``package``, whose public ``name`` is defined in the submodule
    ``defined_in[name]`` (relative to the package, e.g. ``"harness"``; ``"text8:PREPARED_DIR"`` exports that
    module's ``PREPARED_DIR`` under ``name``).  Use as::

        __getattr__, __dir__ = lazy_exports(__name__, {"evaluate": "harness", ...})

    A public name must not also be the name of a submodule: importing that submodule would bind the module to
    the package attribute first."""

    def __getattr__(name: str) -> Any:
        where = defined_in.get(name)
        if where is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module, _, attribute = where.partition(":")
        value = getattr(importlib.import_module(f"{package}.{module}"), attribute or name)
        setattr(sys.modules[package], name, value)  # later lookups do not come back here
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(defined_in))

    return __getattr__, __dir__
