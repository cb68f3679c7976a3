"""The Python entry points of merging: ``merge`` (files in, a model dir out) and ``merge_state_dicts`` (in memory)."""

from __future__ import annotations

import json
import keyword
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from transfuse._version import __version__
from transfuse.engine import MergeStats, iter_merged, run_plan
from transfuse.errors import (
    InsufficientMemoryError,
    InvalidOptionError,
    OutputExistsError,
    OutputOverlapsInputError,
    ParameterError,
    RecipeError,
)
from transfuse.io.state_dict import StateDictCheckpoint
from transfuse.io.writer import ShardedWriter, config_files, is_tokenizer_file
from transfuse.plan import ConfigCheck, MergePlan, build_plan
from transfuse.recipe import Recipe
from transfuse.statistics.store import ModelStatistics, StatisticsError, StatisticsSet


@dataclass
class MergeResult:
    out_dir: Path
    stats: MergeStats
    plan_notes: list[str]
    warnings: list[str] = field(default_factory=list)


def parse_size(text: str | int) -> int:
    """``"5GB"``, ``"500MB"``, ``"2GiB"`` or a byte count -> bytes."""
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 1:
            raise InvalidOptionError(f"size {text!r} must be positive")
        return text
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20}
    units |= {"GIB": 2**30, "TIB": 2**40, "K": 10**3, "M": 10**6, "G": 10**9}
    s = str(text).strip().upper().replace(" ", "")
    number = s.rstrip("KMGTIB")
    unit = s[len(number) :]
    try:
        value = float(number) * units[unit]
    except (ValueError, KeyError):
        raise InvalidOptionError(f"cannot read size {text!r}; write e.g. 5GB, 500MB or 2GiB") from None
    if not math.isfinite(value) or value > 2**62:
        raise InvalidOptionError(f"size {text!r} is not a finite byte count; write e.g. 5GB, 500MB or 2GiB")
    if value < 1:
        raise InvalidOptionError(f"size {text!r} must be positive")
    return int(value)


def parse_shard_count(text: str | int) -> int:
    """MergeKit's ``--out-shard-size``: a number with an optional K / M / B suffix (thousand, million,
    billion), compared with each shard's bytes as MergeKit does (so ``5B`` is 5e9 bytes)."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        s = str(text).strip().upper()
        scale = {"K": 10**3, "M": 10**6, "B": 10**9}.get(s[-1:], 1)
        digits = s[:-1] if s[-1:] in ("K", "M", "B") else s
        if not digits.isdigit():
            raise InvalidOptionError(
                f"--out-shard-size {text!r}: write a whole number with an optional K, M or B suffix, e.g. 5B "
                "(MergeKit's spelling; --shard-size takes 5GB)"
            )
        value = int(digits) * scale
    if value < 1:
        raise InvalidOptionError(f"--out-shard-size {text!r} must be positive")
    return value


def validate_device(device: str | torch.device) -> torch.device:
    """The compute device, checked: ``cpu``, or a CUDA GPU that torch sees (``cuda`` / ``cuda:N``)."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise InvalidOptionError(f"device {device!r} is not a device name; use cpu, cuda or cuda:N") from None
    if parsed.type == "cpu":
        return parsed
    if parsed.type != "cuda":
        why = " (meta tensors hold no data to merge)" if parsed.type == "meta" else ""
        raise InvalidOptionError(f"device {device!r}{why}: transfuse merges on cpu or cuda / cuda:N")
    if not torch.cuda.is_available():
        raise InvalidOptionError(f"device {device!r} asked for, but torch sees no CUDA GPU; use cpu")
    if parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise InvalidOptionError(
            f"device {device!r}: torch sees only {torch.cuda.device_count()} CUDA GPU(s) (cuda:0 ...)"
        )
    return parsed


def validate_threads(threads: int | None) -> int | None:
    if threads is None:
        return None
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise InvalidOptionError(f"threads must be a whole number >= 1, got {threads!r}")
    return threads


