"""Fixtures of the selection tests: the tiny-backbone and TEXT-8-backbone builders of tests/eval and tests/bench
(loaded by path: the test folders are not packages)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest
import torch


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


@pytest.fixture(scope="module")
def one_torch_thread():
    """These problems are tiny: torch/MKL threads only add synchronization, which stalls for milliseconds per
    call when another job keeps the cores busy. One thread for the module, restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def train_tiny_experts():
    """``train(suite, cache_dir, backbone_dir)``: a few fast steps per tiny task (enough to separate them)."""
    from transfuse.train import train_experts

    def train(suite, cache_dir: Path, backbone_dir: Path) -> dict:
        return train_experts(
            suite,
            cache_dir,
            backbone_dir=backbone_dir,
            steps=15,
            batch_size=8,
            encoder_lr=3e-3,
            head_lr=3e-2,
            progress=False,
        )

    return train
