"""Chunked passes over one tensor: how a method's full-tensor loops are cut, buffered and threaded.

This is the runtime under the chunked methods (the task-arithmetic family, linear, MagMax): the engine decides
where a tensor's chunk loops may run (a ``ChunkExecutor``, handed to the method in its ``MethodContext``), and a
method asks its context for a ``Workspace`` over its tensor.  It lives outside ``methods/`` because it is policy
about threads and memory, not merge math: the engine owns it, methods only call ``Workspace.map``.

Every full-tensor pass runs over cache-sized chunks with reused scratch buffers: one fused chunk loop instead of
a chain of whole-tensor ops, each of which re-reads DRAM and page-faults a fresh temporary (5-6x faster per
pass).  The chunk ops run with ONE intra-op thread: a chunk loop issues thousands of small ops, and with 2 OpenMP
threads on a loaded 2-core machine every op's barrier waits for a descheduled thread (measured 5-30x slower than
one thread; on an idle machine 2 threads gain only ~1.3x because the passes are memory-bound).  A pool of
single-threaded chunk workers fared no better under load (GIL hand-offs stall the same way), except for a
tensor too big to merge several at once, whose chunks the engine spreads over its otherwise idle workers
(``ChunkExecutor.pool``).  ``ChunkExecutor.map`` is the one place to change that policy.

Masks are applied with float ops only (hardshrink, threshold, clamp, multiply by a 0/1 float): on CPU a
boolean-output comparison or ``masked_fill_`` costs 1-5 ns per entry, a float op 0.1-0.2 ns.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import Executor
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch

#: Entries per chunk on CPU: 1 MiB of float32, the L2 size here; two engine workers ran ~8% faster than at 2 MiB.
CHUNK = 1 << 18
#: Entries per chunk on an accelerator: few large launches; float32 sums of 0/1 flags stay exact (<= 2**24).
DEVICE_CHUNK = 1 << 24

#: Intra-op threads for chunk loops: None = PyTorch's current setting, 1 = single-threaded (see above).
CHUNK_THREADS: int | None = 1

T = TypeVar("T")


def chunk_size(device: torch.device | str) -> int:
    """Entries per chunk on ``device``."""
    return CHUNK if torch.device(device).type == "cpu" else DEVICE_CHUNK


def chunk_ranges(numel: int, device: torch.device | str = "cpu") -> list[tuple[int, int]]:
    """``(start, stop)`` of consecutive chunks covering ``range(numel)`` (chunk length by device)."""
    size = chunk_size(device)
    return [(start, min(start + size, numel)) for start in range(0, numel, size)]


class Scratch:
    """Three chunk-sized float32 buffers (and, on CPU, two boolean ones, allocated on first use)."""

    def __init__(self, size: int, device: torch.device) -> None:
        self.a = torch.empty(size, dtype=torch.float32, device=device)
        self.b = torch.empty(size, dtype=torch.float32, device=device)
        self.c = torch.empty(size, dtype=torch.float32, device=device)
        self._flags: tuple[np.ndarray, np.ndarray] | None = None

    def flags(self, size: int) -> tuple[np.ndarray, np.ndarray]:
        """Two numpy boolean buffers of ``size`` entries (CPU only)."""
        if self._flags is None:
            self._flags = (np.empty(self.a.numel(), dtype=bool), np.empty(self.a.numel(), dtype=bool))
        return self._flags[0][:size], self._flags[1][:size]


def pin_to_one_thread() -> None:
    """Make the calling thread run torch single-threaded for good (the initializer of the engine's merge
    workers; torch's OpenMP and BLAS thread counts are per thread).  Work on such a thread runs under a
    ``ChunkExecutor(pinned=True)``, which never changes the count (restoring the process-wide count from a
    worker would undo the pin)."""
    torch.set_num_threads(1)


@dataclass(frozen=True)
class ChunkExecutor:
    """Where one tensor's chunk loops run; the engine builds one per job and passes it in ``MethodContext``.

    - ``pool``/``workers``: idle threads of ``pool`` (each pinned to one torch thread by ``pin_to_one_thread``)
      over which a CPU tensor's chunks are spread in ``workers`` contiguous groups, each with its own scratch
      (the engine's merge workers while a tensor too big to merge several at once runs).  ``None``: the chunks
      run in turn on the calling thread.
    - ``pinned``: the calling thread is itself pinned to one torch thread (an engine worker), so its thread
      count is left alone.

    The default runs chunk loops in turn, on one intra-op thread, restoring the caller's count afterwards: what
    a direct call of a method (a test, a notebook) gets.
    """

    pool: Executor | None = None
    workers: int = 1
    pinned: bool = False

    @contextmanager
    def single_threaded(self, device: torch.device) -> Iterator[None]:
        """Run the enclosed CPU ops with one intra-op thread (see the module note); the count is restored."""
        threads = torch.get_num_threads()
        if device.type != "cpu" or threads == 1 or CHUNK_THREADS is None or self.pinned:
            yield
            return
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(threads)

    def spreads(self, device: torch.device, chunks: int) -> bool:
        """Whether ``chunks`` chunks of a tensor on ``device`` are spread over the pool."""
        return self.pool is not None and device.type == "cpu" and chunks >= 2 * self.workers


#: Chunk loops in turn on the calling thread (the default of every ``MethodContext``).
SERIAL = ChunkExecutor()


class Workspace:
    """The chunking of one tensor of ``numel`` entries, the scratch buffers its passes reuse, and where its
    chunk loops run (``executor``)."""

    def __init__(
        self, numel: int, device: torch.device | str = "cpu", executor: ChunkExecutor = SERIAL
    ) -> None:
        self.device = torch.device(device)
        self.executor = executor
        self.ranges = chunk_ranges(numel, self.device)
        size = max(1, min(numel, chunk_size(self.device)))
        self.scratch = Scratch(size, self.device)

    def single_threaded(self) -> AbstractContextManager[None]:
        """``self.executor.single_threaded`` on this workspace's device."""
        return self.executor.single_threaded(self.device)

    def map(self, fn: Callable[[int, int, int, Scratch], T]) -> list[T]:
        """``[fn(c, start, stop, scratch) for each chunk c]``, results in chunk order.

        With an executor that has a pool (the engine's big tensors) the chunks are split into contiguous
        groups, one per pinned worker with its own scratch; ``fn`` must touch only its own chunk (every
        caller's does).
        """
        if self.executor.spreads(self.device, len(self.ranges)):
            return self._map_parallel(fn)
        with self.single_threaded():
            return [fn(c, start, stop, self.scratch) for c, (start, stop) in enumerate(self.ranges)]

    def _map_parallel(self, fn: Callable[[int, int, int, Scratch], T]) -> list[T]:
        pool, workers = self.executor.pool, self.executor.workers
        assert pool is not None
        chunks = list(enumerate(self.ranges))
        bounds = [len(chunks) * g // workers for g in range(workers + 1)]
        size = self.scratch.a.numel()

        def run(group: list[tuple[int, tuple[int, int]]]) -> list[T]:
            scratch = Scratch(size, self.device)
            return [fn(c, start, stop, scratch) for c, (start, stop) in group]

        futures = [pool.submit(run, chunks[bounds[g] : bounds[g + 1]]) for g in range(workers)]
        return [result for future in futures for result in future.result()]