def check_output_target(out_dir: str | Path, overwrite: bool) -> None:
    """Refuse an output path that is a file, a symlink, or a non-empty dir without ``overwrite`` (before any
    work; the writer checks again when it moves the finished output into place)."""
    out = Path(out_dir).expanduser()
    if out.is_symlink():
        raise OutputExistsError(f"output path {out} is a symlink; transfuse never writes through one")
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"output path {out} exists and is not a dir; choose another output path")
    if out.is_dir() and not overwrite:
        try:
            busy = any(out.iterdir())
        except OSError as exc:
            raise OutputExistsError(f"cannot list the output dir {out}: {exc.strerror or exc}") from None
        if busy:
            raise OutputExistsError(
                f"{out} exists and is not empty; choose another output dir or pass --overwrite (overwrite=True)"
            )


def check_output_location(out_dir: str | Path, inputs: Sequence[str | Path]) -> None:
    """``OutputOverlapsInputError`` when the output dir is, contains or lies inside one of ``inputs`` (after
    resolving symlinks): replacing it, with or without ``--overwrite``, would destroy an input."""
    out = Path(os.path.realpath(Path(out_dir).expanduser()))
    for given in inputs:
        real = Path(os.path.realpath(Path(given).expanduser()))
        if out == real:
            how = "is"
        elif real.is_relative_to(out):
            how = "contains"
        elif out.is_relative_to(real):
            how = "lies inside"
        else:
            continue
        raise OutputOverlapsInputError(
            f"the output dir {out_dir} {how} the input {given}; writing there could destroy it. "
            "Choose an output dir outside every input model, adapter and the recipe's folder contents"
        )


def check_memory(plan: MergePlan, threads: int | None, device: torch.device) -> None:
    """``InsufficientMemoryError`` when the plan's estimated peak memory exceeds what is available now."""
    import psutil

    workers = (threads or torch.get_num_threads()) if device.type == "cpu" else 1
    need = plan.peak_memory_bytes(workers)
    available = psutil.virtual_memory().available
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        available = min(available, free)
    if need > available:
        job = plan.largest_tensor
        raise InsufficientMemoryError(
            f"this merge needs about {need / 2**30:.1f} GiB of {'GPU ' if device.type == 'cuda' else ''}"
            f"memory at its peak ({job.name} {list(job.shape)} x {len(plan.models) + 3} float32 buffers"
            f"{f', {workers} workers' if workers > 1 else ''}) but only {available / 2**30:.1f} GiB is "
            "available; free memory, merge fewer models at once, use --threads 1, or pass --no-memory-check "
            "to try anyway"
        )


def load_recipe(recipe: Recipe | Mapping[str, Any] | str | Path) -> Recipe:
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, Mapping):
        return Recipe.from_dict(dict(recipe))
    return Recipe.load(recipe)


def plan_merge(
    recipe: Recipe | Mapping[str, Any] | str | Path,
    *,
    dtype: str | None = None,
    seed: int | None = None,
    strict_lora_base: bool = False,
) -> MergePlan:
    """Read and validate a recipe and its inputs, without merging (what ``--dry-run`` shows)."""
    recipe = load_recipe(recipe)
    if seed is not None:
        recipe.seed = seed
    return build_plan(recipe, out_dtype=dtype, strict_lora_base=strict_lora_base)


def plan_statistics(plan: MergePlan) -> StatisticsSet | None:
    """The statistics files the recipe names, opened and checked against the plan (``None`` for a method that
    needs none; a data-free method given some gets a warning that they are not used)."""
    from transfuse.statistics.coverage import statistics_for_plan

    if not plan.spec.needs:
        named = [m.label for m in plan.recipe.models if m.statistics]
        if named:
            plan.warnings.append(
                f"method {plan.spec.name!r} is {plan.spec.family}: the statistics files of {', '.join(named)} "
                "are not used"
            )
        return None
    return statistics_for_plan(plan)


