"""Checkpoint I/O: lazy readers (safetensors, torch.save, PEFT LoRA adapters) and the atomic writer."""

from __future__ import annotations

from transfuse.io.checkpoint import Checkpoint, TensorInfo, is_lora_adapter, open_checkpoint
from transfuse.io.lora import LoraCheckpoint
from transfuse.io.safetensors_reader import SafetensorsCheckpoint
from transfuse.io.torch_reader import TorchCheckpoint
from transfuse.io.writer import ShardedWriter, config_files

__all__ = [
    "Checkpoint",
    "LoraCheckpoint",
    "SafetensorsCheckpoint",
    "ShardedWriter",
    "TensorInfo",
    "TorchCheckpoint",
    "config_files",
    "is_lora_adapter",
    "open_checkpoint",
]
