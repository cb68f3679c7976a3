"""A routed model on disk: ``save_routed(model, directory)`` and ``load(directory)``.

The directory (written atomically: built in a hidden temporary dir beside it, then renamed into place)::

    manifest.json          format, format_version, method, its settings, tasks, how to rebuild the module,
                           every file with its byte size and every tensor's shape and dtype
    base.safetensors       the module's state dict (the shared weights); tied tensors once, see "aliases"
    shared.safetensors     the method's shared tensors (EMR: ``unified.<name>``, tau_uni in float32)
    task-000.safetensors   one per task, in the order of "tasks" (EMR: ``mask.<name>`` bit-packed uint8, 1 bit per
                           entry, and ``rescaler``, one float32; WEMoE: ``tau.<name>`` and the task's router rows;
                           Twin-Merging: ``u.<name>``/``s.<name>``/``vh.<name>`` factors and ``delta.<name>``)
    config.json            transformers models only: the config the module is rebuilt from

Loading reads only JSON and safetensors (never pickle), and checks before it reads a tensor that every file the
manifest lists is there, has its byte size, and holds exactly the tensors, shapes and dtypes listed, with a
header whose data offsets cover the file; then the method checks its parts against each other and the base.
"""

from __future__ import annotations

import json
import struct
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from transfuse.io.files import staged_dir
from transfuse.io.writer import SAFETENSORS_DTYPE_CODES
from transfuse.routed.emr import EMRParts
from transfuse.routed.errors import (
    MissingModuleError,
    ModuleMismatchError,
    RoutedFormatError,
    UnsupportedFormatVersionError,
)
from transfuse.routed.model import RoutedModel, Router
from transfuse.routed.twin import TwinParts
from transfuse.routed.wemoe import WEMoEParts

FORMAT = "transfuse-routed"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
# method name -> its parts class (each has ``from_saved``)
PARTS_CLASSES: dict[str, Any] = {"emr": EMRParts, "wemoe": WEMoEParts, "twin": TwinParts}

_DTYPE_CODES = SAFETENSORS_DTYPE_CODES
_DTYPE_NAMES = {dtype: str(dtype).removeprefix("torch.") for dtype in _DTYPE_CODES}
_CODE_BY_NAME = {_DTYPE_NAMES[d]: code for d, code in _DTYPE_CODES.items()}


def _is_transformers_model(module: nn.Module) -> bool:
    if "transformers" not in sys.modules:
        return False
    from transformers import PreTrainedModel

    return isinstance(module, PreTrainedModel)