def merge(
    recipe: Recipe | Mapping[str, Any] | str | Path,
    out_dir: str | Path,
    *,
    device: str = "cpu",
    dtype: str | None = None,
    shard_size: str | int = "5GB",
    threads: int | None = None,
    seed: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    strict_lora_base: bool = False,
    check_memory_fits: bool = True,
    copy_tokenizer: bool = True,
    model_card: bool = True,
) -> MergeResult:
    """Merge the models a recipe names into ``out_dir`` (sharded safetensors + index, config and tokenizer files).

    Everything is checked before any tensor is merged: the options, the output location (never an input, nor
    inside or around one), the recipe and its inputs, the config and tokenizer the output gets, and the
    estimated peak memory (``check_memory_fits=False`` skips that).  The output is built in a temporary folder
    beside ``out_dir`` and moved into place only when complete; a merged tensor holding inf/NaN aborts it.
    ``dtype`` overrides the recipe's output dtype; ``seed`` its seed (random methods).  ``copy_tokenizer``:
    copy the tokenizer / chat-template files; ``model_card``: write a README.md model card (as MergeKit does).
    """
    max_shard = parse_size(shard_size)
    compute_device = validate_device(device)
    threads = validate_threads(threads)
    recipe_file = [recipe] if isinstance(recipe, (str, Path)) else []
    with plan_merge(recipe, dtype=dtype, seed=seed, strict_lora_base=strict_lora_base) as plan:
        statistics = plan_statistics(plan)
        stat_files = [m.statistics for m in plan.recipe.models if m.statistics]
        check_output_location(out_dir, [*plan.input_paths(), *recipe_file, *stat_files])
        check_output_target(out_dir, overwrite)
        if check_memory_fits:
            check_memory(plan, threads, compute_device)
        recipe_yaml = plan.recipe.to_yaml(absolute_paths=True)
        metadata = {
            "transfuse_version": __version__,
            "merge_method": plan.recipe.method,
            "recipe": recipe_yaml,
        }
        with ShardedWriter(
            out_dir, max_shard_bytes=max_shard, metadata=metadata, overwrite=overwrite
        ) as writer:
            writer.expect([(job.name, job.shape, job.out_dtype) for job in plan.jobs])
            # transformers' config check runs in a child process beside the merge (its import costs 1-3 s);
            # a failure stops the merge at the next tensor, and nothing is published until it has passed.
            config_check = ConfigCheck(plan)
            try:

                def add(name: str, tensor: torch.Tensor) -> None:
                    if config_check.failed():
                        config_check.wait()  # raises the ConfigError
                    writer.add(name, tensor)

                stats = run_plan(
                    plan,
                    add,
                    device=compute_device,
                    threads=threads,
                    progress=progress,
                    statistics=statistics,
                )
                config_check.wait()
            finally:
                config_check.close()
            if plan.tokenizer_dir is not None:
                # Tokenizer files come from the tokenizer source, or from the plan when transfuse built the
                # tokenizer (merged vocabulary, chat template); the rest (generation config...) is copied.
                skip = {"config.json"}
                if plan.tokenizer_files is not None or not copy_tokenizer:
                    skip |= {p.name for p in config_files(plan.tokenizer_dir) if is_tokenizer_file(p.name)}
                writer.copy_config_from(plan.tokenizer_dir, skip=tuple(skip))
            if plan.tokenizer_files is not None and copy_tokenizer:
                for name, content in plan.tokenizer_files.items():
                    writer.add_file(name, content)
            if plan.config is not None:
                writer.add_file("config.json", _config_with_dtype(plan))
            writer.add_file("recipe.yaml", f"# written by transfuse {__version__}\n{recipe_yaml}")
            if model_card:
                from transfuse.model_card import render_model_card

                writer.add_file("README.md", render_model_card(plan, recipe_yaml))
            path = writer.finish()
        return MergeResult(
            out_dir=Path(path), stats=stats, plan_notes=list(plan.notes), warnings=list(plan.warnings)
        )


