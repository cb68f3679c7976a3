"""Checkpoint I/O: lazy readers (safetensors, torch.save, PEFT LoRA adapters) and the atomic writer."""

from __future__ import annotations

from transfuse._lazy import lazy_exports

# public name -> the module of this package that defines it
_DEFINED_IN = {
    "Checkpoint": "checkpoint",
    "LoraCheckpoint": "lora",
    "SafetensorsCheckpoint": "safetensors_reader",
    "ShardedWriter": "writer",
    "TensorInfo": "checkpoint",
    "TorchCheckpoint": "torch_reader",
    "config_files": "writer",
    "is_lora_adapter": "checkpoint",
    "open_checkpoint": "checkpoint",
}
__all__ = sorted(_DEFINED_IN)
__getattr__, __dir__ = lazy_exports(__name__, _DEFINED_IN)
