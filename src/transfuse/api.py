"""The Python entry points of merging: ``merge`` (files in, a model dir out) and ``merge_state_dicts`` (in memory)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from transfuse._version import __version__
from transfuse.engine import MergeStats, iter_merged, run_plan
from transfuse.errors import ParameterError, RecipeError
from transfuse.io.state_dict import StateDictCheckpoint
from transfuse.io.writer import ShardedWriter
from transfuse.plan import MergePlan, build_plan
from transfuse.recipe import Recipe


@dataclass
class MergeResult:
    out_dir: Path
    stats: MergeStats
    plan_notes: list[str]


def parse_size(text: str | int) -> int:
    """``"5GB"``, ``"500MB"``, ``"2GiB"`` or a byte count -> bytes."""
    if isinstance(text, int):
        return text
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20}
    units |= {"GIB": 2**30, "TIB": 2**40, "K": 10**3, "M": 10**6, "G": 10**9}
    s = str(text).strip().upper().replace(" ", "")
    number = s.rstrip("KMGTIB")
    unit = s[len(number) :]
    try:
        value = float(number) * units[unit]
    except (ValueError, KeyError):
        raise RecipeError(f"cannot read size {text!r}; write e.g. 5GB, 500MB or 2GiB") from None
    if value < 1:
        raise RecipeError(f"size {text!r} must be positive")
    return int(value)


def load_recipe(recipe: Recipe | Mapping[str, Any] | str | Path) -> Recipe:
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, Mapping):
        return Recipe.from_dict(dict(recipe))
    return Recipe.load(recipe)


def plan_merge(
    recipe: Recipe | Mapping[str, Any] | str | Path, *, dtype: str | None = None, seed: int | None = None
) -> MergePlan:
    """Read and validate a recipe and its inputs, without merging (what ``--dry-run`` shows)."""
    recipe = load_recipe(recipe)
    if seed is not None:
        recipe.seed = seed
    return build_plan(recipe, out_dtype=dtype)


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
) -> MergeResult:
    """Merge the models a recipe names into ``out_dir`` (sharded safetensors + index, config and tokenizer files).

    The output is built in a temporary folder beside ``out_dir`` and moved into place only when complete.
    ``dtype`` overrides the recipe's output dtype; ``seed`` its seed (random methods).
    """
    max_shard = parse_size(shard_size)
    with plan_merge(recipe, dtype=dtype, seed=seed) as plan:
        recipe_yaml = plan.recipe.to_yaml()
        metadata = {
            "transfuse_version": __version__,
            "merge_method": plan.recipe.method,
            "recipe": recipe_yaml,
        }
        with ShardedWriter(
            out_dir, max_shard_bytes=max_shard, metadata=metadata, overwrite=overwrite
        ) as writer:
            writer.expect([(job.name, job.shape, job.out_dtype) for job in plan.jobs])
            stats = run_plan(plan, writer.add, device=device, threads=threads, progress=progress)
            if plan.config_source is not None:
                writer.copy_config_from(plan.config_source)
                config = _config_with_dtype(plan)
                if config is not None:
                    writer.add_file("config.json", config)
            writer.add_file("recipe.yaml", f"# written by transfuse {__version__}\n{recipe_yaml}")
            path = writer.finish()
        return MergeResult(out_dir=Path(path), stats=stats, plan_notes=list(plan.notes))


def _config_with_dtype(plan: MergePlan) -> str | None:
    """The source config.json with its dtype set to the output's, so loaders pick the right default dtype."""
    path = plan.config_source / "config.json" if plan.config_source else None
    dtypes = {j.out_dtype for j in plan.jobs if j.merge}
    if path is None or not path.is_file() or len(dtypes) != 1:
        return None
    config = json.loads(path.read_text())
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
    **params: Any,
) -> dict[str, torch.Tensor]:
    """Merge in-memory state dicts with any registered method; returns a new state dict in the base's dtypes.

    ``params`` are the method's parameters (see ``transfuse methods``).  A per-model parameter (e.g. ``weight``,
    ``density``) is a scalar for all models or a sequence with one value per model; global ones are scalars.
    ``base`` may be ``None`` only for methods that need no base (``linear``).  On a CPU with several torch threads
    the tensors merge in parallel on that many single-threaded workers; meanwhile torch's process-wide thread
    count reads 1 (it is restored on return).
    """
    if not models:
        raise RecipeError("merge_state_dicts needs at least one model")
    recipe_dict = _recipe_for_state_dicts(len(models), method, base is not None, params, seed)
    checkpoints = {f"model_{i}": StateDictCheckpoint(m, f"models[{i}]") for i, m in enumerate(models)}
    if base is not None:
        checkpoints["base"] = StateDictCheckpoint(base, "base")
    recipe = Recipe.from_dict(recipe_dict)
    with build_plan(recipe, checkpoints=checkpoints) as plan:
        return dict(iter_merged(plan, device=device))


def _recipe_for_state_dicts(
    k: int, method: str, has_base: bool, params: Mapping[str, Any], seed: int
) -> dict[str, Any]:
    from transfuse.methods import get_method

    spec = get_method(method)
    per_model: list[dict[str, Any]] = [{} for _ in range(k)]
    global_params: dict[str, Any] = {}
    for name, value in params.items():
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