def _config_with_dtype(plan: MergePlan) -> str:
    """The output's config.json: the source config with its dtype set to the output's (when all merged tensors
    share one), so loaders pick the right default dtype."""
    config = dict(plan.config or {})
    dtypes = {j.out_dtype for j in plan.jobs if j.merge}
    if len(dtypes) == 1:
        name = str(dtypes.pop()).removeprefix("torch.")
        for key in ("torch_dtype", "dtype"):
            if key in config:
                config[key] = name
    return json.dumps(config, indent=2, sort_keys=True) + "\n"


def merge_state_dicts(
    base: Mapping[str, torch.Tensor] | None,
    models: Sequence[Mapping[str, torch.Tensor]],
    method: str,
    *,
    seed: int = 0,
    device: str = "cpu",
    statistics: Sequence[ModelStatistics | str | Path] | None = None,
    **params: Any,
) -> dict[str, torch.Tensor]:
    """Merge in-memory state dicts with any registered method; returns a new state dict in the base's dtypes.

    ``params`` are the method's parameters (see ``transfuse methods``); a Python keyword is spelled with a
    trailing underscore (``lambda_=0.5``) or passed as ``**{"lambda": 0.5}``.  A per-model parameter (e.g. ``weight``,
    ``density``) is a scalar for all models or a sequence with one value per model; global ones are scalars.
    ``base`` may be ``None`` only for methods that need no base (``linear``).  On a CPU with several torch threads
    the tensors merge in parallel on that many single-threaded workers; meanwhile torch's process-wide thread
    count reads 1 (it is restored on return).  ``statistics``: for a statistics-based method (``regmean``,
    ``fisher``), one ``ModelStatistics`` or statistics file per model, in the order of ``models``.
    """
    if not models:
        raise RecipeError("merge_state_dicts needs at least one model")
    recipe_dict = _recipe_for_state_dicts(len(models), method, base is not None, params, seed)
    checkpoints = {f"model_{i}": StateDictCheckpoint(m, f"models[{i}]") for i, m in enumerate(models)}
    if base is not None:
        checkpoints["base"] = StateDictCheckpoint(base, "base")
    recipe = Recipe.from_dict(recipe_dict)
    with build_plan(recipe, checkpoints=checkpoints) as plan:
        stacked = None
        if statistics is not None:
            from transfuse.statistics.store import stack_statistics

            if len(statistics) != len(models):
                raise StatisticsError(
                    f"{len(statistics)} statistics for {len(models)} models; give one per model"
                )
            stacked = stack_statistics(statistics)
        return dict(iter_merged(plan, device=validate_device(device), statistics=stacked))


def _recipe_for_state_dicts(
    k: int, method: str, has_base: bool, params: Mapping[str, Any], seed: int
) -> dict[str, Any]:
    from transfuse.methods import get_method

    spec = get_method(method)
    per_model: list[dict[str, Any]] = [{} for _ in range(k)]
    global_params: dict[str, Any] = {}
    for name, value in params.items():
        name = name.removesuffix("_") if name.endswith("_") and keyword.iskeyword(name[:-1]) else name
        param = spec.param(name)
        if param.per_model and isinstance(value, (list, tuple)):
            if len(value) != k:
                raise ParameterError(f"{name!r} has {len(value)} values for {k} models")
            for entry, v in zip(per_model, value):
                entry[name] = v
        elif isinstance(value, (list, tuple)):
            raise ParameterError(f"{name!r} is a global parameter of {method!r}: give one value")
        else:
            global_params[name] = value
    recipe: dict[str, Any] = {
        "merge_method": method,
        "models": [{"model": f"model_{i}", "parameters": p} for i, p in enumerate(per_model)],
        "parameters": global_params,
        "seed": seed,
    }
    if has_base:
        recipe["base_model"] = "base"
    return recipe