def _dedupe(state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """``(unique tensors, {alias: the name it shares memory with})``: safetensors refuses shared tensors."""
    seen: dict[tuple, str] = {}
    unique, aliases = {}, {}
    for name, t in state.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if key in seen:
            aliases[name] = seen[key]
        else:
            seen[key] = name
            unique[name] = t.detach().contiguous().cpu()
    return unique, aliases


def _write(directory: Path, filename: str, tensors: dict[str, Tensor]) -> dict[str, Any]:
    for name, t in tensors.items():
        if t.dtype not in _DTYPE_CODES:
            raise RoutedFormatError(f"{name} has dtype {t.dtype}, which the routed format does not store")
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    path = directory / filename
    save_file(tensors, str(path))
    return {
        "bytes": path.stat().st_size,
        "tensors": {k: {"dtype": _DTYPE_NAMES[v.dtype], "shape": list(v.shape)} for k, v in tensors.items()},
    }


def save_routed(model: RoutedModel, directory: str | Path, *, overwrite: bool = False) -> Path:
    """Write `model` to `directory` (atomically; an existing non-empty directory is an ``OutputExistsError``
    unless `overwrite`).  A router callable is not saved (it is code): the manifest records that there was one,
    and ``load(directory, router=...)`` takes it again.  A method whose parts route every example themselves
    (WEMoE: the routers are tensors) saves them with its parts, and the manifest says ``"saved_router": true``.
    Returns the directory."""
    if not isinstance(model, RoutedModel):
        raise TypeError(f"save_routed takes a RoutedModel, got {type(model).__name__}")
    module = model.module
    parts = model.parts
    if parts.method not in PARTS_CLASSES:
        raise RoutedFormatError(f"method {parts.method!r} cannot be saved; known: {sorted(PARTS_CLASSES)}")
    if _is_transformers_model(module):
        module_entry: dict[str, Any] = {
            "kind": "transformers",
            "class": type(module).__name__,
            "config": "config.json",
        }
    else:
        module_entry = {"kind": "module", "class": f"{type(module).__module__}.{type(module).__qualname__}"}
    base, aliases = _dedupe(module.state_dict())
    directory = Path(directory)
    with staged_dir(directory, replace=overwrite) as tmp:
        files = {
            "base.safetensors": _write(tmp, "base.safetensors", base),
            "shared.safetensors": _write(tmp, "shared.safetensors", parts.shared_tensors()),
        }
        task_files = {}
        for i, task in enumerate(parts.tasks):
            filename = f"task-{i:03d}.safetensors"
            files[filename] = _write(tmp, filename, parts.task_tensors(task))
            task_files[task] = filename
        if module_entry["kind"] == "transformers":
            module.config.to_json_file(str(tmp / "config.json"))
            files["config.json"] = {"bytes": (tmp / "config.json").stat().st_size}
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "method": parts.method,
            "settings": parts.settings(),
            "tasks": list(parts.tasks),
            "task_files": task_files,
            "module": module_entry,
            "router": model.router is not None or model.saved_with_router,
            "saved_router": bool(getattr(parts, "routes_examples", False)),
            "aliases": aliases,
            "files": files,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return directory


def _field(mapping: Any, key: str, kind: type | tuple[type, ...], where: str = "manifest") -> Any:
    if not isinstance(mapping, dict) or key not in mapping:
        raise RoutedFormatError(f"{where} has no {key!r}; the directory was not written by save_routed")
    value = mapping[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise RoutedFormatError(f"{where}[{key!r}] is {value!r}, expected {kind}")
    return value


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """The manifest of a routed-model directory, its format and version checked."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise RoutedFormatError(f"{directory} has no {MANIFEST}: not a routed model saved by save_routed")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RoutedFormatError(f"{path} is not readable JSON: {exc}") from exc
    if _field(manifest, "format", str) != FORMAT:
        raise RoutedFormatError(f"{path} has format {manifest['format']!r}, expected {FORMAT!r}")
    version = _field(manifest, "format_version", int)
    if version != FORMAT_VERSION:
        raise UnsupportedFormatVersionError(
            f"{directory} is routed format version {version}; this transfuse reads version {FORMAT_VERSION}: "
            "upgrade transfuse or save the model again"
        )
    return manifest


def _safetensors_header(path: Path, size: int) -> dict[str, Any]:
    """The JSON header of a safetensors file, checked to describe exactly `size` bytes."""
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise RoutedFormatError(f"{path} is truncated: no safetensors header")
        (length,) = struct.unpack("<Q", head)
        if length > size - 8:
            raise RoutedFormatError(f"{path} is truncated: its header claims {length} bytes")
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise RoutedFormatError(f"{path} has a damaged safetensors header: {exc}") from exc
    if not isinstance(header, dict):
        raise RoutedFormatError(f"{path} has a damaged safetensors header")
    header.pop("__metadata__", None)
    spans = []
    for name, entry in header.items():
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise RoutedFormatError(f"{path}: tensor {name!r} has no valid data_offsets")
        spans.append(tuple(offsets))
    end = 0
    for start, stop in sorted(spans):
        if start != end or stop < start:
            raise RoutedFormatError(
                f"{path}: tensor data overlaps or leaves gaps (offset {start}, expected {end})"
            )
        end = stop
    if 8 + length + end != size:
        raise RoutedFormatError(
            f"{path} is {size} bytes but its header describes {8 + length + end}: truncated or padded"
        )
    return header


def _check_files(directory: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    files = _field(manifest, "files", dict)
    for filename, entry in files.items():
        if not isinstance(filename, str) or "/" in filename or "\\" in filename or filename.startswith("."):
            raise RoutedFormatError(f"manifest lists the file {filename!r}, which is not a plain file name")
        path = directory / filename
        if not path.is_file():
            raise RoutedFormatError(
                f"{directory} lacks {filename}, which its manifest lists; the copy is incomplete"
            )
        expected = _field(entry, "bytes", int, f"files[{filename!r}]")
        size = path.stat().st_size
        if size != expected:
            raise RoutedFormatError(
                f"{path} is {size} bytes, the manifest says {expected}: truncated or replaced"
            )
        if not filename.endswith(".safetensors"):
            continue
        listed = _field(entry, "tensors", dict, f"files[{filename!r}]")
        header = _safetensors_header(path, size)
        if set(header) != set(listed):
            diff = sorted(set(header) ^ set(listed))
            raise RoutedFormatError(f"{path} and the manifest disagree on its tensors ({diff[:3]})")
        for name, spec in listed.items():
            dtype_name = _field(spec, "dtype", str, f"{filename}:{name}")
            shape = _field(spec, "shape", list, f"{filename}:{name}")
            code = _CODE_BY_NAME.get(dtype_name)
            if code is None:
                raise RoutedFormatError(
                    f"{filename}:{name} has dtype {dtype_name!r}, not one the format stores"
                )
            if header[name].get("dtype") != code or header[name].get("shape") != shape:
                raise RoutedFormatError(
                    f"{path}: {name} is {header[name].get('dtype')} {header[name].get('shape')}, the manifest says "
                    f"{code} {shape}"
                )
    return files


def _read(path: Path) -> dict[str, Tensor]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except Exception as exc:  # safetensors raises its own SafetensorError and OSError
        raise RoutedFormatError(f"{path} is not a readable safetensors file: {exc}") from exc


def _build_module(directory: Path, entry: dict[str, Any], files: dict[str, Any]) -> nn.Module:
    kind = _field(entry, "kind", str, "manifest['module']")
    if kind != "transformers":
        raise MissingModuleError(
            f"{directory} holds a {entry.get('class', 'torch')} module, which cannot be rebuilt from files: "
            "pass load(directory, module=<a module of that structure>)"
        )
    config_file = _field(entry, "config", str, "manifest['module']")
    if config_file not in files:
        raise RoutedFormatError(f"the manifest's module config {config_file!r} is not among its files")
    import transformers

    class_name = _field(entry, "class", str, "manifest['module']")
    cls = getattr(transformers, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise RoutedFormatError(
            f"module class {class_name!r} is not a transformers model class of this transformers "
            f"({transformers.__version__}); pass load(directory, module=...)"
        )
    try:
        config = transformers.AutoConfig.from_pretrained(str(directory))
    except (OSError, ValueError) as exc:
        raise RoutedFormatError(f"{directory / config_file} is not a transformers config: {exc}") from exc
    return cls(config)


def load(
    directory: str | Path,
    *,
    module: nn.Module | None = None,
    router: Router | None = None,
    cache_tasks: int = 1,
) -> RoutedModel:
    """The routed model saved in `directory` by :func:`save_routed`.

    A transformers model is rebuilt from its saved config (its class, ``from_config``); any other module must be
    given as `module` (its structure is checked against the saved weights: :class:`ModuleMismatchError`), as may
    a transformers one.  Errors: :class:`RoutedFormatError` for a missing, damaged or lying manifest or file,
    :class:`UnsupportedFormatVersionError` for another format version, :class:`MissingModuleError` when `module`
    is needed but not given."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    method = _field(manifest, "method", str)
    if method not in PARTS_CLASSES:
        raise RoutedFormatError(
            f"{directory} is a {method!r} routed model; this transfuse knows {sorted(PARTS_CLASSES)}"
        )
    tasks = _field(manifest, "tasks", list)
    if not tasks or not all(isinstance(t, str) and t for t in tasks) or len(set(tasks)) != len(tasks):
        raise RoutedFormatError(f"manifest tasks {tasks!r} are not distinct non-empty names")
    task_files = _field(manifest, "task_files", dict)
    if set(task_files) != set(tasks):
        raise RoutedFormatError("manifest task_files do not name exactly its tasks")
    aliases = _field(manifest, "aliases", dict)
    settings = _field(manifest, "settings", dict)
    module_entry = _field(manifest, "module", dict)
    saved_with_router = _field(manifest, "router", bool)
    # "saved_router" came with WEMoE; directories written before it have none and no saved router
    saved_router = manifest.get("saved_router", False)
    if not isinstance(saved_router, bool):
        raise RoutedFormatError(f"manifest['saved_router'] is {saved_router!r}, expected true or false")
    if saved_router and router is not None:
        raise ValueError(f"{directory} routes with its saved router ({method}); load it without router=")
    files = _check_files(directory, manifest)
    for required in ("base.safetensors", "shared.safetensors", *task_files.values()):
        if required not in files:
            raise RoutedFormatError(f"the manifest does not list {required}")

    if module is None:
        module = _build_module(directory, module_entry, files)
    elif not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch nn.Module, got {type(module).__name__}")
    base = _read(directory / "base.safetensors")
    for alias, target in aliases.items():
        if not isinstance(target, str) or target not in base:
            raise RoutedFormatError(f"alias {alias!r} points at {target!r}, which base.safetensors lacks")
        base[alias] = base[target]
    try:
        module.load_state_dict(base, strict=True, assign=True)
    except RuntimeError as exc:
        raise ModuleMismatchError(
            f"the module does not match the saved weights: {exc}; pass a module of the saved structure"
        ) from exc
    shared = _read(directory / "shared.safetensors")
    per_task = {task: _read(directory / task_files[task]) for task in tasks}
    parts = PARTS_CLASSES[method].from_saved(tuple(tasks), shared, per_task, settings, base)
    if bool(getattr(parts, "routes_examples", False)) != saved_router:
        raise RoutedFormatError(
            f"the manifest says saved_router={saved_router}, but a {method} model "
            f"{'routes' if not saved_router else 'does not route'} with saved routers"
        )
    return RoutedModel(
        module, parts, router=router, cache_tasks=cache_tasks, saved_with_router=saved_with_router
    )
