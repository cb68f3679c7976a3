"""Reader of ``torch.save`` files (``pytorch_model.bin``, its shards, ``.pt`` state dicts).

Files are loaded with ``torch.load(weights_only=True, mmap=True)``: only tensors and plain containers are ever
unpickled, and tensor data stays in the memory-mapped file until used.  (Files in the pre-1.6 legacy format
cannot be memory-mapped and are read into memory instead.)
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import pickle
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from transfuse.errors import CheckpointError
from transfuse.io.checkpoint import CheckpointBase, TensorInfo, check_readable, lfs_pointer_hint

# Training scripts often save {"state_dict": {...}, "epoch": ...} or {"model": {...}, "optimizer": ...}.
_WRAPPER_KEYS = ("state_dict", "model")


def load_state_dict(file: Path, source: str | None = None) -> dict[str, torch.Tensor]:
    """The tensors of one ``torch.save`` file, unwrapped and with non-tensor entries dropped."""
    where = f"{file}" if source is None or source == str(file) else f"{file} (from {source})"
    check_readable(file, source or str(file))
    try:
        # The legacy (non-zip) format cannot be memory-mapped.
        mappable = zipfile.is_zipfile(file)
        obj = torch.load(file, map_location="cpu", weights_only=True, mmap=mappable)
    except pickle.UnpicklingError as exc:
        reason = lfs_pointer_hint(file) or _refusal_reason(str(exc))
        raise CheckpointError(
            f"cannot read {where}: torch.load(weights_only=True) refused it{reason}. Expected a torch.save'd "
            "state dict of tensors; transfuse never unpickles arbitrary objects. If you trust the file, load "
            "it yourself and re-save its state dict (or convert it to safetensors)"
        ) from exc
    except Exception as exc:  # RuntimeError (corrupt zip), OSError, EOFError, ...
        raise CheckpointError(
            f"cannot read {where}{lfs_pointer_hint(file)}: {_first_line(str(exc))}; "
            "expected a complete torch.save file of a state dict "
            "- re-download or re-export it"
        ) from exc

    if isinstance(obj, Mapping):
        for key in _WRAPPER_KEYS:
            inner = obj.get(key)
            if isinstance(inner, Mapping):
                obj = inner
                break
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{where} holds a {type(obj).__name__}, expected a state dict (a dict of tensor name -> tensor)"
        )
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    return tensors


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else "unknown error"


def _refusal_reason(message: str) -> str:
    # torch's message is long advice about weights_only=False; keep only what names the culprit.
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", message)
    if found:
        return f" (it holds a pickled {found[1]} object, which is not a tensor)"
    found = re.search(r"WeightsUnpickler error: ([^\n]+?)(?:\. Please|\n|$)", message)
    if found:
        return f" ({found[1].strip()})"
    return " (it holds objects other than tensors, or it is not a PyTorch file)"


class TorchCheckpoint(CheckpointBase):
    """Tensors of one or more ``torch.save`` files (the shards of a model dir, in file order)."""

    def __init__(self, files: list[Path], *, source: str, config_dir: Path | None) -> None:
        self.source = source
        self.config_dir = config_dir
        self.files = list(files)
        self._tensors: dict[str, torch.Tensor] = {}
        self._closed = False
        owner: dict[str, Path] = {}
        self._releasable: set[str] = set()  # tensors whose bytes are verified pages of a file mapping
        for file in self.files:
            loaded = load_state_dict(file, source)
            if _mapped_from(file, loaded.values()):
                self._releasable.update(loaded)
            for name, value in loaded.items():
                if name in owner:
                    raise CheckpointError(
                        f"{source}: tensor {name!r} is stored twice, in {owner[name].name} and {file.name}; "
                        "the shards are inconsistent"
                    )
                owner[name] = file
                self._tensors[name] = value
        if not self._tensors:
            raise CheckpointError(
                f"{source} holds no tensors: expected a state dict (name -> tensor), optionally under a "
                f"top-level {' or '.join(repr(k) for k in _WRAPPER_KEYS)} key"
            )

    def names(self) -> list[str]:
        return list(self._tensors)

    def info(self, name: str) -> TensorInfo:
        t = self._get(name)
        return TensorInfo(name=name, shape=tuple(t.shape), dtype=t.dtype)

    def tensor(self, name: str) -> torch.Tensor:
        return self._get(name)

    def _get(self, name: str) -> Any:
        if self._closed:
            raise CheckpointError(f"{self.source} was closed; open it again to read from it")
        t = self._tensors.get(name)
        if t is None:
            raise self._missing(name)
        return t

    def release(self, name: str) -> None:
        """Drop ``name``'s pages from this process's resident set when its file is memory-mapped (the OS page
        cache keeps them; a later read faults them back in from the file).  A no-op for files read into memory
        (the legacy format) and off Linux."""
        if name not in self._releasable or self._closed:
            return
        t = self._tensors[name]
        nbytes = t.untyped_storage().nbytes() if t.numel() else 0
        if nbytes:
            _drop_pages(t.untyped_storage().data_ptr(), nbytes)

    def close(self) -> None:
        # The mmap is released when the last tensor viewing it is garbage collected.
        self._tensors = {}
        self._closed = True


# ---- releasing pages of memory-mapped torch.save files (Linux) ------------------------------------------------


def _mapped_from(file: Path, tensors: Any) -> bool:
    """Whether every tensor's storage lies in a mapping of ``file`` (per /proc/self/maps).  Only then may its
    pages be dropped: dropping pages of anonymous memory would zero the data."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return False
    target = str(file.resolve())
    regions = []
    for line in maps.splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5] == target:
            start, end = (int(x, 16) for x in parts[0].split("-"))
            regions.append((start, end))
    if not regions:
        return False
    for t in tensors:
        storage = t.untyped_storage()
        ptr, size = storage.data_ptr(), storage.nbytes()
        if size and not any(start <= ptr and ptr + size <= end for start, end in regions):
            return False
    return True


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _drop_pages(ptr: int, nbytes: int) -> None:
    first = ptr - ptr % mmap.PAGESIZE
    # The mapping is private and never written, so its dropped pages read back from the file unchanged.
    _libc().madvise(ctypes.c_void_p(first), ctypes.c_size_t(ptr + nbytes - first), mmap.MADV_DONTNEED)
