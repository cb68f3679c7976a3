"""Recipe -> merge plan: open the inputs, validate them against each other, and list one job per output tensor.

Everything that can be checked without reading tensor data is checked here, before any work starts:
inputs that cannot be opened, models that are not fine-tunes of the same base, missing tensors, shape, dtype
and vocabulary-size mismatches, and parameters that resolve to nothing for some tensor.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from transfuse.errors import (
    CheckpointError,
    DtypeMismatchError,
    MissingTensorError,
    NotSameBaseError,
    ParameterError,
    ShapeMismatchError,
    VocabSizeMismatchError,
)
from transfuse.io import Checkpoint, open_checkpoint
from transfuse.methods.registry import MethodSpec, ParamValue
from transfuse.recipe import ModelEntry, Recipe, evaluate_setting

_LAYER_INDEX = re.compile(r"\.(?:layers|layer|h|blocks|block)\.(\d+)\.")
# Tensors whose first axis is the vocabulary: their row counts may legitimately differ between models.
_VOCAB_NAMES = ("embed_tokens", "word_embeddings", "wte", "lm_head", "embed_out", "tok_embeddings", "shared")
_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}
# Below this share of common tensor names, inputs are different architectures, not fine-tunes of one base.
_SAME_BASE_MIN_OVERLAP = 0.5


@dataclass(frozen=True)
class TensorJob:
    """One output tensor: what to read, which parameters apply, what to write."""

    name: str
    shape: tuple[int, ...]
    out_dtype: torch.dtype
    merge: bool  # False: copied from the base unchanged (integer buffers)
    global_params: dict[str, ParamValue] = field(default_factory=dict)
    model_params: dict[str, tuple[float, ...]] = field(default_factory=dict)  # per-model, incl. "weight"
    model_rows: tuple[
        int, ...
    ] = ()  # first-axis length of each model's tensor when it differs (vocab fix-up)
    input_bytes: int = 0

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class MergePlan:
    """The validated inputs and the ordered jobs.  Close it (or use ``with``) to release the file maps."""

    recipe: Recipe
    spec: MethodSpec
    base: Checkpoint
    models: list[Checkpoint]
    labels: list[str]
    jobs: list[TensorJob]
    config_source: Path | None
    ignored: dict[str, list[str]] = field(default_factory=dict)  # model label -> tensor names not in the base
    notes: list[str] = field(default_factory=list)
    # Every checkpoint the plan opened (LoRA bases included).
    owned: list[Checkpoint] = field(default_factory=list)

    @property
    def input_bytes(self) -> int:
        return sum(j.input_bytes for j in self.jobs)

    @property
    def output_bytes(self) -> int:
        return sum(j.numel * j.out_dtype.itemsize for j in self.jobs)

    @property
    def largest_tensor(self) -> TensorJob:
        return max(self.jobs, key=lambda j: j.numel)

    def close(self) -> None:
        # Only what the plan opened: checkpoints handed in by the caller (in-memory state dicts) stay theirs.
        for ckpt in {id(c): c for c in self.owned}.values():
            ckpt.close()

    def __enter__(self) -> MergePlan:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def layer_position(name: str, num_layers: int) -> float:
    """MergeKit's ``t`` for layer gradients: index/(L−1) inside layer ``index``; 0 for tensors outside layers."""
    match = _LAYER_INDEX.search(name)
    if match is None or num_layers <= 1:
        return 0.0 if match is None else 1.0
    return int(match.group(1)) / (num_layers - 1)


def count_layers(names: list[str]) -> int:
    indices = [int(m.group(1)) for n in names if (m := _LAYER_INDEX.search(n))]
    return max(indices) + 1 if indices else 0


