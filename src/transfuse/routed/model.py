"""The routed model: one module holding the shared (base) weights, a method's per-task parts, and a forward pass
that runs every example with its own task's parameters.

A mixed-task batch is grouped by task (in order of first appearance); each group's rows of every per-example input
are taken out, the module runs on them by ``torch.func.functional_call`` with that task's parameters, and the
group's output rows are scattered back to their places.  So a mixed batch gives exactly what running each task's
examples alone gives.  Only one task's parameters are materialised at a time; the last ``cache_tasks`` tasks'
parameters are kept (least recently used first out), so memory is the module plus ``max(1, cache_tasks)`` copies of
the routed tensors, whatever the number of tasks.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from transfuse.routed.errors import (
    MissingTaskIdError,
    ModuleMismatchError,
    RoutedOutputError,
    TaskIdsMismatchError,
    UnknownTaskError,
)

# A router picks the task of each example (or one task for the batch) from the forward's own inputs.
Router = Callable[..., "str | Sequence[str]"]


@runtime_checkable
class TaskParts(Protocol):
    """What a routed method keeps beside the shared module, and how it turns that into one task's parameters.

    ``materialise(task, base)`` returns full tensors for ``routed_names`` (every other tensor is the module's own);
    ``shared_tensors`` / ``task_tensors`` are what ``save_routed`` writes (flat ``{name: tensor}``), and
    ``settings`` the method's parameters as JSON values for the manifest.

    A method whose model picks each example's weights itself (WEMoE's routers) sets ``routes_examples = True``
    and has ``run(module, args, kwargs)``: :class:`RoutedModel` then calls it with no task ids (and never
    ``materialise``)."""

    method: str
    tasks: tuple[str, ...]
    routed_names: tuple[str, ...]

    def materialise(self, task: str, base: Mapping[str, Tensor]) -> dict[str, Tensor]: ...

    def shared_tensors(self) -> dict[str, Tensor]: ...

    def task_tensors(self, task: str) -> dict[str, Tensor]: ...

    def settings(self) -> dict[str, Any]: ...


class RoutedModel(nn.Module):
    """``module`` (holding the base weights) + ``parts`` (a method's per-task parts), run per task.

    ``model(*inputs, task_ids=...)``: `task_ids` is one task name for the whole batch or one name per example;
    without it the ``router`` picks them (``router(*inputs, **kwargs)``), and a model without a router raises
    :class:`MissingTaskIdError`.  With one name per example, every tensor input whose first dimension equals
    ``len(task_ids)`` is split by example; other inputs are passed to every group as they are.  Outputs may be
    tensors, tuples, lists, dicts or transformers ``ModelOutput``; every output tensor must have one row per
    example.  Call ``eval()`` first if the module has dropout: each group draws its own random numbers.
    Parameters are materialised without gradients (inference).  Parts with ``routes_examples`` (WEMoE) run the
    whole batch at once, each example routed by the parts themselves, and take no ``task_ids``."""

    def __init__(
        self,
        module: nn.Module,
        parts: TaskParts,
        *,
        router: Router | None = None,
        cache_tasks: int = 1,
        saved_with_router: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be a torch nn.Module, got {type(module).__name__}")
        if not isinstance(cache_tasks, int) or cache_tasks < 0:
            raise ValueError(f"cache_tasks must be an int >= 0, got {cache_tasks!r}")
        if router is not None and getattr(parts, "routes_examples", False):
            raise ValueError(
                f"{parts.method} routes every example with its own saved router; do not pass router="
            )
        state = module.state_dict()
        missing = [n for n in parts.routed_names if n not in state]
        if missing:
            raise ModuleMismatchError(
                f"the module has no tensor {missing[0]!r} (and {len(missing) - 1} more) that the "
                f"{parts.method} parts route; pass the module the experts were fine-tuned from"
            )
        self.module = module
        self.parts = parts
        self.router = router
        self.cache_tasks = cache_tasks
        self.saved_with_router = saved_with_router
        self._cache: OrderedDict[str, dict[str, Tensor]] = OrderedDict()

    @property
    def tasks(self) -> tuple[str, ...]:
        return self.parts.tasks

    @property
    def method(self) -> str:
        return self.parts.method

    def task_parameters(self, task: str) -> dict[str, Tensor]:
        """Task `task`'s full tensors for the routed names (materialised now, or from the cache)."""
        self._check_task(task)
        cached = self._cache.get(task)
        if cached is not None:
            self._cache.move_to_end(task)
            return cached
        base = self.module.state_dict()
        with torch.no_grad():
            params = self.parts.materialise(task, base)
        if self.cache_tasks:
            self._cache[task] = params
            while len(self._cache) > self.cache_tasks:
                self._cache.popitem(last=False)
        return params

    def clear_cache(self) -> None:
        self._cache.clear()

    def _apply(self, fn: Any, recurse: bool = True) -> RoutedModel:
        self._cache.clear()  # .to() / .half(): cached tensors would be on the old device or dtype
        return super()._apply(fn, recurse)

    def _check_task(self, task: object) -> None:
        if not isinstance(task, str) or task not in self.parts.tasks:
            raise UnknownTaskError(
                f"unknown task {task!r}; this {self.parts.method} model has tasks {list(self.parts.tasks)}"
            )

    def _run(self, task: str, args: tuple, kwargs: dict) -> Any:
        return torch.func.functional_call(self.module, self.task_parameters(task), args, kwargs)

    def forward(self, *args: Any, task_ids: str | Sequence[str] | None = None, **kwargs: Any) -> Any:
        if getattr(self.parts, "routes_examples", False):
            if task_ids is not None:
                raise TaskIdsMismatchError(
                    f"{self.parts.method} picks each example's weights with its router; call it without task_ids"
                )
            return self.parts.run(self.module, args, kwargs)
        if task_ids is None:
            if self.router is None:
                hint = (
                    "it was saved with a router: pass it again as load(directory, router=...)"
                    if self.saved_with_router
                    else f"{self.parts.method} has no router: the caller must say each example's task"
                )
                raise MissingTaskIdError(
                    f"no task_ids given and {hint}; call model(..., task_ids='<task>') or one id per "
                    f"example, from {list(self.parts.tasks)}"
                )
            task_ids = self.router(*args, **kwargs)
        if isinstance(task_ids, str):
            self._check_task(task_ids)
            return self._run(task_ids, args, kwargs)
        ids = list(task_ids)
        if not ids:
            raise TaskIdsMismatchError(
                "task_ids is empty; give one task id per example, or one for the batch"
            )
        groups: OrderedDict[str, list[int]] = OrderedDict()
        for i, task in enumerate(ids):
            self._check_task(task)
            groups.setdefault(task, []).append(i)
        batch = len(ids)
        if not _has_batch_tensor((args, kwargs), batch):
            raise TaskIdsMismatchError(
                f"task_ids has {batch} entries but no tensor input has {batch} rows (first dimension); "
                "give one task id per example"
            )
        if len(groups) == 1:
            return self._run(ids[0], args, kwargs)
        results = []
        for task, rows in groups.items():
            index = torch.tensor(rows, dtype=torch.long)
            sub_args, sub_kwargs = _take_rows((args, kwargs), index, batch)
            results.append((index, self._run(task, sub_args, sub_kwargs)))
        return _scatter_rows(results, batch, path="output")


def _has_batch_tensor(tree: Any, batch: int) -> bool:
    if isinstance(tree, Tensor):
        return tree.dim() > 0 and tree.shape[0] == batch
    if isinstance(tree, Mapping):
        return any(_has_batch_tensor(v, batch) for v in tree.values())
    if isinstance(tree, (tuple, list)):
        return any(_has_batch_tensor(v, batch) for v in tree)
    return False


def _take_rows(tree: Any, index: Tensor, batch: int) -> Any:
    """`tree` with every tensor of `batch` rows replaced by its rows `index` (other leaves unchanged)."""
    if isinstance(tree, Tensor):
        if tree.dim() > 0 and tree.shape[0] == batch:
            return tree.index_select(0, index.to(tree.device))
        return tree
    if isinstance(tree, Mapping):
        return {k: _take_rows(v, index, batch) for k, v in tree.items()}
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):
        return type(tree)(*(_take_rows(v, index, batch) for v in tree))
    if isinstance(tree, (tuple, list)):
        return type(tree)(_take_rows(v, index, batch) for v in tree)
    return tree


