"""Plan a recipe with ``slices:`` (MergeKit's layer slices): frankenmerges and per-layer-range merges.

An output slice takes the same number of layers from each of its sources (``layer_range: [start, end)``, end
exclusive) and merges them layer by layer with the recipe's method; slices are stacked in order, so the output
has ``sum(slice lengths)`` layers, renumbered from 0.  As in MergeKit:

- tensors before the layers (embeddings) are merged from the first slice's sources, tensors after them (final
  norm, LM head, pooler) from the last slice's, both at ``t = 0``;
- inside a slice, layer ``i`` of ``n`` gets ``t = i / (n - 1)`` for gradients (``t = 1`` when ``n = 1``);
- a per-model parameter is read from the source's own ``parameters``, then the slice's, then the recipe's; a
  global one from the slice's, then the recipe's;
- a slice's base (``slices[i].base_model`` or the recipe's) must be one of its sources.

Each output tensor becomes a ``TensorJob`` whose ``base_source`` / ``model_sources`` name the tensors to read
(e.g. ``model.layers.12.mlp.up_proj.weight`` of one model for output layer 3), so the engine streams slices
exactly as whole-model merges, with the same memory bound.  The output config's layer count (and per-layer
lists such as ``layer_types``) is rewritten to match.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from transfuse.errors import DtypeMismatchError, MissingTensorError, ParameterError, RecipeError
from transfuse.io import Checkpoint, open_checkpoint
from transfuse.io.checkpoint import is_lora_adapter
from transfuse.plan import (
    MergePlan,
    TensorJob,
    TensorSource,
    _adapter_base_mismatches,
    _output_config,
    _reconcile_rows,
    _tokenizer_files,
    copies_input,
    count_layers,
    output_dtypes,
    resolve_params,
)
from transfuse.recipe import OutputSlice, Recipe, SliceSource

# A layer tensor's name: <prefix><index><suffix>, e.g. "model.layers." 12 ".mlp.up_proj.weight".
_LAYER_NAME = re.compile(r"^(.*?(?:^|\.)(?:layers|layer|h|blocks|block)\.)(\d+)(\..+)$")
# Name parts of tensors that come before the layers (embeddings); every other non-layer tensor comes after.
_PRE_PARTS = ("embed", "wte", "wpe", "shared")
# config.json keys that hold the number of layers.
_LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")


@dataclass(frozen=True)
class _Opened:
    """A slice source's checkpoint and how its tensor names split into layers."""

    checkpoint: Checkpoint
    layers: dict[int, list[tuple[str, str]]]  # layer index -> [(prefix, suffix)] in stored order
    outside: list[str]  # tensors outside the layers, in stored order
    num_layers: int


def split_layer_name(name: str) -> tuple[str, int, str] | None:
    """``(prefix, layer index, suffix)`` of a tensor inside a numbered layer, else ``None``."""
    match = _LAYER_NAME.match(name)
    if match is None:
        return None
    return match.group(1), int(match.group(2)), match.group(3)


def is_before_layers(name: str) -> bool:
    """Embedding-like tensors come before the layers; norms, heads and poolers after them."""
    return any(any(key in part for key in _PRE_PARTS) for part in name.split("."))


def build_slice_plan(
    recipe: Recipe,
    *,
    out_dtype: str | None = None,
    checkpoints: Mapping[str, Checkpoint] | None = None,
    strict_lora_base: bool = False,
) -> MergePlan:
    """Open every slice source once, validate the ranges and tensors, and plan each output tensor."""
    assert recipe.slices is not None
    spec = recipe.tokenizer_spec
    if spec is not None and (spec.source != "base" or spec.tokens or spec.pad_to_multiple_of):
        raise RecipeError(
            "merging tokenizers (union, a model's tokenizer, token settings) is not supported with `slices:` yet; "
            "use `tokenizer_source: base` (the output keeps the base's vocabulary)"
        )
    given = dict(checkpoints or {})
    owned: list[Checkpoint] = []
    opened: dict[tuple[str, str | None], _Opened] = {}

    def open_source(path: str, lora: str | None) -> _Opened:
        key = (path, lora)
        if key not in opened:
            if path in given and lora is None:
                ckpt = given[path]
            else:
                base = open_checkpoint(path) if lora is not None else None
                if base is not None:
                    owned.append(base)
                elif is_lora_adapter(path):  # a bare adapter dir is applied to the recipe's base
                    base = recipe_base()
                ckpt = open_checkpoint(lora or path, lora_base=base)
                owned.append(ckpt)
            opened[key] = _index(ckpt)
        return opened[key]

    def recipe_base() -> Checkpoint | None:
        if recipe.base_model is None:
            return None
        return open_source(recipe.base_model, None).checkpoint

    try:
        plan = _plan(recipe, open_source, out_dtype)
        plan.owned = owned
        plan.warnings += _adapter_base_mismatches(plan.models, plan.labels, strict_lora_base)
    except BaseException:
        for ckpt in owned:
            ckpt.close()
        raise
    return plan


