"""Training Twin-Merging's router: a task classifier on the shared model's features of inputs whose task is known.

For inputs ``x`` of every task t (the caller's data, e.g. validation splits), with features
``f(x) = mean_tokens(shared_model(x))`` (:func:`transfuse.routed.twin.shared_features`) computed once::

    L(phi) = mean_{(x, t)} CE(router_phi(f(x)), t) = mean -log softmax(router_phi(f(x)))_t

minimised over the router's parameters ``phi`` only (the shared model stays frozen) by AdamW with a learning rate
decaying linearly to 0, on shuffled mini-batches, for a fixed number of epochs.  As in the authors' code
(github.com/LZY-the-boys/Twin-Merging, ``discriminative/router.py``: features precomputed by the shared expert,
``transformers.Trainer`` defaults, i.e. AdamW without weight decay and a linear schedule): lr 5e-4, batch 1024,
50 epochs.  The authors keep the epoch that scores best on the test set; here the last epoch is kept.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from transfuse.errors import ParameterError
from transfuse.routed.model import RoutedModel
from transfuse.routed.twin import MissingValidationDataError, TwinParts


@dataclass
class TwinRouterTraining:
    """What :func:`train_twin_router` did: the mean loss of each epoch, and the router's task accuracy on its
    training features afterwards (eval mode), overall and per task."""

    loss: list[float] = field(default_factory=list)
    accuracy: float = math.nan
    per_task_accuracy: dict[str, float] = field(default_factory=dict)
    examples: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def epochs(self) -> int:
        return len(self.loss)


def _call(batch: Any) -> tuple[tuple, dict]:
    """A batch as ``(args, kwargs)``: a mapping is keyword inputs, a tuple/list positional ones, a tensor one input."""
    if isinstance(batch, Mapping):
        return (), dict(batch)
    if isinstance(batch, (tuple, list)):
        return tuple(batch), {}
    return (batch,), {}


def _twin_parts(model: Any, caller: str) -> TwinParts:
    if not isinstance(model, RoutedModel) or not isinstance(model.parts, TwinParts):
        raise ParameterError(f"{caller} takes the RoutedModel that twin_merge (or transfuse.load) returns")
    return model.parts


def task_features(
    model: RoutedModel, batches: Mapping[str, Sequence[Any] | Iterable[Any]]
) -> tuple[Tensor, Tensor, dict[str, int]]:
    """``(features [N, D], task index [N], examples per task)``: the shared model's features of every batch of
    ``batches[task]`` (the module in eval mode, no gradients), in the model's task order.

    Raises :class:`MissingValidationDataError` when a task of the model has no batches or no rows, and
    :class:`ParameterError` for a task the model does not have."""
    parts = _twin_parts(model, "task_features")
    if not isinstance(batches, Mapping):
        raise ParameterError("batches must map every task name to batches of its inputs")
    unknown = [t for t in batches if t not in parts.tasks]
    if unknown:
        raise ParameterError(
            f"batches name tasks the model lacks: {unknown}; its tasks are {list(parts.tasks)}"
        )
    missing = [t for t in parts.tasks if t not in batches]
    if missing:
        raise MissingValidationDataError(
            f"no data for task(s) {missing}: the router learns to recognise every task, so give some inputs of each "
            "(e.g. its validation split)"
        )
    for task in parts.tasks:
        given = batches[task]
        if isinstance(given, (Tensor, Mapping)) or not isinstance(given, Iterable):
            raise ParameterError(
                f"batches[{task!r}] must be a sequence of batches, e.g. [batch], not one batch"
            )
    module = model.module
    was_training = module.training
    module.eval()
    features, labels, counts = [], [], {}
    try:
        for k, task in enumerate(parts.tasks):
            rows = 0
            for batch in batches[task]:
                args, kwargs = _call(batch)
                f = parts.features(module, args, kwargs)
                features.append(f)
                rows += f.shape[0]
            if rows == 0:
                raise MissingValidationDataError(f"task {task!r} has no inputs in batches; give at least one")
            labels.append(torch.full((rows,), k, dtype=torch.long))
            counts[task] = rows
    finally:
        module.train(was_training)
    return torch.cat(features), torch.cat(labels).to(features[0].device), counts


def _accuracy(parts: TwinParts, features: Tensor, labels: Tensor) -> tuple[float, dict[str, float]]:
    predicted = parts.router_logits(features).argmax(dim=-1)
    hits = predicted == labels
    per_task = {
        task: float(hits[labels == k].float().mean())
        for k, task in enumerate(parts.tasks)
        if bool((labels == k).any())
    }
    return float(hits.float().mean()), per_task


def router_accuracy(
    model: RoutedModel, batches: Mapping[str, Sequence[Any] | Iterable[Any]]
) -> tuple[float, dict[str, float]]:
    """How often the router names the right task: ``(overall, {task: accuracy})`` on inputs of known tasks
    (every task of the model needs some; argmax of the router's logits against the task)."""
    parts = _twin_parts(model, "router_accuracy")
    features, labels, _ = task_features(model, batches)
    return _accuracy(parts, features, labels)


def train_twin_router(
    model: RoutedModel,
    batches: Mapping[str, Sequence[Any] | Iterable[Any]],
    *,
    epochs: int = 50,
    lr: float = 5e-4,
    batch_size: int = 1024,
    weight_decay: float = 0.0,
    seed: int = 0,
) -> TwinRouterTraining:
    """Train the router of the Twin-Merging `model` (from :func:`transfuse.routed.twin.twin_merge`) in place to
    predict each input's task (formula: module docstring).

    ``batches[task]``: batches of that task's inputs (e.g. its validation split), each a mapping of the module's
    keyword inputs (``{"input_ids": ..., "attention_mask": ...}``), a tuple of positional inputs or one tensor;
    every task of the model needs some.  The features are computed once (module in eval mode); each epoch visits
    them in a new seeded order in mini-batches of ``batch_size`` (a last mini-batch of one row, which BatchNorm
    cannot normalise, is dropped).  The router is left in eval mode without gradients.

    Errors before any work: :class:`ParameterError` for a model that is not Twin-Merging, ``epochs < 1``,
    ``batch_size < 2``, a non-positive ``lr``, a negative ``weight_decay``, unknown tasks;
    :class:`MissingValidationDataError` for a task without data."""
    parts = _twin_parts(model, "train_twin_router")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ParameterError(f"epochs must be an integer >= 1 (the authors' 50), got {epochs!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 2:
        raise ParameterError(
            f"batch_size must be an integer >= 2 (BatchNorm needs two rows), got {batch_size!r}"
        )
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise ParameterError(f"lr must be a positive number (the authors' 5e-4), got {lr!r}")
    if (
        isinstance(weight_decay, bool)
        or not isinstance(weight_decay, (int, float))
        or not math.isfinite(weight_decay)
        or weight_decay < 0
    ):
        raise ParameterError(f"weight_decay must be a number >= 0, got {weight_decay!r}")
    start = time.perf_counter()
    features, labels, counts = task_features(model, batches)
    router = parts.router
    features = features.to(router.out.weight.dtype)
    n = features.shape[0]
    steps_per_epoch = max(1, math.ceil(n / batch_size))
    total_steps = epochs * steps_per_epoch
    params = list(router.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1.0 - step / total_steps))
    generator = torch.Generator().manual_seed(seed)
    result = TwinRouterTraining(examples=counts)
    try:
        router.train()
        for p in params:
            p.requires_grad_(True)
        for _ in range(epochs):
            order = torch.randperm(n, generator=generator).to(features.device)
            total, seen = 0.0, 0
            for lo in range(0, n, batch_size):
                index = order[lo : lo + batch_size]
                if index.numel() < 2:
                    continue
                optimizer.zero_grad(set_to_none=True)
                loss = F.cross_entropy(router(features[index]), labels[index])
                loss.backward()
                optimizer.step()
                schedule.step()
                total += float(loss.detach()) * index.numel()
                seen += index.numel()
            result.loss.append(total / max(seen, 1))
    finally:
        router.eval()
        for p in params:
            p.requires_grad_(False)
    result.accuracy, result.per_task_accuracy = _accuracy(parts, features, labels)
    result.seconds = time.perf_counter() - start
    return result
