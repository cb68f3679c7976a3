"""What a method may know about the tensor it merges besides its inputs: the ``MethodContext``.

A method that declares a keyword-only ``ctx`` parameter gets one per output tensor from the engine (the registry
records whether it does: ``MethodSpec.takes_context``); the others never see it.  Everything a method used to
learn from per-thread state (where its chunk loops run) or from extra keyword arguments (the random generator)
comes through this one explicit, immutable object, so a method stays a function of its arguments: same
arguments and same context, same result.  The next methods (Fisher, RegMean, AdaMerging, routed experts) read
their per-tensor statistics from ``ctx.statistics``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import torch
from torch import Tensor

from transfuse.chunks import SERIAL, ChunkExecutor, Workspace
from transfuse.errors import TransfuseError

_NO_STATISTICS: Mapping[str, Tensor] = MappingProxyType({})


class MissingStatisticsError(TransfuseError):
    """A method needs per-tensor statistics (e.g. Gram matrices, Fisher information) that were not given."""


@dataclass(frozen=True)
class MethodContext:
    """The engine's per-tensor context for one method call.

    - ``name``: the output tensor's name (for messages; the math must not depend on it, except through
      ``generator``'s seed).
    - ``device``: the compute device (where ``base`` and ``deltas`` live).
    - ``generator``: for random methods (``MethodSpec.random``), a ``torch.Generator`` on ``device`` seeded from
      ``blake2b(seed, name)``, so the result depends neither on job order nor on threads; ``None`` otherwise.
    - ``statistics``: per-tensor statistics by name (``MethodSpec.needs``: e.g. ``"gram"``, ``"fisher"``), on
      ``device``; empty for data-free methods.
    - ``chunks``: where the method's chunk loops run (see ``transfuse.chunks``); get a ``Workspace`` through
      ``workspace``.
    - ``has_base``: whether ``base`` is a base model the task vectors are taken against (the recipe's
      ``base_model``, or the slice's base), rather than the first model standing in as the reference of a
      base-less recipe (then ``deltas[0]`` is zero and the models are ``base + deltas``).  Methods that compute
      differently without a base (MergeKit's ``nuslerp``, ``multislerp``, ``karcher``) read it; it comes from
      the plan (``TensorJob.has_base``), never from the values.

    The default context (``MethodContext()``) is a serial CPU run with no generator and no statistics, with a
    base: what a direct call of a deterministic method needs.
    """

    name: str = ""
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    generator: torch.Generator | None = None
    statistics: Mapping[str, Tensor] = field(default_factory=lambda: _NO_STATISTICS)
    chunks: ChunkExecutor = SERIAL
    has_base: bool = True

    def workspace(self, like: Tensor) -> Workspace:
        """A chunk workspace over all entries of ``like`` (on its device), running where ``chunks`` says."""
        return Workspace(like.numel(), like.device, self.chunks)

    def random_generator(self) -> torch.Generator:
        """``generator``, or ``ValueError`` for a random method called without one."""
        if self.generator is None:
            raise ValueError(
                f"tensor {self.name!r}: a random method needs MethodContext(generator=...); the engine "
                "passes one seeded from (seed, tensor name)"
            )
        return self.generator

    def statistic(self, key: str) -> Tensor:
        """The per-tensor statistic ``key``, or ``MissingStatisticsError``."""
        try:
            return self.statistics[key]
        except KeyError:
            given = ", ".join(sorted(self.statistics)) or "none"
            raise MissingStatisticsError(
                f"tensor {self.name!r}: the method needs the statistic {key!r}; given: {given}"
            ) from None
