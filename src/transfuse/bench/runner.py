"""Run the benchmark: task suite -> experts (cached) -> multi-task baseline (cached) -> method sweep -> report.

Everything expensive is cached under `cache_dir` (default ``$TRANSFUSE_CACHE_DIR``, else
``$XDG_CACHE_HOME/transfuse``, else ``~/.cache/transfuse``): experts and the multi-task model by their recipe
hash (:mod:`transfuse.train.experts`), evaluations by the content of the evaluated weights
(:mod:`transfuse.eval.cache`).  A second run with the same options retrains nothing and re-evaluates only
merges it has not seen (e.g. a newly registered method).
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from transfuse._version import __version__
from transfuse.bench.config import BenchConfig, BenchConfigError
from transfuse.cache_dir import cache_root as default_cache_dir
from transfuse.data import load_task_suite
from transfuse.eval.cache import EvaluationCache
from transfuse.eval.model_methods import MODEL_METHODS
from transfuse.eval.sweep import SWEEPABLE_FAMILIES, run_method_sweep
from transfuse.methods import get_method
from transfuse.models.backbone import Encoder, resolve_backbone_dir
from transfuse.train import train_experts, train_multitask


def check_config(config: BenchConfig) -> None:
    """Fail before any work on what can be checked cheaply: methods, device, backbone, tasks."""
    if config.methods is not None:
        for name in config.methods:
            if name in MODEL_METHODS:
                continue  # a whole-model method (routed, test-time adaptive)
            spec = get_method(name)  # UnknownMethodError names the methods there are
            if spec.family not in SWEEPABLE_FAMILIES:
                raise BenchConfigError(
                    f"method {name!r} is a {spec.family} method; the benchmark merges its experts with "
                    "data-free and statistics-based methods only (`transfuse methods` lists them by family)"
                )
    if config.device.startswith("cuda") and not torch.cuda.is_available():
        raise BenchConfigError(f"device {config.device!r} asked for, but torch sees no CUDA GPU; use cpu")
    resolve_backbone_dir(config.backbone)  # BackboneNotFoundError says how to install the default one


def run_bench(
    config: BenchConfig,
    *,
    cache_dir: str | Path | None = None,
    evaluation_cache: bool = True,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run the benchmark `config` describes and return its report (see :func:`transfuse.bench.build_report`).

    `evaluation_cache=False` evaluates every model again (experts are still loaded from the cache).
    """
    from transfuse.bench.report import build_report

    say = log or (lambda _msg: None)
    check_config(config)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    start = time.perf_counter()
    timings: dict[str, float] = {}

    suite = load_task_suite(config.pool, tasks=config.tasks, max_train=config.max_train)
    tasks = list(suite)
    if len(tasks) < 2:
        raise BenchConfigError(
            f"the pool has {len(tasks)} task(s); merging needs at least two experts (name more tasks)"
        )
    backbone = resolve_backbone_dir(config.backbone)
    timings["load_s"] = time.perf_counter() - start
    say(f"{len(tasks)} tasks from {config.pool}: {', '.join(t.name for t in tasks)}; backbone {backbone}")

    recipe = dict(
        steps=config.steps,
        batch_size=config.batch_size,
        max_length=config.max_length,
        seed=config.seed,
        device=config.device,
        backbone_dir=backbone,
        progress=progress,
    )
    mark = time.perf_counter()
    experts = train_experts(suite, cache, **recipe)
    timings["experts_s"] = time.perf_counter() - mark
    mark = time.perf_counter()
    recipe_mt = {k: v for k, v in recipe.items() if k != "steps"}
    multitask = train_multitask(suite, cache, steps_per_task=config.steps, **recipe_mt)
    timings["multitask_s"] = time.perf_counter() - mark
    trained_now = [e.task for e in experts.values() if _created_after(e.info, start)]
    multitask_trained_now = _created_after(multitask.info, start)

    mark = time.perf_counter()
    eval_cache = EvaluationCache(cache / "evaluations") if evaluation_cache else None
    sweep = run_method_sweep(
        suite,
        experts,
        Encoder.load(backbone).state_dict(),
        list(config.methods) if config.methods is not None else None,
        grid=config.grid != "none",
        grids=config.grids(),
        device=config.device,
        multitask=multitask,
        backbone_dir=backbone,
        max_length=config.max_length,
        max_examples=config.test_examples,
        choice_max_examples=config.validation_examples,
        seed=config.seed,
        progress=progress,
        cache=eval_cache,
        statistics_examples=config.statistics_examples,
        statistics_cache=cache / "statistics",
        adaptive_steps=config.adaptive_steps,
        adaptive_budget_s=config.adaptive_budget_s,
    )
    timings["sweep_s"] = time.perf_counter() - mark
    timings["total_s"] = time.perf_counter() - start
    run_info = {
        "timings": {k: round(v, 2) for k, v in timings.items()},
        "trained_now": {"experts": trained_now, "multitask": multitask_trained_now},
        "evaluation_cache": (
            {"hits": eval_cache.hits, "misses": eval_cache.misses, "dir": str(eval_cache.directory)}
            if eval_cache is not None
            else None
        ),
        "cache_dir": str(cache),
        "backbone": str(backbone),
        "environment": {
            "transfuse": __version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "device": config.device,
        },
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    return build_report(config, sweep, experts, multitask, run_info)


def _created_after(info: dict[str, Any], start: float) -> bool:
    """Whether a model's ``expert.json`` was written by this run (it records its creation time)."""
    created = info.get("created")
    if not created:
        return False
    began = datetime.now(timezone.utc).timestamp() - (time.perf_counter() - start)
    return datetime.fromisoformat(created).timestamp() >= began - 1