def build_plan(
    recipe: Recipe,
    *,
    out_dtype: str | None = None,
    checkpoints: Mapping[str, Checkpoint] | None = None,
) -> MergePlan:
    """Open the recipe's inputs lazily, validate them, and plan every output tensor.

    ``checkpoints`` maps recipe paths to already-open checkpoints (in-memory state dicts); others are opened.
    """
    spec = recipe.spec
    task_entries: list[ModelEntry] = recipe.task_models
    given = dict(checkpoints or {})
    opened: list[Checkpoint] = []

    def open_path(path: str, lora: str | None, base: Checkpoint | None) -> Checkpoint:
        if lora is not None:
            ckpt = open_checkpoint(lora, lora_base=open_path(path, None, None))
        elif path in given:
            return given[path]
        else:
            ckpt = open_checkpoint(path, lora_base=base)
        opened.append(ckpt)
        return ckpt

    try:
        if recipe.base_model is not None:
            base = open_path(recipe.base_model, None, None)
        else:  # methods without a base (linear): the first model is the reference the deltas are taken against
            base = open_path(task_entries[0].path, task_entries[0].lora, None)
        models = [open_path(entry.path, entry.lora, base) for entry in task_entries]
        labels = [e.label for e in task_entries]
        base_label = recipe.base_model or labels[0]
        plan = _plan_tensors(recipe, spec, base, base_label, models, labels, out_dtype)
        plan.owned = opened
    except BaseException:
        for ckpt in opened:
            ckpt.close()
        raise
    return plan


def _plan_tensors(
    recipe: Recipe,
    spec: MethodSpec,
    base: Checkpoint,
    base_label: str,
    models: list[Checkpoint],
    labels: list[str],
    out_dtype: str | None,
) -> MergePlan:
    base_names = base.names()
    base_set = set(base_names)
    ignored: dict[str, list[str]] = {}
    for ckpt, label in zip(models, labels):
        names = set(ckpt.names())
        common = len(base_set & names)
        if common < _SAME_BASE_MIN_OVERLAP * max(len(base_set), 1):
            raise NotSameBaseError(
                f"{label} shares only {common} of the base's {len(base_set)} tensor names: it is not a fine-tune of "
                f"{base_label}. Merge only models fine-tuned from the same base (e.g. {sorted(base_set)[:2]} vs "
                f"{sorted(names)[:2]})"
            )
        missing = [n for n in base_names if n not in names]
        if missing:
            raise MissingTensorError(
                f"{label} lacks {len(missing)} tensor(s) the base {base_label} has, e.g. {missing[:3]}; "
                "check that it is a complete checkpoint of the same architecture (a LoRA adapter dir is read as such "
                "only when it holds adapter_config.json)"
            )
        extra = sorted(names - base_set)
        if extra:
            ignored[label] = extra

    num_layers = count_layers(base_names)
    forced_dtype = _DTYPES[out_dtype] if out_dtype else None
    recipe_dtype = _DTYPES.get(recipe.out_dtype or recipe.dtype or "", None)
    jobs = []
    notes = []
    for name in base_names:
        info = base.info(name)
        infos = [ckpt.info(name) for ckpt in models]
        is_float = info.dtype.is_floating_point
        model_rows: tuple[int, ...] = ()
        for mi, label in zip(infos, labels):
            if mi.dtype.is_floating_point != is_float:
                raise DtypeMismatchError(
                    f"tensor {name!r} is {mi.dtype} in {label} but {info.dtype} in the base {base_label}; "
                    "a fine-tune keeps the base's tensor kinds"
                )
        if any(mi.shape != info.shape for mi in infos):
            model_rows = _reconcile_rows(name, info.shape, infos, labels, base_label, recipe.vocab_mismatch)
            notes.append(
                f"{name}: vocabulary rows {list(model_rows)} reconciled to the base's {info.shape[0]}"
            )
        t = layer_position(name, num_layers)
        global_params, model_params = _resolve_params(spec, recipe, name, t) if is_float else ({}, {})
        if is_float and spec.check is not None:
            problem = spec.check(global_params, model_params)
            if problem is not None:
                raise ParameterError(
                    f"{spec.name}, tensor {name!r}: {problem} (models in order: {', '.join(labels)})"
                )
        dtype = (forced_dtype or recipe_dtype or info.dtype) if is_float else info.dtype
        nbytes = math.prod(info.shape) * info.dtype.itemsize + sum(
            math.prod(mi.shape) * mi.dtype.itemsize for mi in infos
        )
        jobs.append(
            TensorJob(
                name=name,
                shape=tuple(info.shape),
                out_dtype=dtype,
                merge=is_float,
                global_params=global_params,
                model_params=model_params,
                model_rows=model_rows,
                input_bytes=nbytes if is_float else math.prod(info.shape) * info.dtype.itemsize,
            )
        )
    if recipe.tokenizer_source in (None, "base"):
        config_source = base.config_dir
    else:
        source = Path(recipe.tokenizer_source)
        config_source = source if source.is_dir() else source.parent
        if not (config_source / "config.json").exists() and not any(config_source.glob("tokenizer*")):
            raise CheckpointError(
                f"tokenizer_source {recipe.tokenizer_source} holds no config.json or tokenizer files; "
                "name a model dir or `base`"
            )
    for label, extra in ignored.items():
        notes.append(f"{label}: {len(extra)} tensor(s) absent from the base are not merged, e.g. {extra[:3]}")
    return MergePlan(
        recipe=recipe,
        spec=spec,
        base=base,
        models=models,
        labels=labels,
        jobs=jobs,
        config_source=config_source,
        ignored=ignored,
        notes=notes,
    )