def _is_model_output(value: Any) -> bool:
    return any(c.__name__ == "ModelOutput" for c in type(value).__mro__)


def _scatter_rows(results: list[tuple[Tensor, Any]], batch: int, path: str) -> Any:
    """Put the groups' outputs back in batch order: row ``index[j]`` of the result is row ``j`` of that group's."""
    first = results[0][1]
    if isinstance(first, Tensor):
        for index, out in results:
            if not isinstance(out, Tensor) or out.dim() == 0 or out.shape[0] != index.numel():
                raise RoutedOutputError(
                    f"{path} is not one row per example (shape {tuple(getattr(out, 'shape', ()))} for a group of "
                    f"{index.numel()}); a mixed-task batch needs per-example outputs, so run one task per call"
                )
            if out.shape[1:] != first.shape[1:] or out.dtype != first.dtype:
                raise RoutedOutputError(
                    f"{path} has shape {tuple(out.shape[1:])} per example in one task group and "
                    f"{tuple(first.shape[1:])} in another; pad the inputs to one length"
                )
        merged = first.new_empty((batch, *first.shape[1:]))
        for index, out in results:
            merged.index_copy_(0, index.to(merged.device), out)
        return merged
    if first is None:
        return None
    if isinstance(first, Mapping):
        keys = list(first.keys())
        for _, out in results:
            if not isinstance(out, Mapping) or list(out.keys()) != keys:
                raise RoutedOutputError(f"{path} has different keys in different task groups")
        merged_items = {
            k: _scatter_rows([(i, out[k]) for i, out in results], batch, f"{path}[{k!r}]") for k in keys
        }
        return type(first)(**merged_items) if _is_model_output(first) else type(first)(merged_items)
    if isinstance(first, (tuple, list)):
        for _, out in results:
            if type(out) is not type(first) or len(out) != len(first):
                raise RoutedOutputError(f"{path} has a different structure in different task groups")
        items = [
            _scatter_rows([(i, out[j]) for i, out in results], batch, f"{path}[{j}]")
            for j in range(len(first))
        ]
        if isinstance(first, tuple) and hasattr(first, "_fields"):
            return type(first)(*items)
        return type(first)(items)
    for _, out in results:
        if out != first:
            raise RoutedOutputError(
                f"{path} is {first!r} in one task group and {out!r} in another; it is not per example"
            )
    return first
