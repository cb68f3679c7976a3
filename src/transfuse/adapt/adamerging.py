"""AdaMerging: learn the merging coefficients by minimizing the merged model's prediction entropy on unlabeled
test inputs (Yang et al., "AdaMerging: Adaptive Model Merging for Multi-Task Learning", ICLR 2024).

Merged model, with coefficients ``lambda`` laid out by a :class:`CoefficientLayout` (task-, layer- or
block-wise)::

    theta(lambda)[n] = sum_k lambda_{j(k, n)} tau_k[n] + theta_0[n]      (tensors in no task vector: theta_0[n])

Objective: the sum over tasks of the mean Shannon entropy of the merged model's predictions on a batch of
task t's unlabeled inputs (each task scored with its own head, inside ``forward``)::

    L(lambda) = sum_t mean_{x in B_t} H(softmax(f_t(x; theta(lambda)))),   H(p) = -sum_c p_c log p_c

minimized with Adam over raw coefficients ``r``, used as ``lambda = clamp(r, 0, 1)``.  Defaults follow the official
code (EnnengYang/AdaMerging, ``main_task_wise_adamerging.py`` / ``main_layer_wise_adamerging.py``, read to check
them): init 0.3 for every task coefficient (the base keeps coefficient 1), clamp to [0, 1], Adam lr 1e-3,
betas (0.9, 0.999), 500 steps.  One official step sums the mean entropies of two batches of 16 per task, which
Adam (invariant to the loss's scale up to eps) treats as one batch of 32.  AdaMerging++ (``ties_density``)
learns the coefficients of TIES-trimmed, sign-elected task vectors (see :mod:`transfuse.adapt.ties_vectors`).

With ``objective="cross_entropy"`` the same coefficients are learned from a few **labeled** examples per task
instead (aTLAS's few-shot setting, Zhang et al., "Knowledge Composition using Task Vectors with Learned
Anisotropic Scaling", NeurIPS 2024, usually with block-wise coefficients)::

    L(lambda) = sum_t mean_{(x, y) in B_t} -log softmax(f_t(x; theta(lambda)))_y

each batch then being a pair ``(inputs, labels)``: ``forward`` gets ``inputs``, ``labels [B]`` are class ids.

Memory: the K task vectors (the caller's, or the K TIES-processed ones), the base, one merged copy (built once
per step), its gradient, and the activations of one task's batch at a time: each task's forward and backward
run on their own (the gradients add up in the merged copy's ``.grad``), then one backward through the merge.
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
from transfuse.adapt.batch_streams import batch_stream
from transfuse.adapt.coefficients import CoefficientLayout, coefficient_group
from transfuse.adapt.errors import (
    AdaptParameterError,
    EmptyBatchesError,
    NonFiniteObjectiveError,
    TaskVectorMismatchError,
    UnknownTaskError,
)
from transfuse.adapt.ties_vectors import ties_density_value, ties_task_vectors

#: ``forward(merged parameters, task, batch) -> logits [B, C]``.
Forward = Callable[[Mapping[str, Tensor], str, Any], Tensor]


def prediction_entropy(logits: Tensor) -> Tensor:
    """``H(softmax(z))`` per row of ``logits [B, C]`` -> ``[B]``, computed as ``-sum_c p_c log p_c`` with
    ``log p = log_softmax(z)`` (stable for large logits)."""
    log_p = torch.log_softmax(logits, dim=-1)
    return -(log_p.exp() * log_p).sum(-1)


def entropy_objective(logits: Mapping[str, Tensor] | Sequence[Tensor]) -> Tensor:
    """AdaMerging's objective: ``sum_t mean_b H(softmax(logits_t[b]))`` over the tasks' logits ``[B_t, C_t]``."""
    values = list(logits.values()) if isinstance(logits, Mapping) else list(logits)
    if not values:
        raise AdaptParameterError("entropy_objective needs the logits of at least one task")
    for z in values:
        if z.dim() != 2 or z.shape[0] == 0:
            raise AdaptParameterError(
                f"logits must be [batch, classes] with at least one row, got shape {tuple(z.shape)}"
            )
    return torch.stack([prediction_entropy(z).mean() for z in values]).sum()


class TaskVectorMerge:
    """``theta(lambda)`` for fixed base and task vectors: which task vector tensors each output tensor sums.

    The sum runs in the task order and adds the base last, as transfuse's ``task_arithmetic`` does, so a
    recipe replaying the coefficients gives the same float32 tensors.
    """

    def __init__(
        self,
        base: Mapping[str, Tensor],
        task_vectors: Mapping[str, Mapping[str, Tensor]],
        layout: CoefficientLayout,
    ) -> None:
        self.base = base
        self.layout = layout
        self.terms: dict[str, list[tuple[int, Tensor]]] = {}
        for name in base:
            terms = [
                (layout.index(task, name), task_vectors[task][name])
                for task in layout.tasks
                if layout.has(task, name)
            ]
            if terms:
                self.terms[name] = terms

    def __call__(self, coefficients: Tensor) -> dict[str, Tensor]:
        """The merged parameters at ``coefficients [len(layout)]``, differentiable in them."""
        merged: dict[str, Tensor] = {}
        for name, value in self.base.items():
            terms = self.terms.get(name)
            if terms is None:
                merged[name] = value
                continue
            acc = coefficients[terms[0][0]] * terms[0][1]
            for j, delta in terms[1:]:
                acc = acc + coefficients[j] * delta
            merged[name] = acc + value
        return merged


def merge_parameters(
    base: Mapping[str, Tensor],
    task_vectors: Mapping[str, Mapping[str, Tensor]],
    layout: CoefficientLayout,
    coefficients: Tensor,
) -> dict[str, Tensor]:
    """``theta(lambda)[n] = sum_k lambda_{j(k,n)} tau_k[n] + theta_0[n]``; differentiable in ``coefficients``."""
    _check_inputs(base, task_vectors)
    if coefficients.shape != (len(layout),):
        raise AdaptParameterError(
            f"coefficients must have shape ({len(layout)},) for {layout!r}, got {tuple(coefficients.shape)}"
        )
    return TaskVectorMerge(base, task_vectors, layout)(coefficients)


OBJECTIVES = ("entropy", "cross_entropy")


def labeled_objective(logits: Tensor, labels: Tensor) -> Tensor:
    """The few-shot objective of one task: ``mean_b -log softmax(logits[b])_{labels[b]}``."""
    if logits.dim() != 2 or labels.dim() != 1 or labels.shape[0] != logits.shape[0]:
        raise AdaptParameterError(
            f"labels must be [batch] class ids matching the logits {tuple(logits.shape)}, got {tuple(labels.shape)}"
        )
    return torch.nn.functional.cross_entropy(logits, labels.to(device=logits.device, dtype=torch.long))


def _task_objective(
    forward: Forward, leaves: Mapping[str, Tensor], task: str, batch: Any, objective: str
) -> Tensor:
    if objective == "entropy":
        return entropy_objective([forward(leaves, task, batch)])
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2 and isinstance(batch[1], Tensor)):
        raise AdaptParameterError(
            f"objective 'cross_entropy' needs each batch of {task!r} as a pair (inputs, labels tensor), got "
            f"{type(batch).__name__}"
        )
    inputs, labels = batch
    return labeled_objective(forward(leaves, task, inputs), labels)


def objective_gradient(
    merge: TaskVectorMerge,
    forward: Forward,
    batch_by_task: Mapping[str, Any],
    coefficients: Tensor,
    objective: str = "entropy",
) -> tuple[float, Tensor]:
    """``(L(lambda), dL/dlambda)`` at ``coefficients`` (a plain tensor) for one batch per task (``objective``:
    ``entropy`` on unlabeled batches, ``cross_entropy`` on ``(inputs, labels)`` batches).

    The merged parameters are built once; each task's forward and backward run alone, accumulating
    ``dL/dtheta`` in the merged tensors' ``.grad``; one backward through the merge then gives ``dL/dlambda``.
    """
    lam = coefficients.detach().requires_grad_(True)
    merged = merge(lam)
    leaves = {
        n: v.detach().requires_grad_(True) if n in merge.terms else v.detach() for n, v in merged.items()
    }
    total = 0.0
    for task, batch in batch_by_task.items():
        value = _task_objective(forward, leaves, task, batch, objective)
        value.backward()
        total += float(value.detach())
    outputs = [merged[n] for n in merge.terms if leaves[n].grad is not None]
    grads = [leaves[n].grad for n in merge.terms if leaves[n].grad is not None]
    if outputs:
        torch.autograd.backward(outputs, grads)
    gradient = lam.grad if lam.grad is not None else torch.zeros_like(lam)
    return total, gradient.detach()


@dataclass
class AdaMergingResult:
    """What :func:`adamerge` learned.

    ``coefficients[j]`` is the clamped coefficient named ``layout.names[j]``; ``entropy[s]`` the objective at
    step ``s`` (before that step's update, on that step's batches; the cross-entropy with ``objective
    ="cross_entropy"``).  ``ties_density`` is None for AdaMerging,
    the TIES density for AdaMerging++.  :meth:`merged_state_dict` builds the merged model.
    """

    layout: CoefficientLayout
    coefficients: Tensor
    entropy: list[float]
    init: float
    bounds: tuple[float, float] | None
    ties_density: float | None
    seconds: float
    stopped_by_time_budget: bool = False
    objective: str = "entropy"
    _merge: TaskVectorMerge | None = field(default=None, repr=False)

    @property
    def granularity(self) -> str:
        return self.layout.granularity

    @property
    def steps(self) -> int:
        """The optimizer steps taken (fewer than asked when the time budget ran out)."""
        return len(self.entropy)

    def coefficient(self, task: str, tensor_name: str) -> float:
        """The coefficient that scales ``tau_task[tensor_name]``."""
        return float(self.coefficients[self.layout.index(task, tensor_name)])

    def coefficients_by_task(self) -> dict[str, dict[str, float]]:
        """``{task: {tensor name: coefficient}}`` for every tensor of every task vector."""
        return self.layout.values_by_task(self.coefficients.tolist())

    def named_coefficients(self) -> dict[str, float]:
        """``{"<task>/<group>": coefficient}``."""
        return dict(zip(self.layout.names, self.coefficients.tolist()))

    def merged_state_dict(self) -> dict[str, Tensor]:
        """The merged model at the learned coefficients, each tensor in the base's dtype (a new copy)."""
        if self._merge is None:
            raise AdaptParameterError("this result holds no base and task vectors to merge")
        with torch.no_grad():
            merged = self._merge(self.coefficients)
        return {
            n: (v.to(self._merge.base[n].dtype) if n in self._merge.terms else v.clone())
            for n, v in merged.items()
        }