def _index(ckpt: Checkpoint) -> _Opened:
    layers: dict[int, list[tuple[str, str]]] = {}
    outside = []
    for name in ckpt.names():
        parts = split_layer_name(name)
        if parts is None:
            outside.append(name)
        else:
            layers.setdefault(parts[1], []).append((parts[0], parts[2]))
    return _Opened(ckpt, layers, outside, count_layers(ckpt.names()))


def _plan(recipe: Recipe, open_source, out_dtype: str | None) -> MergePlan:
    spec = recipe.spec
    slices = recipe.slices
    assert slices is not None
    forced_dtype, recipe_dtype = output_dtypes(recipe, out_dtype)
    jobs: list[TensorJob] = []
    notes: list[str] = []
    for i, output in enumerate(slices):
        for source in output.sources:
            have = open_source(source.path, source.lora).num_layers
            if source.layer_range[1] > have:
                raise RecipeError(
                    f"slices[{i}]: {source.label} asks for layers up to {source.layer_range[1]} (end exclusive) but "
                    f"{source.path} has {have} layer(s)"
                )

    def add_job(out_name: str, output: OutputSlice, where: str, offset: int | None, t: float) -> None:
        base_src = recipe.slice_base(output)
        task = recipe.slice_task_sources(output)
        inputs: list[TensorSource] = []
        for src in [base_src, *task] if base_src is not None else task:
            name = _source_name(out_name, src, offset)
            ckpt = open_source(src.path, src.lora).checkpoint
            if name not in set(ckpt.names()):
                raise MissingTensorError(
                    f"{src.label} has no tensor {name!r}, needed for {out_name!r} of {where}; the sources of a slice "
                    "must share one architecture"
                )
            inputs.append(TensorSource(ckpt, name, src.label))
        # Without a base (linear, passthrough) the first model is the reference the deltas are taken against.
        base_in = inputs[0]
        model_ins = tuple(inputs[1:]) if base_src is not None else tuple(inputs)
        info = base_in.checkpoint.info(base_in.name)
        infos = [m.checkpoint.info(m.name) for m in model_ins]
        is_float = info.dtype.is_floating_point
        for mi, src in zip(infos, model_ins):
            if mi.dtype.is_floating_point != is_float:
                raise DtypeMismatchError(
                    f"tensor {src.name!r} is {mi.dtype} in {src.label} but {info.dtype} in {base_in.label}"
                )
        model_rows: tuple[int, ...] = ()
        if any(mi.shape != info.shape for mi in infos):
            model_rows = _reconcile_rows(
                out_name,
                info.shape,
                infos,
                [m.label for m in model_ins],
                base_in.label,
                recipe.vocab_mismatch,
            )
            notes.append(f"{out_name}: vocabulary rows {list(model_rows)} reconciled to {info.shape[0]}")
        global_params: dict = {}
        model_params: dict = {}
        if is_float:
            per_model = [(s.label, [s.parameters, output.parameters, recipe.parameters]) for s in task]
            global_params, model_params = resolve_params(
                spec, per_model, [output.parameters, recipe.parameters], out_name, t
            )
            if spec.check is not None:
                problem = spec.check(global_params, model_params)
                if problem is not None:
                    raise ParameterError(f"{spec.name}, tensor {out_name!r} ({where}): {problem}")
        dtype = (forced_dtype or recipe_dtype or info.dtype) if is_float else info.dtype
        if (
            is_float
            and not model_rows
            and copies_input(spec, model_params, len(model_ins), base_src is not None, dtype, info)
        ):
            is_float = False  # passthrough at scale 1: the source tensor's bytes, read once
        nbytes = math.prod(info.shape) * info.dtype.itemsize
        if is_float:
            nbytes += sum(math.prod(mi.shape) * mi.dtype.itemsize for mi in infos)
        jobs.append(
            TensorJob(
                name=out_name,
                shape=tuple(info.shape),
                out_dtype=dtype,
                merge=is_float,
                global_params=global_params,
                model_params=model_params,
                model_rows=model_rows,
                input_bytes=nbytes,
                base_source=base_in,
                model_sources=model_ins if is_float else (),
                has_base=base_src is not None,
            )
        )

    first, last = slices[0], slices[-1]
    first_ref = open_source(*_ref(recipe, first))
    last_ref = open_source(*_ref(recipe, last))
    for name in first_ref.outside:
        if is_before_layers(name):
            add_job(name, first, "the embeddings (from slices[0])", None, 0.0)
    out_layer = 0
    origins: list[int] = []  # output layer -> the layer index it comes from (of its slice's reference)
    for i, output in enumerate(slices):
        ref_source = recipe.slice_base(output) or recipe.slice_task_sources(output)[0]
        ref = open_source(ref_source.path, ref_source.lora)
        n = output.layers
        for offset in range(n):
            t = offset / (n - 1) if n > 1 else 1.0
            src_layer = ref_source.layer_range[0] + offset
            for prefix, suffix in ref.layers.get(src_layer, []):
                add_job(f"{prefix}{out_layer}{suffix}", output, f"slices[{i}] layer {offset}", offset, t)
            origins.append(src_layer)
            out_layer += 1
    for name in last_ref.outside:
        if not is_before_layers(name):
            add_job(name, last, f"the final tensors (from slices[{len(slices) - 1}])", None, 0.0)

    config_ckpt = open_source(*_config_model(recipe)).checkpoint
    config_path, config = _output_config(recipe, config_ckpt, config_ckpt.source, jobs, notes)
    if config is not None:
        config = _relayered_config(config, out_layer, origins, config_path)
    tokenizer_dir = config_ckpt.config_dir
    tokenizer_files = _tokenizer_files(recipe, None, tokenizer_dir, [config_ckpt])
    models = []
    labels = []
    for output in slices:
        for src in recipe.slice_task_sources(output):
            ckpt = open_source(src.path, src.lora).checkpoint
            if all(ckpt is not m for m in models):
                models.append(ckpt)
                labels.append(src.label)
    notes.append(
        f"{len(slices)} slice(s) -> {out_layer} layers: "
        + ", ".join(
            f"{output.sources[0].label}" + (" +..." if len(output.sources) > 1 else "") for output in slices
        )
    )
    return MergePlan(
        recipe=recipe,
        spec=spec,
        base=config_ckpt,
        models=models,
        labels=labels,
        jobs=jobs,
        config_path=config_path,
        tokenizer_dir=tokenizer_dir,
        config=config,
        notes=notes,
        tokenizer_files=tokenizer_files,
    )