def _reconcile_rows(name, base_shape, infos, labels, base_label, mode) -> tuple[int, ...]:
    rows = []
    is_vocab = any(part in _VOCAB_NAMES for part in name.split("."))  # whole name parts: not "shared_expert"
    for mi, label in zip(infos, labels):
        same_tail = tuple(mi.shape[1:]) == tuple(base_shape[1:]) and len(mi.shape) == len(base_shape)
        if not (is_vocab and same_tail and len(base_shape) >= 1):
            raise ShapeMismatchError(
                f"tensor {name!r} has shape {tuple(mi.shape)} in {label} but {tuple(base_shape)} in the base "
                f"{base_label}; models of different sizes cannot be merged"
            )
        n, n_base = mi.shape[0], base_shape[0]
        if n != n_base:
            if mode == "error":
                raise VocabSizeMismatchError(
                    f"{name!r} has {n} vocabulary rows in {label} but {n_base} in the base {base_label}; set "
                    "`vocab_mismatch: truncate` (drop rows beyond the base's vocabulary) or `vocab_mismatch: pad` "
                    "(fill missing rows from the base, i.e. no change there) in the recipe"
                )
            if n > n_base and mode != "truncate":
                raise VocabSizeMismatchError(
                    f"{name!r} has more rows in {label} ({n}) than the base ({n_base}); `pad` only fills missing "
                    "rows: use `vocab_mismatch: truncate`"
                )
            if n < n_base and mode != "pad":
                raise VocabSizeMismatchError(
                    f"{name!r} has fewer rows in {label} ({n}) than the base ({n_base}); `truncate` only drops "
                    "rows: use `vocab_mismatch: pad`"
                )
        rows.append(n)
    return tuple(rows)


def _resolve_params(
    spec: MethodSpec, recipe: Recipe, tensor_name: str, t: float
) -> tuple[dict[str, ParamValue], dict[str, tuple[float, ...]]]:
    """Per-model settings first, then the global ``parameters``, then the method's default (MergeKit's order)."""
    global_params: dict[str, ParamValue] = {}
    model_params: dict[str, tuple[float, ...]] = {}
    for param in spec.all_params:
        if param.per_model:
            values = []
            for entry in recipe.task_models:
                value = _first(param, [entry.parameters, recipe.parameters], tensor_name, t, entry.label)
                values.append(float(value))
            model_params[param.name] = tuple(values)
        else:
            global_params[param.name] = _first(param, [recipe.parameters], tensor_name, t, "parameters")
    return global_params, model_params


def _first(param, scopes, tensor_name: str, t: float, where: str) -> ParamValue:
    for scope in scopes:
        if param.name in scope:
            value = evaluate_setting(scope[param.name], tensor_name, t)
            if value is not None:
                return param.validate(value, f"{where}, tensor {tensor_name}")
    if param.default is None:
        raise ParameterError(
            f"parameter {param.name!r} has no value for tensor {tensor_name!r} ({where}) and no default; "
            "set it per model or under the top-level `parameters`"
        )
    return param.default