def adamerge(
    base: Mapping[str, Tensor],
    task_vectors: Mapping[str, Mapping[str, Tensor]],
    forward: Forward,
    batches: Mapping[str, Iterable[Any]],
    *,
    granularity: str = "layer",
    steps: int = 500,
    lr: float = 1e-3,
    init: float = 0.3,
    bounds: tuple[float, float] | None = (0.0, 1.0),
    ties_density: float | None = None,
    objective: str = "entropy",
    progress: bool = False,
    time_budget_s: float | None = None,
    seed: int = 0,
) -> AdaMergingResult:
    """Learn AdaMerging coefficients (``ties_density`` set: AdaMerging++) on unlabeled batches per task.

    ``base``: the pretrained state dict; ``task_vectors[task]``: fine-tuned minus base, for the tensors that
    task changed (every other tensor passes through from the base).  ``forward(params, task, batch)`` returns
    the logits ``[B, C]`` of ``task``'s head on the model with ``params`` (a full state dict, e.g. through
    ``torch.func.functional_call``).  ``batches[task]``: a sequence of batches (visited in a new seeded random
    order on each pass) or a re-iterable (a DataLoader; restarted when it ends); one batch per task per step.
    ``granularity``: ``task``, ``layer`` (one coefficient per task per tensor, the paper's) or ``block``.
    ``bounds``: the clamp of the coefficients (None: unclamped).  ``time_budget_s``: stop after the step during
    which this much time has passed (at least one step runs).  ``objective``: ``entropy`` (AdaMerging, unlabeled
    batches) or ``cross_entropy`` (few-shot labeled, aTLAS-style: each batch a pair ``(inputs, labels)``).
    Formulas: the module docstring.
    """
    _check_options(steps, lr, init, bounds, time_budget_s, granularity)
    if objective not in OBJECTIVES:
        raise AdaptParameterError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    density = ties_density_value(ties_density) if ties_density is not None else None
    _check_inputs(base, task_vectors)
    streams = _batch_streams(batches, list(task_vectors), seed)
    if density is not None:
        task_vectors = ties_task_vectors(task_vectors, density)
    layout = CoefficientLayout.build({t: list(v) for t, v in task_vectors.items()}, granularity)
    merge = TaskVectorMerge(base, task_vectors, layout)
    dtype = _coefficient_dtype(task_vectors)
    device = next(iter(next(iter(task_vectors.values())).values())).device

    raw = torch.full((len(layout),), float(init), dtype=dtype, device=device, requires_grad=True)
    optimizer = torch.optim.Adam([raw], lr=lr, betas=(0.9, 0.999))
    curve: list[float] = []
    start = time.perf_counter()
    out_of_time = False
    with AdaptProgress(
        progress, steps, f"AdaMerging{'++' if density is not None else ''} ({granularity})"
    ) as bar:
        for step in range(steps):
            if step > 0 and time_budget_s is not None and time.perf_counter() - start >= time_budget_s:
                out_of_time = True
                break
            lam = _clamped(raw, bounds)
            batch_by_task = {task: next(stream) for task, stream in streams.items()}
            value, grad = objective_gradient(merge, forward, batch_by_task, lam.detach(), objective)
            if not math.isfinite(value) or not bool(torch.isfinite(grad).all()):
                raise NonFiniteObjectiveError(
                    f"the {objective} objective or its gradient is not finite at step {step} (value {value}); "
                    "check that forward returns finite logits, or lower lr"
                )
            optimizer.zero_grad(set_to_none=True)
            lam.backward(grad)  # through the clamp: zero gradient where a coefficient sits past a bound
            optimizer.step()
            curve.append(value)
            bar.step(value)
    return AdaMergingResult(
        layout=layout,
        coefficients=_clamped(raw, bounds).detach().clone(),
        entropy=curve,
        init=float(init),
        bounds=None if bounds is None else (float(bounds[0]), float(bounds[1])),
        ties_density=density,
        objective=objective,
        seconds=time.perf_counter() - start,
        stopped_by_time_budget=out_of_time,
        _merge=merge,
    )