def _ref(recipe: Recipe, output: OutputSlice) -> tuple[str, str | None]:
    src = recipe.slice_base(output) or recipe.slice_task_sources(output)[0]
    return src.path, src.lora


def _config_model(recipe: Recipe) -> tuple[str, str | None]:
    """Whose config.json and tokenizer the output gets: the recipe's base, else the first slice's reference."""
    assert recipe.slices is not None
    if recipe.base_model is not None:
        return recipe.base_model, None
    return _ref(recipe, recipe.slices[0])


def _source_name(out_name: str, src: SliceSource, offset: int | None) -> str:
    """The name of ``out_name``'s input in ``src``: the same name outside layers, else the source's layer."""
    if offset is None:
        return out_name
    parts = split_layer_name(out_name)
    assert parts is not None
    return f"{parts[0]}{src.layer_range[0] + offset}{parts[2]}"


def _relayered_config(config: dict, layers: int, origins: list[int], path: Path | None) -> dict:
    """``config`` with its layer count set to ``layers`` and per-layer lists (e.g. ``layer_types``) rebuilt
    from the layers each output layer comes from."""
    config = dict(config)
    before = next((config[k] for k in _LAYER_COUNT_KEYS if isinstance(config.get(k), int)), None)
    for key in _LAYER_COUNT_KEYS:
        if isinstance(config.get(key), int) and not isinstance(config.get(key), bool):
            config[key] = layers
    if before is not None:
        for key, value in list(config.items()):
            if isinstance(value, list) and len(value) == before and all(o < before for o in origins):
                config[key] = [value[o] for o in origins]
    return config
