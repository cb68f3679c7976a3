"""The tiny backbone and tasks of tests/eval/conftest.py, for the training tests."""

from __future__ import annotations

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location(
    "_tiny_text_fixtures", Path(__file__).parents[1] / "eval" / "conftest.py"
)
_tiny = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_tiny)

build_tiny_backbone = _tiny.build_tiny_backbone
tiny_suite = _tiny.tiny_suite
tiny_backbone = _tiny.tiny_backbone
suite = _tiny.suite
one_torch_thread = _tiny.one_torch_thread