def _clamped(raw: Tensor, bounds: tuple[float, float] | None) -> Tensor:
    return raw if bounds is None else raw.clamp(bounds[0], bounds[1])


def _coefficient_dtype(task_vectors: Mapping[str, Mapping[str, Tensor]]) -> torch.dtype:
    dtypes = {t.dtype for vector in task_vectors.values() for t in vector.values()}
    return torch.float64 if torch.float64 in dtypes else torch.float32


def _finite_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def _check_options(
    steps: int,
    lr: float,
    init: float,
    bounds: tuple[float, float] | None,
    time_budget_s: float | None,
    granularity: str,
) -> None:
    coefficient_group("", granularity)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise AdaptParameterError(f"steps must be an integer >= 1 (500 in the paper), got {steps!r}")
    if not _finite_number(lr) or lr <= 0:
        raise AdaptParameterError(f"lr must be a positive number (1e-3 in the paper), got {lr!r}")
    if not _finite_number(init):
        raise AdaptParameterError(f"init must be a finite number (0.3 in the paper), got {init!r}")
    if bounds is not None:
        if (
            not isinstance(bounds, (tuple, list))
            or len(bounds) != 2
            or not all(_finite_number(b) for b in bounds)
            or not bounds[0] < bounds[1]
        ):
            raise AdaptParameterError(
                f"bounds must be (low, high) with low < high ((0, 1) in the paper) or None, got {bounds!r}"
            )
        if not bounds[0] <= init <= bounds[1]:
            raise AdaptParameterError(
                f"init {init} lies outside bounds {tuple(bounds)}: its gradient would be zero from the start"
            )
    if time_budget_s is not None and (not _finite_number(time_budget_s) or time_budget_s <= 0):
        raise AdaptParameterError(
            f"time_budget_s must be a positive number of seconds or None, got {time_budget_s!r}"
        )


