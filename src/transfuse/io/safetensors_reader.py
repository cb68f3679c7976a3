"""Lazy reader of one or more ``.safetensors`` files (a single file or the shards of a model dir)."""

from __future__ import annotations

import json
import mmap
import struct
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from transfuse.errors import CheckpointError
from transfuse.io.checkpoint import CheckpointBase, TensorInfo, check_readable, lfs_pointer_hint

# safetensors dtype codes -> torch dtypes (codes torch lacks are left out and reported when met).
_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _code, _attr in (
    ("U16", "uint16"),
    ("U32", "uint32"),
    ("U64", "uint64"),
    ("F8_E4M3", "float8_e4m3fn"),
    ("F8_E5M2", "float8_e5m2"),
    ("F8_E8M0", "float8_e8m0fnu"),
    ("C64", "complex64"),
):
    if hasattr(torch, _attr):
        _DTYPES[_code] = getattr(torch, _attr)


class SafetensorsCheckpoint(CheckpointBase):
    """Tensors of ``files``: ``safe_open`` validates each file and lists its tensors; the data is read as zero-copy
    views of a memory map of the file (no copy before the engine's one dtype conversion).

    ``release(name)`` drops that tensor's pages from this process's mapping (``MADV_DONTNEED``; the page cache
    keeps them), so streaming a whole model does not grow the resident set by the model's size.
    Names are in stored order: file by file, and by data offset inside each file.  A name stored in two files
    is an error (the shards of one model never overlap).
    """

    def __init__(self, files: list[Path], *, source: str, config_dir: Path | None) -> None:
        self.source = source
        self.config_dir = config_dir
        self.files = list(files)
        self._handles: list[Any] = []
        self._maps: list[mmap.mmap | None] = []
        self._spans: dict[str, tuple[int, int]] = {}  # name -> absolute [start, end) byte range in its file
        self._where: dict[str, int] = {}  # name -> index into _handles
        self._info: dict[str, TensorInfo] = {}
        self._order: list[str] = []
        try:
            for i, file in enumerate(self.files):
                handle = self._open(file)
                self._handles.append(handle)
                self._maps.append(self._map(file, self._spans))
                # offset_keys (safetensors >= 0.5) is the on-disk order; keys() is sorted by name.
                keys = handle.offset_keys() if hasattr(handle, "offset_keys") else handle.keys()
                for name in keys:
                    if name in self._where:
                        raise CheckpointError(
                            f"{source}: tensor {name!r} is stored twice, in "
                            f"{self.files[self._where[name]].name} and {file.name}; "
                            "the shards are inconsistent"
                        )
                    self._where[name] = i
                    self._order.append(name)
            if not self._order:
                raise CheckpointError(
                    f"{source} holds no tensors (expected model weights in safetensors format)"
                )
        except BaseException:
            self.close()
            raise

    def _open(self, file: Path) -> Any:
        check_readable(file, self.source)
        try:
            return safe_open(str(file), framework="pt", device="cpu")
        except Exception as exc:  # SafetensorError, OSError: corrupt header, truncated file, permissions
            raise CheckpointError(
                f"cannot read {file} (from {self.source}){lfs_pointer_hint(file)}: {exc}; "
                "expected a complete safetensors file - "
                "re-download or re-export it"
            ) from exc

    def _map(self, file: Path, spans: dict[str, tuple[int, int]]) -> mmap.mmap | None:
        # safe_open has validated the header already; read the (documented) layout for the byte offsets:
        # an 8-byte little-endian header length, the JSON header, then the data buffer.
        with open(file, "rb") as fh:
            (length,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(length))
            data_start = 8 + length
            for name, entry in header.items():
                if name != "__metadata__":
                    begin, end = entry["data_offsets"]
                    spans[name] = (data_start + begin, data_start + end)
            if file.stat().st_size == 0:
                return None
            return mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)

    def metadata(self, file_index: int = 0) -> dict[str, str]:
        """The ``__metadata__`` of one of the files (``{}`` when none)."""
        return dict(self._handles[file_index].metadata() or {})

    def names(self) -> list[str]:
        return list(self._order)

    def info(self, name: str) -> TensorInfo:
        cached = self._info.get(name)
        if cached is not None:
            return cached
        i = self._where.get(name)
        if i is None:
            raise self._missing(name)
        self._check_open()
        view = self._handles[i].get_slice(name)
        code = view.get_dtype()
        dtype = _DTYPES.get(code)
        if dtype is None:
            raise CheckpointError(
                f"{self.source}: tensor {name!r} has dtype {code}, which this torch build cannot represent"
            )
        result = TensorInfo(name=name, shape=tuple(int(d) for d in view.get_shape()), dtype=dtype)
        self._info[name] = result
        return result

    def tensor(self, name: str) -> torch.Tensor:
        i = self._where.get(name)
        if i is None:
            raise self._missing(name)
        self._check_open()
        info = self.info(name)
        start, end = self._spans[name]
        mapped = self._maps[i]
        if end == start or mapped is None:
            return torch.empty(info.shape, dtype=info.dtype)
        with warnings.catch_warnings():
            # The map is read-only; the contract says callers never write into returned tensors.
            warnings.simplefilter("ignore", UserWarning)
            flat = torch.frombuffer(
                mapped, dtype=info.dtype, count=(end - start) // info.dtype.itemsize, offset=start
            )
        return flat.reshape(info.shape)

    def release(self, name: str) -> None:
        """Drop ``name``'s pages from this process's resident set (they stay in the OS page cache)."""
        i = self._where.get(name)
        if i is None or not self._handles or self._maps[i] is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        start, end = self._spans[name]
        first = start - start % mmap.PAGESIZE
        if end > first:
            self._maps[i].madvise(mmap.MADV_DONTNEED, first, end - first)

    def _check_open(self) -> None:
        if not self._handles:
            raise CheckpointError(f"{self.source} was closed; open it again to read from it")

    def close(self) -> None:
        # Dropping the handles and maps unmaps the files once no returned tensor still uses them.
        self._handles = []
        self._maps = []
