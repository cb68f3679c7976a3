"""The read side of checkpoint I/O: the ``Checkpoint`` interface and ``open_checkpoint``.

A checkpoint is a read-only, lazily loaded mapping from tensor names to tensors.  ``open_checkpoint``
recognises

- a Hugging Face model dir: ``model.safetensors``, sharded ``model-*.safetensors`` +
  ``model.safetensors.index.json``, ``pytorch_model.bin`` or sharded ``pytorch_model-*.bin`` +
  ``pytorch_model.bin.index.json``;
- a single ``.safetensors`` file, or a ``.bin`` / ``.pt`` / ``.pth`` / ``.ckpt`` file of ``torch.save``;
- a PEFT LoRA adapter dir (``adapter_config.json`` + ``adapter_model.safetensors`` /
  ``adapter_model.bin``), exposed as the full model base + LoRA delta (see ``transfuse.io.lora``).

Nothing is unpickled except through ``torch.load(weights_only=True)``, and tensor data is read only when asked
for.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from transfuse.errors import CheckpointError, MissingTensorError

# Full-model weight files of a Hugging Face model dir, in the order transformers looks for them.
SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
TORCH_WEIGHTS = "pytorch_model.bin"
TORCH_INDEX = "pytorch_model.bin.index.json"
ADAPTER_CONFIG = "adapter_config.json"
TORCH_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


@dataclass(frozen=True)
class TensorInfo:
    """Name, shape and dtype of a stored tensor (known without reading its data)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype


@runtime_checkable
class Checkpoint(Protocol):
    """A read-only, lazily loaded set of named tensors.

    ``source`` is the path as the user gave it (for messages); ``config_dir`` the dir holding ``config.json``
    / tokenizer files, or ``None`` (a bare weights file).  ``tensor`` returns a tensor backed by the
    memory-mapped file where possible: callers must not modify it in place.
    """

    source: str
    config_dir: Path | None

    def names(self) -> list[str]:
        """Tensor names in stored order."""
        ...

    def info(self, name: str) -> TensorInfo:
        """Shape and dtype of ``name``; reads no tensor data."""
        ...

    def tensor(self, name: str) -> torch.Tensor:
        """The tensor ``name``, read lazily."""
        ...

    def close(self) -> None:
        """Release file handles.  Tensors already returned stay valid."""
        ...


# Readers may also offer ``release(name)``: a hint that ``name`` has been consumed and its memory-mapped pages
# can leave the resident set.  The engine calls it when present; it never invalidates returned tensors' data.


class CheckpointBase:
    """Shared conveniences of the file-backed readers: context manager, ``in``, ``len`` and error messages."""

    source: str
    config_dir: Path | None

    def names(self) -> list[str]:  # pragma: no cover - overridden
        raise NotImplementedError

    def close(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def __enter__(self) -> CheckpointBase:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __contains__(self, name: object) -> bool:
        return name in set(self.names())

    def __len__(self) -> int:
        return len(self.names())

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.source!r})"

    def _missing(self, name: str) -> MissingTensorError:
        return MissingTensorError(f"{self.source} has no tensor named {name!r}")


def read_json(path: Path, what: str) -> dict[str, Any]:
    """Parse a JSON object file, turning every failure into a ``CheckpointError`` that names the file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {what} {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{what} {path} must hold a JSON object, found {type(data).__name__}")
    return data


def check_readable(file: Path, source: str) -> None:
    """Raise ``CheckpointError`` saying "permission denied" when ``file`` cannot be opened for that reason
    (safetensors reports an unreadable file as missing, and a corrupt-file hint would send users to re-download)."""
    try:
        with open(file, "rb"):
            pass
    except PermissionError:
        raise CheckpointError(
            f"cannot read {file} (from {source}): permission denied; give this user read access to it "
            "(chmod / chown) or run as a user who can read it"
        ) from None
    except OSError:
        pass  # other failures are reported by the reader, with its own context


def lfs_pointer_hint(file: Path) -> str:
    """A hint when ``file`` is a Git LFS pointer (a repo cloned without ``git lfs``), else ``""``."""
    try:
        with open(file, "rb") as fh:
            head = fh.read(64)
    except OSError:
        return ""
    if head.startswith(b"version https://git-lfs"):
        return (
            " (it is a Git LFS pointer, not the weights: run `git lfs pull` in that repo or download again)"
        )
    return ""


def shard_files_from_index(index_path: Path) -> list[Path]:
    """The shard files a ``*.index.json`` lists (in file-name order), checked to exist."""
    index = read_json(index_path, "shard index")
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(
            f"shard index {index_path} has no 'weight_map' mapping tensor names to shard files"
        )
    files = sorted(set(weight_map.values()))
    paths = []
    for file in files:
        if not isinstance(file, str) or Path(file).is_absolute() or ".." in Path(file).parts:
            raise CheckpointError(f"shard index {index_path} names an invalid shard file {file!r}")
        path = index_path.parent / file
        if not path.is_file():
            raise CheckpointError(
                f"shard index {index_path} lists {file} but it is missing; the download is incomplete"
            )
        paths.append(path)
    return paths


def _check_index_is_honest(index_path: Path, ckpt: Checkpoint) -> None:
    """Every tensor a shard index lists must be in the shard it names: otherwise the model is incomplete and a
    merge would silently lack that tensor."""
    weight_map = read_json(index_path, "shard index")["weight_map"]
    held = set(ckpt.names())
    missing = [name for name in weight_map if name not in held]
    if missing:
        raise CheckpointError(
            f"{ckpt.source}: {index_path.name} lists {len(missing)} tensor(s) that no shard holds, e.g. "
            f"{missing[0]!r} (said to be in {weight_map[missing[0]]}); the download or export is incomplete: "
            "fetch or re-export the model"
        )


def _has_config_files(directory: Path) -> bool:
    from transfuse.io.writer import config_files  # the writer owns the list of non-weight files worth copying

    return bool(config_files(directory))


def _full_weights(directory: Path) -> tuple[str, list[Path]] | None:
    """``("safetensors" | "torch", files)`` of a model dir's full weights, or None when it has none."""
    if (directory / SAFE_WEIGHTS).is_file():
        return "safetensors", [directory / SAFE_WEIGHTS]
    if (directory / SAFE_INDEX).is_file():
        return "safetensors", shard_files_from_index(directory / SAFE_INDEX)
    if (directory / TORCH_WEIGHTS).is_file():
        return "torch", [directory / TORCH_WEIGHTS]
    if (directory / TORCH_INDEX).is_file():
        return "torch", shard_files_from_index(directory / TORCH_INDEX)
    return None


