"""An in-memory state dict seen through the ``Checkpoint`` interface (notebooks, tests, the evaluation harness)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from transfuse.errors import CheckpointError
from transfuse.io.checkpoint import TensorInfo


class StateDictCheckpoint:
    """Wraps ``{name: tensor}``; non-tensor entries are ignored.  Tensors are returned as they are (not copied)."""

    def __init__(self, state_dict: Mapping[str, object], source: str = "<state dict>") -> None:
        self.source = source
        self.config_dir: Path | None = None
        self._tensors = {k: v for k, v in state_dict.items() if isinstance(v, torch.Tensor)}
        if not self._tensors:
            raise CheckpointError(f"{source} holds no tensors")

    def names(self) -> list[str]:
        return list(self._tensors)

    def info(self, name: str) -> TensorInfo:
        t = self._tensors[name]
        return TensorInfo(name=name, shape=tuple(t.shape), dtype=t.dtype)

    def tensor(self, name: str) -> torch.Tensor:
        return self._tensors[name]

    def close(self) -> None:
        pass
