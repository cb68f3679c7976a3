"""Merge a set of experts with every data-free method, tune each method's main knob on validation, score on test.

For each method: merge the experts' encoders with :func:`transfuse.merge_state_dicts` (base = the pretrained
backbone) at the method's default parameters and, with ``grid=True``, at each point of a small grid; evaluate
every candidate on `split_for_choice` (validation) through the experts' own heads; keep the one with the best
mean accuracy (ties: the earlier candidate, defaults first); report that one on the test split.

Default grids (:data:`DEFAULT_GRIDS`; override per method with ``grids=``):

==========================================  =====================================================================
methods                                     grid
==========================================  =====================================================================
task_arithmetic                             lambda 0.1, 0.2, 0.3, 0.5, 0.7, 1.0
magmax, consensus                           lambda 0.2, 0.3, 0.5, 0.7, 1.0
ties                                        density 0.1, 0.2, 0.3, 0.5, 0.7 (normalized: the scale is kept)
della                                       density 0.3, 0.5, 0.7 (density +/- epsilon must stay in (0, 1))
pcb                                         density 0.05, 0.1, 0.2, 0.4
dare_linear, dare_ties, breadcrumbs,        density 0.2, 0.5, 0.8 x lambda 0.3, 1.0: these SUM the K sparsified
breadcrumbs_ties, della_linear              task vectors (normalize=false), so their scale needs tuning too
tsv                                         alpha 0.5, 0.75, 1.0, 1.25, 1.5
iso_c, iso_cts                              alpha 0.5, 1.0, 1.5, 2.0
slerp                                       t 0.25, 0.5, 0.75 (only with exactly one expert)
nearswap                                    t 1e-4, 1e-3, 1e-2 (typical |delta| scales; exactly one expert)
linear, model_stock, fisher                 none (defaults only)
regmean                                     alpha 0.5, 0.9, 1.0 (off-diagonal shrinkage)
wudi                                        solver adam, closed_form x alpha 0.5, 0.75, 1.0, 1.25
any other method                            its first of lambda / density / alpha / t, three values
==========================================  =====================================================================

The first candidate is the method's defaults; a required parameter without a default (``nearswap``'s ``t``)
takes the middle value of the method's grid for it there (:func:`default_candidate`).

A method whose arity does not admit K experts (``min_models``/``max_models``) is skipped, with the reason in
``result["skipped"]``; a candidate whose merge fails records its error and the others go on.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from transfuse.data.task import Task, TaskSuite
from transfuse.errors import TransfuseError
from transfuse.eval.cache import EvaluationCache, tensors_digest
from transfuse.eval.harness import EvaluationError, evaluate
from transfuse.eval.metrics import gain_retained, mean_accuracy, normalized_accuracy
from transfuse.eval.model_methods import MODEL_METHODS, ModelMethodInputs, split_methods
from transfuse.methods import available_methods, get_method
from transfuse.methods.registry import MethodSpec
from transfuse.models.backbone import Encoder
from transfuse.models.head import TaskHead, load_heads

_SUM_STYLE = {"density": (0.2, 0.5, 0.8), "lambda": (0.3, 1.0)}

#: The knob(s) tuned per method: ``{method: {parameter: values}}``; the grid is their cross product.
DEFAULT_GRIDS: dict[str, dict[str, tuple[Any, ...]]] = {
    "task_arithmetic": {"lambda": (0.1, 0.2, 0.3, 0.5, 0.7, 1.0)},
    "magmax": {"lambda": (0.2, 0.3, 0.5, 0.7, 1.0)},
    "consensus": {"lambda": (0.2, 0.3, 0.5, 0.7, 1.0)},
    "ties": {"density": (0.1, 0.2, 0.3, 0.5, 0.7)},
    "della": {"density": (0.3, 0.5, 0.7)},
    "pcb": {"density": (0.05, 0.1, 0.2, 0.4)},
    "dare_linear": _SUM_STYLE,
    "dare_ties": _SUM_STYLE,
    "breadcrumbs": _SUM_STYLE,
    "breadcrumbs_ties": _SUM_STYLE,
    "della_linear": _SUM_STYLE,
    "tsv": {"alpha": (0.5, 0.75, 1.0, 1.25, 1.5)},
    "iso_c": {"alpha": (0.5, 1.0, 1.5, 2.0)},
    "iso_cts": {"alpha": (0.5, 1.0, 1.5, 2.0)},
    "slerp": {"t": (0.25, 0.5, 0.75)},
    "nearswap": {"t": (1e-4, 1e-3, 1e-2)},
    "linear": {},
    "model_stock": {},
    "regmean": {"alpha": (0.5, 0.9, 1.0)},
    "wudi": {"solver": ("adam", "closed_form"), "alpha": (0.5, 0.75, 1.0, 1.25)},
    "fisher": {},
}

#: For methods not in :data:`DEFAULT_GRIDS`: the first of these knobs the method has.
FALLBACK_KNOBS: dict[str, tuple[float, ...]] = {
    "lambda": (0.3, 0.5, 1.0),
    "density": (0.2, 0.5, 0.8),
    "alpha": (0.5, 1.0, 1.5),
    "t": (0.25, 0.5, 0.75),
}


#: The families a sweep runs: data-free methods merge from the weights alone; statistics-based ones also get
#: each expert's statistics computed on its task's train split (see transfuse.eval.expert_statistics).
SWEEPABLE_FAMILIES = ("data-free", "needs-statistics")


def sweepable_methods(methods: Sequence[str] | None = None) -> list[MethodSpec]:
    """The methods a sweep runs: `methods` by name, or every registered data-free method.

    Data-free and statistics-based methods (``needs-statistics``: named explicitly, since they need data) can be
    swept; a routed method keeps several experts and has no single merged encoder to score here.  Naming one
    raises ``EvaluationError``.
    """
    if methods is None:
        return available_methods(family="data-free")
    specs = [get_method(m) for m in methods]
    for spec in specs:
        _require_sweepable(spec)
    return specs


def _require_sweepable(spec: MethodSpec) -> None:
    if spec.family not in SWEEPABLE_FAMILIES:
        raise EvaluationError(
            f"method {spec.name!r} is a {spec.family} method; the method sweep merges data-free and "
            "statistics-based methods only (`transfuse methods --family data-free` lists the first)"
        )


def method_grid(spec: MethodSpec, grids: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """The grid points (parameter overrides) tried for `spec`, without the all-defaults point (sweepable
    methods only, see :func:`sweepable_methods`)."""
    _require_sweepable(spec)
    if grids is not None and spec.name in grids:
        table = grids[spec.name]
    elif spec.name in DEFAULT_GRIDS:
        table = DEFAULT_GRIDS[spec.name]
    else:
        names = {p.name for p in spec.params}
        knob = next((k for k in FALLBACK_KNOBS if k in names), None)
        table = {knob: FALLBACK_KNOBS[knob]} if knob else {}
    if isinstance(table, Sequence) and not isinstance(table, str):
        return [dict(point) for point in table]
    keys = list(table)
    return (
        [dict(zip(keys, values)) for values in itertools.product(*(table[k] for k in keys))] if keys else []
    )


def default_candidate(spec: MethodSpec, grids: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The overrides of the sweep's first, "defaults" candidate: none, except that a parameter without a default
    (required, e.g. ``nearswap``'s ``t``) takes the middle of the values the method's grid gives it (the lower
    middle of an even count).  ``EvaluationError`` when the grid gives such a parameter no value."""
    required = [p.name for p in spec.params if p.default is None and not p.inert]
    if not required:
        return {}
    points = method_grid(spec, grids)
    chosen: dict[str, Any] = {}
    for name in required:
        values = sorted({point[name] for point in points if name in point})
        if not values:
            raise EvaluationError(
                f"method {spec.name!r}: parameter {name!r} has no default and its sweep grid gives it no value; "
                f"pass grids={{{spec.name!r}: {{{name!r}: (...)}}}}"
            )
        chosen[name] = values[(len(values) - 1) // 2]
    return chosen


def run_method_sweep(
    suite: TaskSuite | Sequence[Task],
    experts: Mapping[str, Any] | Sequence[Any],
    pretrained_state: Mapping[str, torch.Tensor] | str | Path,
    methods: Sequence[str] | None = None,
    *,
    grid: bool = True,
    grids: Mapping[str, Any] | None = None,
    split_for_choice: str = "validation",
    device: str = "cpu",
    multitask: Any = None,
    backbone_dir: str | Path | None = None,
    batch_size: int = 64,
    max_length: int = 48,
    max_examples: int | None = None,
    choice_max_examples: int | None | str = "same",
    seed: int = 0,
    keep_correct: bool = True,
    progress: bool = True,
    cache: EvaluationCache | None = None,
    statistics_examples: int = 256,
    statistics_cache: str | Path | None = None,
    adaptive_steps: int = 100,
    adaptive_budget_s: float | None = 600.0,
) -> dict[str, Any]:
    """Merge the experts of `suite`'s tasks with each method, choose its parameters on validation, score on test.

    - `experts`: ``{task: Expert | expert dir}`` or a sequence of them in suite order (one per task);
    - `pretrained_state`: the backbone's state dict (or its directory): the base of every merge;
    - `methods`: names (default: every registered data-free method; naming a method of another family, e.g.
      one that needs per-tensor statistics, raises ``EvaluationError`` before any work);
    - `grids`: ``{method: {param: values}}`` (cross product) or ``{method: [overrides, ...]}`` replacing
      :data:`DEFAULT_GRIDS` for those methods; with ``grid=False`` only the defaults are merged;
    - `multitask`: a multi-task model (Expert or directory) to add as a baseline;
    - `backbone_dir`: architecture and tokenizer for merged state dicts (default: the first expert's dir);
    - `max_examples`: score only the first `max_examples` test examples of each task (None: all);
      `choice_max_examples`: the same for `split_for_choice` (default: `max_examples`);
    - `cache`: an :class:`~transfuse.eval.cache.EvaluationCache`; evaluations of weights it has seen on the
      same examples are read from it instead of being run again;
    - `statistics_examples`: for statistics-based methods, the train examples per task each expert's
      statistics are computed on (:func:`~transfuse.eval.expert_statistics.expert_statistics`; cached in
      `statistics_cache` when given).  Such a method's result records ``"data"``: what it used;
    - `methods` may also name whole-model methods (:data:`~transfuse.eval.model_methods.MODEL_METHODS`: EMR,
      RegMean++, AdaMerging); the test-time ones adapt on the unlabeled test inputs for at most
      `adaptive_steps` steps or `adaptive_budget_s` seconds.

    Returns (JSON-serializable)::

        {"tasks": [...], "split_for_choice": "validation", "num_experts": K,
         "results": {method: {"per_task": {task: acc}, "mean": m, "normalized": n, "gain_retained": g,
                              "params": {all parameters of the chosen merge}, "chosen_on": split,
                              "candidates": [{"params": overrides, "validation_mean": v} | {..., "error": e}],
                              "seconds": s}},
         "skipped": {method: reason},
         "baselines": {"pretrained" | "individual" | "multitask": {"per_task", "mean", "normalized",
                                                                  "gain_retained"}},
         "correct": {method or baseline: {task: [0/1 per test item]}}}   # with keep_correct

    ``normalized`` is relative to the individual experts' test accuracies, ``gain_retained`` also to the
    pretrained encoder's (see :mod:`transfuse.eval.metrics`).
    """
    per_tensor, whole_model = split_methods(methods)
    specs = sweepable_methods(per_tensor)  # fail before any work on a method this sweep cannot run
    tasks = list(suite)
    names = [t.name for t in tasks]
    expert_dirs = _expert_dirs(experts, names)
    heads = _expert_heads(expert_dirs, device)
    states = [Encoder.load(expert_dirs[n]).state_dict() for n in names]
    architecture = backbone_dir if backbone_dir is not None else expert_dirs[names[0]]
    if isinstance(pretrained_state, (str, Path)):
        pretrained_state = Encoder.load(pretrained_state).state_dict()
    # Only the experts' tensors: a raw checkpoint may carry extra buffers (e.g. embeddings.position_ids).
    base = {k: v.detach().clone() for k, v in pretrained_state.items() if k in states[0]}
    encoder = Encoder.from_state_dict(base, architecture, device=device)
    if choice_max_examples == "same":
        choice_max_examples = max_examples
    eval_kwargs = dict(batch_size=batch_size, max_length=max_length, device=device)
    log = _log if progress else (lambda *_: None)
    heads_digest = _heads_digest(heads) if cache is not None else ""

    def run(
        model: Encoder,
        model_heads: Mapping[str, TaskHead],
        on: list[Task],
        split: str,
        state: Mapping[str, torch.Tensor] | _LazyMerge | None = None,
        digest_of_heads: str | None = None,
    ) -> Any:
        """Evaluate `model` (after loading `state` into it), through the cache when there is one."""
        limit = max_examples if split == "test" else choice_max_examples
        key = None
        if cache is not None:
            if isinstance(state, _LazyMerge):
                weights = state.digest()
            else:
                weights = tensors_digest(state if state is not None else model.state_dict())
            key = cache.key(
                weights,
                digest_of_heads or heads_digest,
                on,
                split,
                max_examples=limit,
                max_length=max_length,
                device=device,
            )
            found = cache.get(key)
            if found is not None:
                return found
        if state is not None:
            model.load_state_dict(state.state() if isinstance(state, _LazyMerge) else state)
        acc, hits = evaluate(
            model, model_heads, on, split=split, return_correct=True, max_examples=limit, **eval_kwargs
        )
        if key is not None:
            cache.put(key, acc, hits)
        return acc, hits

    def score(state: Mapping[str, torch.Tensor] | _LazyMerge, split: str) -> Any:
        return run(encoder, heads, tasks, split, state)

    base_digest = tensors_digest(base) if cache is not None else ""
    state_digests = [tensors_digest(st) for st in states] if cache is not None else []

    correct: dict[str, dict[str, list[int]]] = {}

    # ---- baselines ------------------------------------------------------------------------------------
    pretrained_acc, pretrained_correct = score(base, "test")
    individual_acc: dict[str, float] = {}
    individual_correct: dict[str, np.ndarray] = {}
    for name, state in zip(names, states):
        acc, hits = run(encoder, heads, [_task(tasks, name)], "test", state)
        individual_acc.update(acc)
        individual_correct.update(hits)

    def summary(per_task: Mapping[str, float]) -> dict[str, Any]:
        return {
            "per_task": dict(per_task),
            "mean": mean_accuracy(per_task),
            "normalized": normalized_accuracy(per_task, individual_acc),
            "gain_retained": _finite(gain_retained(per_task, individual_acc, pretrained_acc)),
        }

    baselines = {"pretrained": summary(pretrained_acc), "individual": summary(individual_acc)}
    correct["pretrained"] = _as_lists(pretrained_correct)
    correct["individual"] = _as_lists(individual_correct)
    if multitask is not None:
        path = Path(getattr(multitask, "path", multitask))
        mt_encoder = Encoder.load(path, device=device)
        mt_heads = load_heads(path, device=device)
        mt_heads_digest = _heads_digest(mt_heads) if cache is not None else None
        acc, hits = run(mt_encoder, mt_heads, tasks, "test", digest_of_heads=mt_heads_digest)
        baselines["multitask"] = summary(acc)
        correct["multitask"] = _as_lists(hits)
        del mt_encoder
    log(
        f"baselines: pretrained {baselines['pretrained']['mean']:.3f}, experts {baselines['individual']['mean']:.3f}"
    )

    # ---- statistics of the experts, for the methods that need them ---------------------------------------
    kinds = sorted({kind for spec in specs for kind in spec.needs})
    expert_stats: list[Any] = []
    stats_digest = ""
    stats_seconds = 0.0
    if kinds:
        from transfuse.eval.expert_statistics import expert_statistics

        mark = time.perf_counter()
        for name in names:
            expert_encoder = Encoder.load(expert_dirs[name], device=device)
            expert_stats.append(
                expert_statistics(
                    expert_encoder,
                    heads[name],
                    _task(tasks, name),
                    kinds,
                    examples=statistics_examples,
                    max_length=max_length,
                    seed=seed,
                    cache_dir=statistics_cache,
                )
            )
            del expert_encoder
        stats_seconds = time.perf_counter() - mark
        if cache is not None:
            stats_digest = tensors_digest(
                {
                    f"{i}/{kind}/{n}": t
                    for i, st in enumerate(expert_stats)
                    for kind, by in st.tensors.items()
                    for n, t in by.items()
                }  # fmt: skip
            )
        log(f"statistics ({', '.join(kinds)}) of {len(names)} experts: {stats_seconds:.1f} s")

    # ---- methods --------------------------------------------------------------------------------------
    k = len(names)
    results: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    for spec in specs:
        reason = _arity_problem(spec, k)
        if reason is not None:
            skipped[spec.name] = reason
            log(f"{spec.name}: skipped ({reason})")
            continue
        start = time.perf_counter()
        try:
            candidates: list[dict[str, Any]] = [default_candidate(spec, grids)]
        except EvaluationError as exc:
            skipped[spec.name] = str(exc)
            log(f"{spec.name}: skipped ({exc})")
            continue
        if grid:
            defaults = spec.defaults()
            for point in method_grid(spec, grids):
                same_as_defaults = all(defaults.get(name) == value for name, value in point.items())
                if not same_as_defaults and point not in candidates:
                    candidates.append(point)
        tried: list[dict[str, Any]] = []
        best: tuple[float, dict[str, Any], _LazyMerge] | None = None
        unit_merges: dict[str, _LazyMerge] = {}  # output-scale methods: one merge at scale 1 per other-params
        method_stats = expert_stats if spec.needs else None
        for overrides in candidates:
            merged = _LazyMerge(spec, base, states, overrides, seed, device, method_stats)
            if spec.output_scale is not None:
                unit_params = {**overrides, spec.output_scale: 1.0}
                unit_key = repr(sorted(unit_params.items()))
                if unit_key not in unit_merges:
                    unit_merges[unit_key] = _LazyMerge(
                        spec, base, states, unit_params, seed, device, method_stats
                    )
                merged.unit = unit_merges[unit_key]
            if cache is not None:
                keyed = {**overrides, "_statistics": stats_digest} if spec.needs else overrides
                merged.memo = (
                    cache,
                    cache.merge_key(spec.name, keyed, seed, base_digest, state_digests, device),
                )
            try:
                merged.check()
            except (TransfuseError, ValueError, RuntimeError) as exc:
                tried.append({"params": overrides, "error": f"{type(exc).__name__}: {exc}"})
                continue
            if len(candidates) == 1:  # nothing to choose: go straight to test
                tried.append({"params": overrides})
                best = (math.nan, overrides, merged)
                break
            acc, _ = score(merged, split_for_choice)
            value = mean_accuracy(acc)
            tried.append({"params": overrides, f"{_split_key(split_for_choice)}_mean": value})
            if best is None or value > best[0]:
                best = (value, overrides, merged)
            del merged
        if best is None:
            skipped[spec.name] = "every merge failed: " + "; ".join(t["error"] for t in tried)
            log(f"{spec.name}: failed")
            continue
        value, overrides, merged = best
        acc, hits = score(merged, "test")
        params = {k_: v for k_, v in spec.defaults().items() if k_ != "weight"}
        params.update(overrides)
        results[spec.name] = {
            **summary(acc),
            "params": params,
            "overrides": overrides,
            "chosen_on": split_for_choice if len(candidates) > 1 else "defaults (no grid)",
            "candidates": tried,
            "seconds": round(time.perf_counter() - start, 2),
        }
        if spec.needs:
            results[spec.name]["data"] = {
                "statistics": list(spec.needs),
                "split": "train",
                "examples_per_task": min(statistics_examples, min(len(t.split("train")) for t in tasks)),
                "statistics_seconds": round(stats_seconds, 2),
            }
        correct[spec.name] = _as_lists(hits)
        log(
            f"{spec.name}: test mean {results[spec.name]['mean']:.3f} "
            f"normalized {results[spec.name]['normalized']:.3f} with {overrides or 'defaults'}"
        )
        del merged, best

    # ---- whole-model methods (routed, test-time adaptive) ------------------------------------------------
    for method_name in whole_model:
        method = MODEL_METHODS[method_name]
        start = time.perf_counter()
        inputs = ModelMethodInputs(
            tasks=tasks,
            base=base,
            experts=states,
            heads=heads,
            architecture=architecture,
            device=device,
            max_length=max_length,
            seed=seed,
            progress=progress,
            statistics_examples=statistics_examples,
            adaptive_steps=adaptive_steps,
            adaptive_budget_s=adaptive_budget_s,
            test_examples=max_examples,
            # Start AdaMerging where task arithmetic's validation choice is (the paper's 0.3 assumes its own
            # experts: with eight TEXT-8 task vectors 0.3 each overshoots and entropy descent does not recover).
            adaptive_init=float(results.get("task_arithmetic", {}).get("params", {}).get("lambda", 0.3)),
        )
        try:
            output = method.run(inputs)
        except (TransfuseError, ValueError, RuntimeError) as exc:
            skipped[method_name] = f"failed: {type(exc).__name__}: {exc}"
            log(f"{method_name}: failed ({exc})")
            continue
        if output.model is not None:  # routes per example: scored as it is, without task ids
            acc, hits = evaluate(
                output.model, heads, tasks, split="test", return_correct=True, max_examples=max_examples,
                **eval_kwargs,
            )  # fmt: skip
        elif output.per_task is not None:  # one model per task (routed by the task id)
            acc, hits = {}, {}
            for task in tasks:
                a, h = run(encoder, heads, [task], "test", output.per_task[task.name])
                acc.update(a)
                hits.update(h)
        else:
            assert output.merged is not None
            acc, hits = score(output.merged, "test")
        results[method_name] = {
            **summary(acc),
            "params": dict(output.info.get("params", {})),
            "chosen_on": "no choice (tuning-free)" if method.family == "routed" else method.data,
            "candidates": [],
            "seconds": round(time.perf_counter() - start, 2),
            "family": method.family,
            "data": {"uses": method.data},
            **{k_: v for k_, v in output.info.items() if k_ != "params"},
        }
        correct[method_name] = _as_lists(hits)
        log(
            f"{method_name}: test mean {results[method_name]['mean']:.3f} "
            f"normalized {results[method_name]['normalized']:.3f}"
        )
        del output

    out: dict[str, Any] = {
        "tasks": names,
        "num_experts": k,
        "split_for_choice": split_for_choice,
        "results": results,
        "skipped": skipped,
        "baselines": baselines,
    }
    if keep_correct:
        out["correct"] = correct
    return out


# ---- helpers ---------------------------------------------------------------------------------------------


class _LazyMerge:
    """One candidate merge, computed only when it is needed: when its evaluation is not in the cache, or
    when the cache does not know the merge's digest yet (the merge memo, see
    :meth:`~transfuse.eval.cache.EvaluationCache.merge_key`).  A failing merge fails in :meth:`check`."""

    def __init__(
        self,
        spec: MethodSpec,
        base: Mapping[str, torch.Tensor],
        states: list[dict[str, torch.Tensor]],
        overrides: Mapping[str, Any],
        seed: int,
        device: str,
        statistics: Sequence[Any] | None = None,
    ) -> None:
        self.spec, self.base, self.states = spec, base, states
        self.statistics = statistics
        self.overrides, self.seed, self.device = dict(overrides), seed, device
        self.memo: tuple[EvaluationCache, str] | None = None
        self.unit: _LazyMerge | None = None  # the same merge at output scale 1, to rescale (see state())
        self._state: dict[str, torch.Tensor] | None = None
        self._digest: str | None = None

    def check(self) -> None:
        """Raise what merging would raise; merges now unless the memo already knows this merge's digest."""
        if self.memo is not None:
            cache, key = self.memo
            self._digest = cache.get_merge(key)
            if self._digest is not None:
                return
        self.state()

    def state(self) -> dict[str, torch.Tensor]:
        """The merged state dict.  For a method whose output scale p only scales the merged delta
        (``MethodSpec.output_scale``), it is ``base + p * (unit - base)`` from the merge at p = 1: one
        (costly, SVD-based) merge serves every grid value of p, equal to merging at p up to float rounding."""
        if self._state is None:
            if self.unit is not None:
                scale = float(
                    self.overrides.get(self.spec.output_scale, self.spec.defaults()[self.spec.output_scale])
                )
                unit = self.unit.state()
                self._state = (
                    {
                        k: (self.base[k] + scale * (v - self.base[k])).to(v.dtype)
                        if v.is_floating_point()
                        else v
                        for k, v in unit.items()
                    }
                    if scale != 1.0
                    else unit
                )
            else:
                from transfuse.api import merge_state_dicts

                self._state = merge_state_dicts(
                    self.base,
                    self.states,
                    self.spec.name,
                    seed=self.seed,
                    device=self.device,
                    statistics=self.statistics,
                    **self.overrides,
                )
        return self._state

    def digest(self) -> str:
        if self._digest is None:
            self._digest = tensors_digest(self.state())
            if self.memo is not None:
                cache, key = self.memo
                cache.put_merge(key, self._digest)
        return self._digest


def _heads_digest(heads: Mapping[str, TaskHead]) -> str:
    return tensors_digest(
        {f"{task}/{k}": v for task, head in sorted(heads.items()) for k, v in head.state_dict().items()}
    )


def _arity_problem(spec: MethodSpec, k: int) -> str | None:
    if k < spec.min_models:
        return f"{spec.name} needs at least {spec.min_models} models besides the base; there are {k} experts"
    if spec.max_models is not None and k > spec.max_models:
        exactly = "exactly" if spec.max_models == spec.min_models else "at most"
        return f"{spec.name} merges {exactly} {spec.max_models} model(s) into the base; there are {k} experts"
    return None


def _expert_dirs(experts: Mapping[str, Any] | Sequence[Any], names: list[str]) -> dict[str, Path]:
    if isinstance(experts, Mapping):
        missing = [n for n in names if n not in experts]
        if missing:
            raise EvaluationError(f"no expert for tasks {missing}")
        items = {n: experts[n] for n in names}
    else:
        items = list(experts)
        if len(items) != len(names):
            raise EvaluationError(f"{len(items)} experts for {len(names)} tasks")
        items = dict(zip(names, items))
    return {n: Path(getattr(e, "path", e)) for n, e in items.items()}


def _expert_heads(dirs: Mapping[str, Path], device: str) -> dict[str, TaskHead]:
    heads = {}
    for name, path in dirs.items():
        found = load_heads(path, device=device)
        if name not in found:
            raise EvaluationError(
                f"the expert in {path} has no head for task {name!r} (it has {sorted(found)})"
            )
        heads[name] = found[name]
    return heads


def _task(tasks: list[Task], name: str) -> Task:
    return next(t for t in tasks if t.name == name)


def _as_lists(correct: Mapping[str, np.ndarray]) -> dict[str, list[int]]:
    return {t: np.asarray(v, dtype=np.int8).tolist() for t, v in correct.items()}


def _finite(x: float) -> float | None:
    return None if math.isnan(x) else x


def _split_key(split: str) -> str:
    return "validation" if split in ("validation", "valid", "val", "dev") else split


def _log(message: str) -> None:
    from rich.console import Console

    Console(stderr=True).log(message)
