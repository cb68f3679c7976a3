"""Test-time training of WEMoE's routers: minimise the prediction entropy on unlabeled inputs of every task.

Objective (the same as AdaMerging's; :func:`transfuse.adapt.entropy_objective` is reused, not rewritten)::

    L(phi) = sum_t mean_{x in B_t} H(softmax(f_t(x; phi))),   H(p) = -sum_c p_c log p_c

over the routers' parameters ``phi`` only (the module stays frozen), one batch per task per step, Adam.  As in
FusionBench (``fusion_bench/method/we_moe/we_moe.py``, ``use_grad_accumulate``): each task's loss is
back-propagated on its own and the gradients add up before one optimizer step (the same gradient as the sum,
with one task's activations alive at a time); during training the routing weights are also averaged over the
batch (``batch_reduce``: one merge per task batch, FusionBench's default), and the model routes per example
again afterwards.  FusionBench's entropy adds 1e-8 inside the log; ``entropy_objective`` uses ``log_softmax``
(exact and stable), which differs from it by less than 1e-7 per example.  Defaults: lr 1e-4, 1000 steps
(FusionBench's ``weight_ensembling_moe.yaml``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from transfuse.adapt._progress import AdaptProgress
from transfuse.adapt.adamerging import entropy_objective
from transfuse.adapt.batch_streams import batch_stream
from transfuse.adapt.errors import NonFiniteObjectiveError
from transfuse.errors import ParameterError
from transfuse.routed.model import RoutedModel
from transfuse.routed.wemoe import WEMoEParts

#: ``forward(model, task, batch) -> logits [B, C]``: run the WEMoE model on ``batch`` and apply ``task``'s head.
WEMoEForward = Callable[[RoutedModel, str, Any], Tensor]


@dataclass
class WEMoETraining:
    """What :func:`train_wemoe_router` did: ``entropy[s]`` is the objective at step ``s`` (before its update)."""

    entropy: list[float] = field(default_factory=list)
    seconds: float = 0.0
    stopped_by_time_budget: bool = False

    @property
    def steps(self) -> int:
        return len(self.entropy)


def _finite_positive(value: Any) -> bool:
    return (
        not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value) and value > 0
    )


def train_wemoe_router(
    model: RoutedModel,
    forward: WEMoEForward,
    batches: Mapping[str, Sequence[Any] | Iterable[Any]],
    *,
    steps: int = 1000,
    lr: float = 1e-4,
    time_budget_s: float | None = None,
    progress: bool = False,
    batch_reduce: bool = True,
    seed: int = 0,
) -> WEMoETraining:
    """Train the routers of the WEMoE `model` (from :func:`transfuse.routed.wemoe.wemoe_merge`) in place.

    ``batches[task]``: that task's unlabeled batches, a sequence (visited in a new seeded random order each pass)
    or a re-iterable such as a DataLoader (restarted when it ends); every task of the model needs some.
    ``forward(model, task, batch)`` returns the logits ``[B, C]`` of ``task``'s head on the model's output.
    ``time_budget_s``: stop after the step during which this much time has passed (at least one step runs).
    ``batch_reduce``: one routing vector per task batch while training (FusionBench's default).  The module's
    parameters are frozen and the routers' trainable while it runs (every ``requires_grad`` flag is restored
    afterwards: the routers are built without gradients, so inference builds no graph).

    Errors before any work: :class:`ParameterError` for a model that is not WEMoE, ``steps < 1``, a non-positive
    ``lr`` or ``time_budget_s``, missing, unknown or empty batches; :class:`NonFiniteObjectiveError` when the
    entropy or a gradient stops being finite."""
    if not isinstance(model, RoutedModel) or not isinstance(model.parts, WEMoEParts):
        raise ParameterError(
            "train_wemoe_router takes the RoutedModel that wemoe_merge (or transfuse.load) returns"
        )
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ParameterError(f"steps must be an integer >= 1 (1000 in FusionBench), got {steps!r}")
    if not _finite_positive(lr):
        raise ParameterError(f"lr must be a positive number (1e-4 in FusionBench), got {lr!r}")
    if time_budget_s is not None and not _finite_positive(time_budget_s):
        raise ParameterError(
            f"time_budget_s must be a positive number of seconds or None, got {time_budget_s!r}"
        )
    if not callable(forward):
        raise ParameterError("forward must be a function forward(model, task, batch) -> logits [B, C]")
    parts: WEMoEParts = model.parts
    streams = _streams(batches, parts.tasks, seed)

    params = list(parts.router_parameters())
    flags = [(p, p.requires_grad) for p in (*params, *model.module.parameters())]
    optimizer = torch.optim.Adam(params, lr=lr)
    result = WEMoETraining()
    start = time.perf_counter()
    was_reducing = parts.batch_reduce
    parts.batch_reduce = batch_reduce
    try:
        model.module.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        with AdaptProgress(progress, steps, "WEMoE routers") as bar:
            for step in range(steps):
                if step > 0 and time_budget_s is not None and time.perf_counter() - start >= time_budget_s:
                    result.stopped_by_time_budget = True
                    break
                optimizer.zero_grad(set_to_none=True)
                total = 0.0
                for task in parts.tasks:
                    loss = entropy_objective([forward(model, task, next(streams[task]))])
                    loss.backward()
                    total += float(loss.detach())
                grads_finite = all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in params)
                if not math.isfinite(total) or not grads_finite:
                    raise NonFiniteObjectiveError(
                        f"the entropy objective or its gradient is not finite at step {step} (value {total}); "
                        "check that forward returns finite logits, or lower lr"
                    )
                optimizer.step()
                result.entropy.append(total)
                bar.step(total)
    finally:
        parts.batch_reduce = was_reducing
        for p, flag in flags:
            p.requires_grad_(flag)
        result.seconds = time.perf_counter() - start
    return result


def _streams(batches: Mapping[str, Any], tasks: tuple[str, ...], seed: int) -> dict[str, Iterator[Any]]:
    if not isinstance(batches, Mapping):
        raise ParameterError("batches must map every task name to its unlabeled batches")
    unknown = [t for t in batches if t not in tasks]
    missing = [t for t in tasks if t not in batches]
    if unknown or missing:
        raise ParameterError(
            f"batches must name exactly the model's tasks {list(tasks)}: unknown {unknown}, missing {missing}"
        )
    generator = torch.Generator().manual_seed(seed)
    streams = {}
    for task in tasks:
        given = batches[task]
        if isinstance(given, Tensor) or not isinstance(given, Iterable):
            raise ParameterError(f"batches[{task!r}] must be a sequence or re-iterable of batches, e.g. [x]")
        if isinstance(given, Sequence) and len(given) == 0:
            raise ParameterError(f"batches[{task!r}] is empty: give at least one unlabeled batch")
        streams[task] = batch_stream(task, given, generator)
    return streams
