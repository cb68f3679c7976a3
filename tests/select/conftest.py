"""Fixtures of the selection tests: the tiny-backbone and TEXT-8-backbone builders of tests/eval and tests/bench
(loaded by path: the test folders are not packages)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest


def _load(folder: str, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, Path(__file__).parents[1] / folder / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def tiny() -> ModuleType:
    """tests/eval/conftest.py: ``build_tiny_backbone``, ``tiny_suite``, ``tiny_task``."""
    return _load("eval", "_select_tiny_fixtures")


@pytest.fixture(scope="session")
def text8_fixtures() -> ModuleType:
    """tests/bench/conftest.py: ``build_text8_backbone``."""
    return _load("bench", "_select_text8_fixtures")
