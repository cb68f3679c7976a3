"""Which merging coefficient scales which task vector tensor: the layout of AdaMerging's lambdas.

A layout maps each (task, tensor name) to the index of one coefficient ``lambda_j`` in a flat vector, so that
the merged model is ``theta[name] = theta_0[name] + sum_k lambda_{j(k, name)} tau_k[name]``.  Three
granularities:

- ``task``: one coefficient per task (AdaMerging's task-wise variant), group ``all``;
- ``layer``: one per task per parameter tensor (the paper's layer-wise variant: the official code keeps one
  lambda per entry of the state dict, EnnengYang/AdaMerging ``main_layer_wise_adamerging.py``), group = the
  tensor's name;
- ``block``: one per task per block, the block index read from the tensor name (``layer.3.``, ``layers.3.``,
  ``h.3.``, ``blocks.3.``, ``block.3.``: the pattern transfuse's layer gradients use), group ``block 3``; every
  tensor outside a block (embeddings, final norm, heads, pooler) shares the group ``other`` (as aTLAS groups
  parameters into blocks, Zhang et al., NeurIPS 2024).

Coefficient ``j`` is named ``<task>/<group>``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

from transfuse.adapt.errors import AdaptParameterError, UnknownTaskError

GRANULARITIES = ("task", "layer", "block")

#: A block index in a tensor name (``encoder.layer.3.``, ``model.layers.3.``, ``transformer.h.3.``).
BLOCK_INDEX = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\.")

#: The group of every tensor outside a numbered block under the ``block`` granularity.
OTHER_GROUP = "other"

#: The group of every tensor under the ``task`` granularity.
ALL_GROUP = "all"


def block_group(tensor_name: str) -> str:
    """``"block <i>"`` for a tensor of block ``i`` (the first index in its name), else ``"other"``."""
    found = BLOCK_INDEX.search(tensor_name)
    return f"block {int(found.group(1))}" if found else OTHER_GROUP


def coefficient_group(tensor_name: str, granularity: str) -> str:
    """The group a tensor's coefficient belongs to under ``granularity``."""
    if granularity == "task":
        return ALL_GROUP
    if granularity == "layer":
        return tensor_name
    if granularity == "block":
        return block_group(tensor_name)
    raise AdaptParameterError(f"granularity must be one of {', '.join(GRANULARITIES)}; got {granularity!r}")


class CoefficientLayout:
    """The coefficients of one adaptation: ``len(layout)`` of them, coefficient ``j`` named ``names[j]``.

    Build it with :meth:`build` from the tensor names each task's vector has; ``index(task, name)`` is the
    coefficient that scales ``tau_task[name]``.  Coefficients are ordered by task, then by the first tensor of
    each group in the task's order.
    """

    def __init__(
        self,
        granularity: str,
        tasks: Sequence[str],
        tensors: Mapping[str, Sequence[str]],
    ) -> None:
        coefficient_group("", granularity)  # validates the granularity
        self.granularity = granularity
        self.tasks: tuple[str, ...] = tuple(tasks)
        self._tensors = {t: tuple(tensors[t]) for t in self.tasks}
        self._index: dict[tuple[str, str], int] = {}
        names: list[str] = []
        self.coefficient_task: list[str] = []
        self.coefficient_group: list[str] = []
        for task in self.tasks:
            groups: dict[str, int] = {}
            for name in self._tensors[task]:
                group = coefficient_group(name, granularity)
                if group not in groups:
                    groups[group] = len(names)
                    names.append(f"{task}/{group}")
                    self.coefficient_task.append(task)
                    self.coefficient_group.append(group)
                self._index[(task, name)] = groups[group]
        self.names: tuple[str, ...] = tuple(names)

    @classmethod
    def build(cls, tensors: Mapping[str, Iterable[str]], granularity: str = "layer") -> CoefficientLayout:
        """The layout for tasks ``tensors.keys()`` whose vectors hold the tensor names ``tensors[task]``."""
        if not tensors:
            raise AdaptParameterError("a coefficient layout needs at least one task")
        return cls(granularity, list(tensors), {t: list(names) for t, names in tensors.items()})

    def __len__(self) -> int:
        return len(self.names)

    def __repr__(self) -> str:
        return f"CoefficientLayout({self.granularity!r}, {len(self.tasks)} tasks, {len(self)} coefficients)"

    def tensors(self, task: str) -> tuple[str, ...]:
        """The tensor names of ``task``'s vector, in its order."""
        self._check_task(task)
        return self._tensors[task]

    def index(self, task: str, tensor_name: str) -> int:
        """The coefficient that scales ``tau_task[tensor_name]``."""
        self._check_task(task)
        try:
            return self._index[(task, tensor_name)]
        except KeyError:
            raise UnknownTaskError(
                f"task {task!r} has no tensor {tensor_name!r} in its task vector "
                f"({len(self._tensors[task])} tensors, e.g. {list(self._tensors[task][:3])})"
            ) from None

    def has(self, task: str, tensor_name: str) -> bool:
        """Whether ``task``'s vector has ``tensor_name``."""
        return (task, tensor_name) in self._index

    def values_by_task(self, values: Sequence[float]) -> dict[str, dict[str, float]]:
        """``{task: {tensor name: coefficient value}}`` for a vector of ``len(self)`` values."""
        if len(values) != len(self):
            raise AdaptParameterError(f"expected {len(self)} coefficient values, got {len(values)}")
        return {t: {n: float(values[self._index[(t, n)]]) for n in self._tensors[t]} for t in self.tasks}

    def _check_task(self, task: str) -> None:
        if task not in self._tensors:
            raise UnknownTaskError(f"unknown task {task!r}; the tasks are {list(self.tasks)}")