def _check_inputs(base: Mapping[str, Tensor], task_vectors: Mapping[str, Mapping[str, Tensor]]) -> None:
    if not task_vectors:
        raise TaskVectorMismatchError("adaptive merging needs at least one task vector")
    for task, vector in task_vectors.items():
        if not vector:
            raise TaskVectorMismatchError(
                f"the task vector of {task!r} holds no tensors; drop the task or give fine-tuned - base"
            )
        for name, delta in vector.items():
            if name not in base:
                raise TaskVectorMismatchError(
                    f"task {task!r}: tensor {name!r} is not in the base state dict; task vectors must use "
                    "the base's tensor names"
                )
            if tuple(delta.shape) != tuple(base[name].shape):
                raise TaskVectorMismatchError(
                    f"task {task!r}: tensor {name!r} has shape {tuple(delta.shape)} in the task vector but "
                    f"{tuple(base[name].shape)} in the base"
                )
            if not delta.is_floating_point() or not base[name].is_floating_point():
                raise TaskVectorMismatchError(
                    f"task {task!r}: tensor {name!r} is {delta.dtype} (base {base[name].dtype}); only floating "
                    "point tensors can be merged: leave integer buffers out of the task vectors"
                )


def _batch_streams(
    batches: Mapping[str, Iterable[Any]], tasks: list[str], seed: int
) -> dict[str, Iterator[Any]]:
    unknown = [t for t in batches if t not in tasks]
    if unknown:
        raise UnknownTaskError(f"batches are given for unknown tasks {unknown}; the tasks are {tasks}")
    missing = [t for t in tasks if t not in batches]
    if missing:
        raise EmptyBatchesError(f"no batches for tasks {missing}: give unlabeled inputs for every task")
    generator = torch.Generator().manual_seed(seed)
    streams = {}
    for task in tasks:
        given = batches[task]
        if isinstance(given, Tensor) or not isinstance(given, Iterable):
            raise AdaptParameterError(
                f"batches[{task!r}] must be a sequence or an iterable of batches (e.g. [x] for one batch), "
                f"got {type(given).__name__}"
            )
        if isinstance(given, Sequence) and len(given) == 0:
            raise EmptyBatchesError(f"batches[{task!r}] is empty: give at least one unlabeled batch")
        streams[task] = batch_stream(task, given, generator)
    return streams
