"""Which statistics a merge plan gets, checked against its tensors before any work."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from transfuse.methods.context import MissingStatisticsError
from transfuse.statistics.store import StatisticsError, StatisticsSet

if TYPE_CHECKING:
    from transfuse.plan import MergePlan


def statistics_for_plan(plan: MergePlan, paths: Sequence[str | Path] | None = None) -> StatisticsSet | None:
    """The statistics of ``plan``'s task models — ``paths`` (one per task model, in the recipe's order) or
    the recipe's ``models[].statistics`` — checked with :func:`check_statistics`; ``None`` for a method that
    needs none.  ``MissingStatisticsError`` names a model without a file."""
    spec = plan.spec
    if not spec.needs:
        return None
    entries = plan.recipe.task_models if plan.recipe.slices is None else []
    if paths is None:
        missing = [e.label for e in entries if not e.statistics]
        if missing or not entries:
            raise MissingStatisticsError(
                f"method {spec.name!r} needs {', '.join(spec.needs)} statistics for every model; none given for "
                f"{', '.join(missing) or 'the models'}: make them with `transfuse statistics MODEL --data ...` "
                "and name each file as `statistics:` beside its `model:` in the recipe"
            )
        paths = [e.statistics for e in entries if e.statistics]
    if len(paths) != len(plan.models):
        raise StatisticsError(
            f"{len(paths)} statistics file(s) for {len(plan.models)} models; give one per model"
        )
    stats = StatisticsSet(paths, labels=list(plan.labels))
    check_statistics(plan, stats)
    return stats


def check_statistics(plan: MergePlan, stats: StatisticsSet) -> None:
    """``StatisticsError`` when the statistics do not fit the plan's tensors (shapes), lack a kind the method
    needs, or cover none of its tensors (collected on another model)."""
    spec = plan.spec
    covered = 0
    for job in plan.jobs:
        kinds = stats.kinds(job.name)
        if not job.merge or not kinds:
            continue
        lacking = [k for k in spec.needs if k not in kinds]
        if lacking and spec.fallback is None:
            raise StatisticsError(f"tensor {job.name!r} has no {', '.join(lacking)} statistics")
        if len(lacking) == len(spec.needs):
            continue
        covered += 1
        fisher = stats.shape("fisher", job.name)
        if fisher is not None and fisher != tuple(job.shape):
            raise StatisticsError(
                f"tensor {job.name!r} {list(job.shape)}: its Fisher has shape {list(fisher)}; the statistics "
                "come from another model"
            )
        gram = stats.shape("gram", job.name)
        if gram is not None:
            inputs = {job.shape[1], job.shape[0]} if len(job.shape) == 2 else set()
            if len(gram) != 2 or gram[0] != gram[1] or gram[0] not in inputs:
                raise StatisticsError(
                    f"tensor {job.name!r} {list(job.shape)}: its Gram matrix has shape {list(gram)}, not "
                    "[in, in] for one of its dims; the statistics come from another model"
                )
    if covered == 0:
        if spec.fallback is None and any(j.merge for j in plan.jobs):
            raise StatisticsError(f"the statistics cover none of the merged tensors (method {spec.name!r})")
        raise StatisticsError(
            f"the statistics ({', '.join(str(p) for p in stats.paths)}) name none of the models' tensors "
            f"with the {', '.join(spec.needs)} that {spec.name!r} needs: were they collected on another "
            "architecture, or with another kind (`transfuse statistics --kind`)?"
        )
