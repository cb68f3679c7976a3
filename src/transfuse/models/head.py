"""Linear task heads on top of a pooled encoder, saved beside the encoder they were trained with.

A head is ``logits = W h + b`` with ``W [num_classes, hidden]``.  On disk it is two files in one directory:

- ``head.safetensors``: tensors ``weight`` and ``bias`` (float32);
- ``head.json``: ``{"format": "transfuse-task-head", "format_version": 1, "task": ..., "label_names": [...],
  "hidden_size": H, "num_classes": K, "pooling": "mean"}``.

An expert directory holds one head at its top level; a multi-task directory holds one per task under
``heads/<task>/``.  :func:`load_heads` reads either.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from transfuse.errors import CheckpointError

HEAD_FORMAT = "transfuse-task-head"
HEAD_FORMAT_VERSION = 1
HEAD_WEIGHTS = "head.safetensors"
HEAD_INFO = "head.json"
HEADS_DIR = "heads"


class TaskHead(torch.nn.Module):
    """A linear classifier for one task: pooled vectors ``[B, H]`` -> logits ``[B, K]``."""

    def __init__(self, hidden_size: int, label_names: Sequence[str], task: str = "") -> None:
        super().__init__()
        if len(label_names) < 2:
            raise ValueError(f"a task head needs at least two labels, got {list(label_names)}")
        self.task = task
        self.label_names = [str(n) for n in label_names]
        self.linear = torch.nn.Linear(hidden_size, len(self.label_names))

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    @property
    def hidden_size(self) -> int:
        return self.linear.in_features

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.linear(pooled)

    @torch.inference_mode()
    def predict(self, pooled: torch.Tensor) -> torch.Tensor:
        """Predicted label ids ``[B]`` (argmax of the logits; ties go to the lower id)."""
        return self.linear(pooled.to(self.linear.weight.dtype)).argmax(-1)

    def save(self, directory: str | Path) -> Path:
        """Write ``head.safetensors`` and ``head.json`` into `directory`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {
            "weight": self.linear.weight.detach().float().cpu().contiguous(),
            "bias": self.linear.bias.detach().float().cpu().contiguous(),
        }
        save_file(tensors, str(directory / HEAD_WEIGHTS), metadata={"format": HEAD_FORMAT})
        info = {
            "format": HEAD_FORMAT,
            "format_version": HEAD_FORMAT_VERSION,
            "task": self.task,
            "label_names": self.label_names,
            "hidden_size": self.hidden_size,
            "num_classes": self.num_classes,
            "pooling": "mean",
        }
        (directory / HEAD_INFO).write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n")
        return directory

    @classmethod
    def load(cls, directory: str | Path, *, device: str | torch.device = "cpu") -> TaskHead:
        """Read the head saved in `directory` (``head.safetensors`` + ``head.json``)."""
        directory = Path(directory)
        info_file = directory / HEAD_INFO
        if not info_file.is_file():
            raise CheckpointError(f"{directory} holds no task head ({HEAD_INFO} is missing)")
        info = json.loads(info_file.read_text())
        if info.get("format") != HEAD_FORMAT or info.get("format_version") != HEAD_FORMAT_VERSION:
            raise CheckpointError(
                f"{info_file}: format {info.get('format')!r} version {info.get('format_version')!r}; "
                f"this transfuse reads {HEAD_FORMAT!r} version {HEAD_FORMAT_VERSION}"
            )
        tensors = load_file(str(directory / HEAD_WEIGHTS))
        head = cls(int(info["hidden_size"]), info["label_names"], info.get("task", ""))
        expected = (head.num_classes, head.hidden_size)
        if tuple(tensors["weight"].shape) != expected or tuple(tensors["bias"].shape) != expected[:1]:
            raise CheckpointError(
                f"{directory / HEAD_WEIGHTS}: weight {tuple(tensors['weight'].shape)} does not match "
                f"{HEAD_INFO} ({expected[0]} classes, hidden size {expected[1]})"
            )
        head.linear.load_state_dict(tensors)
        return head.to(device).eval()


def head_dir_name(task: str) -> str:
    """A file-system-safe directory name for `task` (the real name is kept in ``head.json``)."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", task).strip("._") or "task"
    if safe != task:
        safe = f"{safe}-{hashlib.sha256(task.encode()).hexdigest()[:8]}"
    return safe


def save_heads(heads: dict[str, TaskHead] | Sequence[TaskHead], directory: str | Path) -> Path:
    """Write several heads under ``directory/heads/<task>/`` (the multi-task layout)."""
    items = heads.values() if isinstance(heads, dict) else heads
    root = Path(directory) / HEADS_DIR
    for head in items:
        head.save(root / head_dir_name(head.task))
    return root


def load_heads(directory: str | Path, *, device: str | torch.device = "cpu") -> dict[str, TaskHead]:
    """The heads in an expert directory (one, at its top) or a multi-task one (``heads/*/``), by task name."""
    directory = Path(directory)
    if (directory / HEAD_INFO).is_file():
        head = TaskHead.load(directory, device=device)
        return {head.task: head}
    root = directory / HEADS_DIR
    if root.is_dir():
        heads = {}
        for sub in sorted(p for p in root.iterdir() if (p / HEAD_INFO).is_file()):
            head = TaskHead.load(sub, device=device)
            heads[head.task] = head
        if heads:
            return heads
    raise CheckpointError(f"{directory} holds no task heads ({HEAD_INFO} or {HEADS_DIR}/*/{HEAD_INFO})")
