"""Lazy reader of one or more ``.safetensors`` files (a single file or the shards of a model dir)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from transfuse.errors import CheckpointError
from transfuse.io.checkpoint import CheckpointBase, TensorInfo, lfs_pointer_hint

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
    """Tensors of ``files`` (``safe_open`` handles kept open; data is memory-mapped and read on demand).

    Names are in stored order: file by file, and by data offset inside each file.  A name stored in two files
    is an error (the shards of one model never overlap).
    """

    def __init__(self, files: list[Path], *, source: str, config_dir: Path | None) -> None:
        self.source = source
        self.config_dir = config_dir
        self.files = list(files)
        self._handles: list[Any] = []
        self._where: dict[str, int] = {}  # name -> index into _handles
        self._info: dict[str, TensorInfo] = {}
        self._order: list[str] = []
        try:
            for i, file in enumerate(self.files):
                handle = self._open(file)
                self._handles.append(handle)
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
        try:
            return safe_open(str(file), framework="pt", device="cpu")
        except Exception as exc:  # SafetensorError, OSError: corrupt header, truncated file, permissions
            raise CheckpointError(
                f"cannot read {file} (from {self.source}){lfs_pointer_hint(file)}: {exc}; "
                "expected a complete safetensors file - "
                "re-download or re-export it"
            ) from exc

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
        try:
            return self._handles[i].get_tensor(name)
        except Exception as exc:
            raise CheckpointError(f"cannot read tensor {name!r} from {self.files[i]}: {exc}") from exc

    def _check_open(self) -> None:
        if not self._handles:
            raise CheckpointError(f"{self.source} was closed; open it again to read from it")

    def close(self) -> None:
        # Dropping the handles unmaps the files once no returned tensor still uses them.
        self._handles = []
