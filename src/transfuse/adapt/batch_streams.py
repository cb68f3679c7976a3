"""Endless streams of a task's unlabeled batches, for the test-time trainers (AdaMerging, WEMoE's routers)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch

from transfuse.adapt.errors import EmptyBatchesError


def batch_stream(task: str, batches: Iterable[Any], generator: torch.Generator) -> Iterator[Any]:
    """``batches`` without end: a sequence visited in a new ``generator``-seeded random order on each pass, any
    other iterable (a DataLoader) restarted when it ends.  A non-empty sequence is the caller's to check; an
    iterable that yields nothing raises ``EmptyBatchesError`` when the stream is read."""
    if isinstance(batches, Sequence):
        return _shuffled_cycle(batches, generator)
    return _restarted(task, batches)


def _shuffled_cycle(batches: Sequence[Any], generator: torch.Generator) -> Iterator[Any]:
    while True:
        for i in torch.randperm(len(batches), generator=generator).tolist():
            yield batches[i]


def _restarted(task: str, batches: Iterable[Any]) -> Iterator[Any]:
    while True:
        empty = True
        for batch in batches:
            empty = False
            yield batch
        if empty:
            raise EmptyBatchesError(
                f"batches[{task!r}] yielded no batch{' (any more)' if iter(batches) is batches else ''}: "
                "give a non-empty sequence or a re-iterable such as a DataLoader, not a one-shot iterator"
            )