def _has_full_weights(directory: Path) -> bool:
    return any((directory / f).is_file() for f in (SAFE_WEIGHTS, SAFE_INDEX, TORCH_WEIGHTS, TORCH_INDEX))


def is_lora_adapter(path: str | Path) -> bool:
    """True when ``path`` is a PEFT adapter dir: it holds ``adapter_config.json`` and no full-model weights.

    (A dir holding both a merged model and its adapter is read as the full model.)  Non-LoRA PEFT adapters
    also answer True here; ``open_checkpoint`` then raises ``LoraAdapterError`` naming their type.
    """
    p = Path(path)
    return p.is_dir() and (p / ADAPTER_CONFIG).is_file() and not _has_full_weights(p)


def open_checkpoint(path: str | Path, *, lora_base: Checkpoint | str | Path | None = None) -> Checkpoint:
    """Open a model dir, a weights file or a LoRA adapter dir for lazy reading.

    ``lora_base`` is the base model a LoRA adapter is applied to (an open checkpoint, which stays owned by the
    caller, or a path, which is opened and closed with the adapter).  It is ignored when ``path`` is not an
    adapter, so a caller may pass the recipe's base for every input.  Raises ``CheckpointError`` (or a
    subclass) naming the path and what was expected.
    """
    source = str(path)
    p = Path(path).expanduser()
    if not p.exists():
        hint = ""
        if not p.is_absolute() and source.count("/") == 1 and not source.startswith("."):
            hint = (
                " (it looks like a Hugging Face Hub id: transfuse reads local files only; download it first, "
                f"e.g. `hf download {source} --local-dir <dir>`, and pass that dir)"
            )
        raise CheckpointError(f"checkpoint {source} does not exist{hint}")

    if p.is_file():
        from transfuse.io.safetensors_reader import SafetensorsCheckpoint
        from transfuse.io.torch_reader import TorchCheckpoint

        if p.suffix == ".safetensors":
            return SafetensorsCheckpoint([p], source=source, config_dir=None)
        if p.suffix in TORCH_SUFFIXES:
            return TorchCheckpoint([p], source=source, config_dir=None)
        raise CheckpointError(
            f"checkpoint {source} is a file of unknown kind: expected a .safetensors file, a torch.save file "
            f"({', '.join(TORCH_SUFFIXES)}) or a model dir"
        )

    if not p.is_dir():
        raise CheckpointError(f"checkpoint {source} is neither a file nor a dir")

    found = _full_weights(p)
    if found is not None:
        kind, files = found
        config_dir = p if _has_config_files(p) else None
        if kind == "safetensors":
            from transfuse.io.safetensors_reader import SafetensorsCheckpoint

            ckpt: Checkpoint = SafetensorsCheckpoint(files, source=source, config_dir=config_dir)
        else:
            from transfuse.io.torch_reader import TorchCheckpoint

            ckpt = TorchCheckpoint(files, source=source, config_dir=config_dir)
        index = p / (SAFE_INDEX if kind == "safetensors" else TORCH_INDEX)
        if len(files) > 1 or not (p / (SAFE_WEIGHTS if kind == "safetensors" else TORCH_WEIGHTS)).is_file():
            try:
                _check_index_is_honest(index, ckpt)
            except BaseException:
                ckpt.close()
                raise
        return ckpt

    if (p / ADAPTER_CONFIG).is_file():
        from transfuse.io.lora import LoraCheckpoint

        return LoraCheckpoint.open(p, source=source, base=lora_base)

    try:
        entries = sorted(e.name for e in p.iterdir())
    except OSError as exc:
        raise CheckpointError(f"cannot list checkpoint dir {source}: {exc}") from exc
    shown = ", ".join(entries[:8]) + (", ..." if len(entries) > 8 else "") if entries else "nothing"
    raise CheckpointError(
        f"checkpoint dir {source} holds no model weights: expected {SAFE_WEIGHTS}, {SAFE_INDEX} with its "
        f"shards, {TORCH_WEIGHTS}, {TORCH_INDEX} with its shards, or a PEFT adapter ({ADAPTER_CONFIG} + "
        f"adapter_model.safetensors); found {shown}"
    )
