"""Learned AdaMerging coefficients as an ordinary transfuse recipe, which ``transfuse merge`` replays.

AdaMerging's merge ``theta_0 + sum_k lambda_{j(k,n)} tau_k[n]`` is task arithmetic with ``lambda: 1`` and, for
each model k, a per-tensor ``weight`` given as a MergeKit filter list ``[{filter: <tensor name>, value: v},
..., {value: default}]``.  A filter matches a tensor when it is a substring of the tensor's name and the first
match wins, so the entries are full tensor names, longest first (a longer name cannot be a substring of a
shorter one, so each listed tensor matches itself first), and a tensor left to the default is listed too
whenever a listed filter is a substring of its name.  Each list is checked with the recipe reader's own
resolution (``transfuse.recipe.evaluate_setting``) for every tensor name before it is returned.

AdaMerging++ replays as ``ties`` with ``density`` = the TIES density, ``sign_election: unweighted`` (the sign of
the unweighted sum of the trimmed vectors, so the weights do not move the election), ``normalize: false``
(AdaMerging++ sums the selected entries without dividing) and the same weight lists.

The replay reads the experts' model files: it gives the learned model when each model's tensors minus the
base's are the task vectors the coefficients were learned on (a tensor missing from a task vector must equal
the base's in that model; for AdaMerging it then gets weight 0, for AdaMerging++ it still takes part in the
sign election).  Tensors in no task vector get weight 0 in every model, so they stay the base's.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from transfuse.adapt.adamerging import AdaMergingResult
from transfuse.adapt.errors import RecipeExportError, UnknownTaskError
from transfuse.errors import TransfuseError
from transfuse.recipe import evaluate_setting


def weight_filters(
    values: Mapping[str, float], names: Iterable[str], fill: float = 0.0
) -> float | list[dict]:
    """A ``weight`` setting giving ``values[n]`` to each tensor ``n`` in ``values`` and ``fill`` to the other
    ``names``: a scalar when all are equal, else a filter list whose last entry (no filter) holds the most
    common value, checked against the recipe reader's resolution for every name."""
    want = {n: float(fill) for n in names}
    want.update({n: float(v) for n, v in values.items()})
    if not want:
        return float(fill)
    default = Counter(want.values()).most_common(1)[0][0]
    explicit = {n: v for n, v in want.items() if v != default}
    if not explicit:
        return default
    for n, v in want.items():  # a default tensor that a listed filter would capture is listed too
        if n not in explicit and any(f in n for f in explicit):
            explicit[n] = v
    order = sorted(explicit, key=lambda n: (-len(n), n))
    setting: list[dict] = [{"filter": n, "value": explicit[n]} for n in order] + [{"value": default}]
    for n, v in want.items():
        got = evaluate_setting(setting, n, 0.0)
        if got != v:
            raise RecipeExportError(f"the weight filters give tensor {n!r} {got} instead of {v}")
    return setting


def adamerging_recipe(
    result: AdaMergingResult,
    base_model: str | Path,
    models: Mapping[str, str | Path],
    *,
    dtype: str | None = None,
    tensor_names: Iterable[str] | None = None,
) -> dict[str, Any]:
    """The recipe (a dict in transfuse's / MergeKit's schema) that replays ``result``'s merge.

    ``models[task]`` is the model directory (or file) of ``task``'s expert; ``base_model`` the base's.  The
    filters cover ``tensor_names`` (default: the base state dict's names, plus the base checkpoint's when
    ``base_model`` can be opened).  ``dtype``: the output dtype (default: the base's).
    """
    tasks = list(result.layout.tasks)
    unknown = [t for t in models if t not in tasks]
    if unknown:
        raise UnknownTaskError(f"model paths given for unknown tasks {unknown}; the tasks are {tasks}")
    missing = [t for t in tasks if t not in models]
    if missing:
        raise RecipeExportError(f"no model path for tasks {missing}: give models={{task: expert dir}}")
    names = _tensor_names(result, base_model, tensor_names)
    by_task = result.coefficients_by_task()
    entries = []
    for task in tasks:
        parameters: dict[str, Any] = {"weight": weight_filters(by_task[task], names, 0.0)}
        if result.ties_density is not None:
            parameters = {"density": result.ties_density, **parameters}
        entries.append({"model": str(models[task]), "parameters": parameters})
    recipe: dict[str, Any] = {
        "merge_method": "task_arithmetic" if result.ties_density is None else "ties",
        "base_model": str(base_model),
        "models": entries,
        "parameters": {"lambda": 1.0, "normalize": False},
    }
    if result.ties_density is not None:
        recipe["parameters"]["sign_election"] = "unweighted"
    if dtype is not None:
        recipe["dtype"] = dtype
    return recipe


def adamerging_recipe_yaml(
    result: AdaMergingResult,
    base_model: str | Path,
    models: Mapping[str, str | Path],
    *,
    dtype: str | None = None,
    tensor_names: Iterable[str] | None = None,
) -> str:
    """:func:`adamerging_recipe` as YAML text, with a comment saying how the coefficients were learned."""
    recipe = adamerging_recipe(result, base_model, models, dtype=dtype, tensor_names=tensor_names)
    variant = (
        "AdaMerging" if result.ties_density is None else f"AdaMerging++ (TIES density {result.ties_density})"
    )
    first, last = (result.entropy[0], result.entropy[-1]) if result.entropy else (float("nan"),) * 2
    header = (
        f"# {variant}, {result.granularity}-wise: {len(result.layout)} coefficients learned in {result.steps} "
        f"steps (init {result.init}); entropy {first:.4f} -> {last:.4f}\n"
    )
    return header + yaml.safe_dump(recipe, sort_keys=False, allow_unicode=True)


def write_adamerging_recipe(
    result: AdaMergingResult,
    path: str | Path,
    base_model: str | Path,
    models: Mapping[str, str | Path],
    *,
    dtype: str | None = None,
    tensor_names: Iterable[str] | None = None,
) -> Path:
    """Write :func:`adamerging_recipe_yaml` to ``path``; ``transfuse merge <path> OUT`` replays it."""
    path = Path(path)
    path.write_text(
        adamerging_recipe_yaml(result, base_model, models, dtype=dtype, tensor_names=tensor_names),
        encoding="utf-8",
    )
    return path


def _tensor_names(
    result: AdaMergingResult, base_model: str | Path, tensor_names: Iterable[str] | None
) -> list[str]:
    if tensor_names is not None:
        return list(tensor_names)
    names = list(result._merge.base) if result._merge is not None else []
    if Path(base_model).exists():
        from transfuse.io.checkpoint import open_checkpoint

        try:
            checkpoint = open_checkpoint(base_model)
        except (TransfuseError, OSError):  # the replay reports an unreadable base; the names suffice here
            return names
        try:
            known = set(names)
            names += [n for n in checkpoint.names() if n not in known]
        finally:
            checkpoint.close()
    return names
