"""Shared pieces of the task-arithmetic family: sparsifiers, rescaling, TIES sign election, the combine step.

Every sparsifier works IN PLACE on one task vector (a row of the engine's ``deltas`` buffer) and follows
MergeKit 0.1.5's rules for how many entries survive.  None of them sorts the whole tensor for a top-k:
``magnitude_thresholds`` finds the exact threshold from a sample bracket plus ``kthvalue`` on the few
candidates inside it.  Full-tensor passes run in cache-sized chunks (``CHUNK`` entries) with reused
buffers (see "Chunked passes" below).

Tie rule for every magnitude mask here: entries are ordered by magnitude, and among equal magnitudes the
LOWER flat index counts as larger.  So a top-k keeps the lowest-index entries of a tied group, and an
outlier cut (breadcrumbs) drops the lowest-index ones.  MergeKit's order for ties is whatever its unstable
sort yields.
"""

from __future__ import annotations

import functools
import itertools
import math
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor
from contextlib import contextmanager
from typing import NamedTuple, TypeVar

import numpy as np
import torch
from torch import Tensor

from transfuse.errors import ParameterError
from transfuse.methods.registry import ParamSpec

# --------------------------------------------------------------------------------------------------------
# Parameter specs shared by the methods of this family.

DENSITY = ParamSpec(
    "density", float, 1.0, "fraction of each task vector's entries kept", per_model=True, low=0.0, high=1.0
)
NORMALIZE_FALSE = ParamSpec("normalize", bool, False, "divide the summed task vectors by the sum of weights")
NORMALIZE_TRUE = ParamSpec("normalize", bool, True, "divide the summed task vectors by the sum of weights")
LAMBDA = ParamSpec("lambda", float, 1.0, "global scale of the merged task vector")
INT8_MASK = ParamSpec(
    "int8_mask", bool, False, "accepted for MergeKit recipes; no effect (transfuse masks are always boolean)"
)
RESCALE_FALSE = ParamSpec(
    "rescale", bool, False, "rescale each sparsified task vector to its original L1 norm"
)
RESCALE_TRUE = ParamSpec("rescale", bool, True, "rescale each sparsified task vector (see rescale_mode)")
RESCALE_MODE = ParamSpec(
    "rescale_mode",
    str,
    "l1",
    "l1: match the task vector's L1 norm (MergeKit); inverse_density: divide kept entries by their keep "
    "probability (the paper)",
    choices=("l1", "inverse_density"),
)
SIGN_ELECTION = ParamSpec(
    "sign_election",
    str,
    "weighted",
    "weighted: elect the sign of sum(w_i*tau_i) (MergeKit); unweighted: elect the sign of sum(tau_i), "
    "weights applied after (original TIES code)",
    choices=("weighted", "unweighted"),
)
GAMMA = ParamSpec(
    "gamma",
    float,
    0.01,
    "fraction of largest-magnitude entries removed as outliers",
    per_model=True,
    low=0.0,
    high=1.0,
)
EPSILON = ParamSpec(
    "epsilon",
    float,
    0.15,
    "half-width of the keep-probability range density +/- epsilon (must stay inside (0, 1))",
    per_model=True,
    low=0.0,
    high=1.0,
)

#: MergeKit's guard for rescaling by a near-zero norm.
RESCALE_EPS = 1e-7


def per_model_values(values: Tensor) -> list[float]:
    """Python floats of a ``[K]`` per-model parameter, as the decimals the recipe wrote.

    MergeKit computes ``int(density * n)`` with the recipe's Python float; the float32 copy of 0.7 is
    0.69999999 and would keep one entry fewer.  The shortest decimal that round-trips the float32 value
    recovers what the user wrote (up to ~7 significant digits).
    """
    if values.dtype == torch.float32:
        return [float(str(np.float32(v))) for v in values.tolist()]
    return [float(v) for v in values.tolist()]


# --------------------------------------------------------------------------------------------------------
# Chunked passes.
#
# Every full-tensor pass runs over cache-sized chunks with reused scratch buffers: one fused chunk loop
# instead of a chain of whole-tensor ops, each of which re-reads DRAM and page-faults a fresh temporary
# (5-6x faster per pass).  The chunk ops run with ONE intra-op thread: a chunk loop issues thousands of
# small ops, and with 2 OpenMP threads on a loaded 2-core machine every op's barrier waits for a descheduled
# thread (measured 5-30x slower than one thread; on an idle machine 2 threads gain only ~1.3x because the
# passes are memory-bound).  A pool of single-threaded chunk workers fared no better under load (GIL hand-offs
# stall the same way).  ``Workspace.map`` is the one place to change that policy.
#
# Masks are applied with float ops only (hardshrink, threshold, clamp, multiply by a 0/1 float): on CPU a
# boolean-output comparison or ``masked_fill_`` costs 1-5 ns per entry, a float op 0.1-0.2 ns.

# entries per chunk on CPU: 1 MiB of float32, the L2 size here; two engine workers ran ~8% faster than at 2 MiB
CHUNK = 1 << 18
_DEVICE_CHUNK = 1 << 24  # accelerator: few large launches; float32 sums of 0/1 flags stay exact (<= 2**24)
_SAMPLE = 1 << 16
_SAMPLE_SEED = 0x5EED  # fixed: thresholds never depend on any caller's random state
_BRACKET_SIGMAS = 6.0

T = TypeVar("T")


def chunk_ranges(numel: int, device: torch.device | str = "cpu") -> list[tuple[int, int]]:
    """``(start, stop)`` of consecutive chunks covering ``range(numel)`` (chunk length by device)."""
    size = CHUNK if torch.device(device).type == "cpu" else _DEVICE_CHUNK
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


class Workspace:
    """The chunking of one tensor of ``numel`` entries and the scratch buffers its passes reuse."""

    def __init__(self, numel: int, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.ranges = chunk_ranges(numel, self.device)
        size = max(1, min(numel, CHUNK if self.device.type == "cpu" else _DEVICE_CHUNK))
        self.scratch = Scratch(size, self.device)

    def map(self, fn: Callable[[int, int, int, Scratch], T]) -> list[T]:
        """``[fn(c, start, stop, scratch) for each chunk c]``, results in chunk order.

        Inside ``parallel_chunks`` (the engine's big tensors) the chunks are split into contiguous groups, one
        per pinned worker with its own scratch; ``fn`` must touch only its own chunk (every caller's does).
        """
        pool = getattr(_chunk_pool, "executor", None)
        workers = getattr(_chunk_pool, "workers", 1)
        if pool is not None and self.device.type == "cpu" and len(self.ranges) >= 2 * workers:
            return self._map_parallel(fn, pool, workers)
        with single_threaded(self.device):
            return [fn(c, start, stop, self.scratch) for c, (start, stop) in enumerate(self.ranges)]

    def _map_parallel(
        self, fn: Callable[[int, int, int, Scratch], T], pool: Executor, workers: int
    ) -> list[T]:
        chunks = list(enumerate(self.ranges))
        bounds = [len(chunks) * g // workers for g in range(workers + 1)]
        size = self.scratch.a.numel()

        def run(group: list[tuple[int, tuple[int, int]]]) -> list[T]:
            scratch = Scratch(size, self.device)
            return [fn(c, start, stop, scratch) for c, (start, stop) in group]

        futures = [pool.submit(run, chunks[bounds[g] : bounds[g + 1]]) for g in range(workers)]
        return [result for future in futures for result in future.result()]


#: Intra-op threads for chunk loops: None = PyTorch's current setting, 1 = single-threaded (see above).
CHUNK_THREADS: int | None = 1

_pinned = threading.local()


def pin_to_one_thread() -> None:
    """Make the calling thread run torch single-threaded for good (the engine's merge workers): its OpenMP and
    BLAS thread counts are per thread, and ``single_threaded`` leaves it alone (restoring the process-wide count
    from a worker would undo the pin)."""
    torch.set_num_threads(1)
    _pinned.value = True


_chunk_pool = threading.local()


@contextmanager
def parallel_chunks(pool: Executor, workers: int) -> Iterator[None]:
    """Within this block, ``Workspace.map`` called from this thread spreads the chunks of a CPU tensor over
    ``workers`` threads of ``pool``, which must be pinned to one torch thread each (``pin_to_one_thread``) and
    otherwise idle (the engine's merge workers while a tensor too big to merge several at once runs)."""
    if workers <= 1:
        yield
        return
    _chunk_pool.executor, _chunk_pool.workers = pool, workers
    try:
        yield
    finally:
        _chunk_pool.executor, _chunk_pool.workers = None, 1


@contextmanager
def single_threaded(device: torch.device) -> Iterator[None]:
    """Run the enclosed CPU ops with one intra-op thread (see the note above); the count is restored."""
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1 or CHUNK_THREADS is None or getattr(_pinned, "value", False):
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _below(value: float) -> float:
    """The largest float32 below ``value`` (``|x| > _below(t)`` is ``|x| >= t`` for float32 ``x``)."""
    return float(np.nextafter(np.float32(value), np.float32(-np.inf)))


def _above(value: float) -> float:
    """The smallest float32 above ``value``."""
    return float(np.nextafter(np.float32(value), np.float32(np.inf)))


def sum_rows(block: Tensor, out: Tensor) -> Tensor:
    """``out = block[0] + block[1] + ...`` (left to right): the same sum as ``torch.sum(block, dim=0)``, but a
    chain of ``add`` is 4x faster than a reduction over a short leading dimension on CPU."""
    if block.shape[0] == 1:
        return out.copy_(block[0])
    torch.add(block[0], block[1], out=out)
    for i in range(2, block.shape[0]):
        out.add_(block[i])
    return out


def _gather_where_nonzero(values: Tensor, mask: Tensor) -> Tensor:
    """The entries of 1-D ``values`` where ``mask`` is nonzero, in index order.  On CPU numpy's ``extract``
    does this ~6x faster than ``torch.nonzero`` + ``index_select`` (the gather dominated the threshold scan)."""
    if values.device.type == "cpu":
        flags = mask.numpy() != 0
        return torch.from_numpy(np.extract(flags, values.numpy()))
    return values.index_select(0, torch.nonzero(mask).reshape(-1))


# --------------------------------------------------------------------------------------------------------
# Exact magnitude thresholds.


class Threshold(NamedTuple):
    """The ``k``-th largest magnitude ``value`` of a tensor.

    ``ties`` entries equal it; the ``ties_in_top`` of them with the lowest indices are in the top k;
    ``chunk_ties[c]`` of them lie in chunk ``c``.
    """

    value: float
    ties_in_top: int
    ties: int
    chunk_ties: list[int]


def magnitude_thresholds(
    x: Tensor, ks: Sequence[int], ws: Workspace | None = None, l1: bool = False
) -> tuple[list[Threshold], float]:
    """The exact ``k``-th largest ``|x|`` for each ``k`` in ``ks`` (``1 <= k <= n``), in one chunked pass.

    Also returns ``sum |x|`` (float64) if ``l1``, else 0.

    A stratified sample of ``|x|`` (fixed seed) estimates each ``k/n`` quantile.  One pass counts the
    entries above a +/- 6 sigma bracket around it and gathers the (~2%) entries inside; ``kthvalue`` runs on
    those candidates only.  Values that fill a large share of the bracket (bf16 deltas are coarsely
    quantised: one magnitude can hold 20% of a tensor) are counted instead of gathered, and zeros always
    are.  If a bracket misses (probability ~1e-9, or adversarial data) that ``k`` falls back to ``kthvalue``
    over all entries.  Tensors of one chunk use ``kthvalue`` directly.
    """
    flat = x.reshape(-1)
    n = flat.numel()
    for k in ks:
        if not 1 <= k <= n:
            raise ValueError(f"k={k} out of range for {n} entries")
    ws = ws if ws is not None else Workspace(n, x.device)
    if len(ws.ranges) == 1:
        with single_threaded(ws.device):
            a = torch.abs(flat, out=ws.scratch.a[:n])
            total = float(a.sum(dtype=torch.float64)) if l1 else 0.0
            found = []
            for k in ks:
                t = a.kthvalue(n - k + 1).values.item()
                greater = int(torch.gt(a, t, out=ws.scratch.b[:n]).sum())
                ties = int(torch.eq(a, t, out=ws.scratch.b[:n]).sum())
                found.append(Threshold(t, k - greater, ties, [ties]))
        return found, total

    positions = _sample_positions(n, _SAMPLE)
    if flat.device.type == "cpu":
        sample = np.abs(flat.numpy().take(positions))  # numpy's take: ~10x faster than tensor indexing here
    else:
        sample = flat[torch.from_numpy(positions).to(flat.device)].abs_().cpu().numpy()
    sample.sort()  # one numpy sort of the sample serves every bracket (vs two kthvalue calls per bracket)
    brackets = [_bracket(sample, k / n) for k in ks]

    def scan(
        c: int, start: int, stop: int, s: Scratch
    ) -> tuple[float, list[int], list[list[int]], list[Tensor]]:
        size = stop - start
        a = torch.abs(flat[start:stop], out=s.a[:size])
        chunk_l1 = float(a.sum(dtype=torch.float64)) if l1 else 0.0
        if a.device.type == "cpu":
            return (chunk_l1, *_scan_cpu(a.numpy(), brackets, s.flags(size)))
        f, g = s.b[:size], s.c[:size]
        above, heavy_counts, parts = [], [], []
        for lo, hi, heavy in brackets:
            above.append(int(torch.gt(a, hi, out=f).sum()) if hi is not None else 0)
            if lo is not None and lo == hi and heavy == [lo]:
                # The bracket is one (heavy) value, as with coarsely quantised bf16 deltas: count it, and
                # there is nothing else to gather.
                heavy_counts.append([int(torch.eq(a, lo, out=g).sum())])
                parts.append(a[:0])
                continue
            if lo is not None:
                torch.hardshrink(a, _below(lo), out=f)  # a where a >= lo, else 0
            else:
                f.copy_(a)
            if hi is not None:
                f.neg_()
                torch.threshold_(f, -_above(hi), 0.0)  # -a where a <= hi, else 0
            counts = []
            for value in heavy:
                if value == 0.0:
                    counts.append(size - int(torch.count_nonzero(a)))
                    continue
                counts.append(int(torch.eq(a, value, out=g).sum()))
                f.addcmul_(f, g, value=-1.0)  # f - f*[a == value]: leave the heavy value out of the pool
            heavy_counts.append(counts)
            parts.append(_gather_where_nonzero(a, f))  # zeros never enter the pool
        return chunk_l1, above, heavy_counts, parts

    per_chunk = ws.map(scan)
    total = sum(r[0] for r in per_chunk)  # summed in chunk order: independent of the worker count
    found = []
    for b, k in enumerate(ks):
        above = sum(r[1][b] for r in per_chunk)
        heavy = brackets[b][2]
        heavy_counts = [[r[2][b][h] for r in per_chunk] for h in range(len(heavy))]
        parts = [r[3][b] for r in per_chunk]
        resolved = _resolve(k - above, parts, heavy, heavy_counts)
        found.append(resolved if resolved is not None else _exact_chunked(flat, k, ws))
    return found, total


def _scan_cpu(
    a: np.ndarray,
    brackets: list[tuple[float | None, float | None, list[float]]],
    flags: tuple[np.ndarray, np.ndarray],
) -> tuple[list[int], list[list[int]], list[Tensor]]:
    """One chunk of ``magnitude_thresholds``'s scan on CPU, over the magnitudes ``a``: per bracket, the count
    above it, the count of each heavy value, and the other entries inside it (zeros never), in index order.

    The same results as the float-mask scan below (used on accelerators), in about half the time: numpy's
    boolean comparisons write one byte per entry and run at ~0.2 ns each here, where a torch comparison with
    a boolean output costs 1-5 ns.
    """
    above_hi, inside = flags
    above, heavy_counts, parts = [], [], []
    for lo, hi, heavy in brackets:
        if hi is not None:
            np.greater(a, np.float32(hi), out=above_hi)
            above.append(int(np.count_nonzero(above_hi)))
        else:
            above_hi.fill(False)
            above.append(0)
        if lo is not None and lo == hi and heavy == [lo]:
            # the bracket is one (heavy) value, as with coarsely quantised bf16 deltas: count it
            heavy_counts.append([int(np.count_nonzero(np.equal(a, np.float32(lo), out=inside)))])
            parts.append(torch.empty(0, dtype=torch.float32))
            continue
        # inside = lo <= a <= hi (a > 0 when there is no lower end: zeros are counted, never gathered)
        if lo is not None:
            np.greater_equal(a, np.float32(lo), out=inside)
        else:
            np.greater(a, np.float32(0.0), out=inside)
        inside_count = int(np.count_nonzero(inside)) if lo is None else 0
        np.greater(inside, above_hi, out=inside)  # and not above hi
        counts = []
        for value in heavy:
            if value == 0.0:
                counts.append(a.size - inside_count)  # the entries that are not positive
                continue
            is_value = np.equal(a, np.float32(value), out=above_hi)  # above_hi is no longer needed
            counts.append(int(np.count_nonzero(is_value)))
            np.greater(inside, is_value, out=inside)  # leave the heavy value out of the pool
        heavy_counts.append(counts)
        parts.append(torch.from_numpy(np.extract(inside, a)))
    return above, heavy_counts, parts


_HEAVY_SHARE = 1 / 64  # a value holding this share of the sample is counted, not gathered


@functools.lru_cache(maxsize=32)
def _sample_positions(n: int, size: int) -> np.ndarray:
    """Flat positions of the threshold sample: one random entry per ``1/size`` of ``range(n)`` (fixed seed).

    Stratified: lower variance than i.i.d. draws, and ascending addresses instead of cache-missing random
    gathers.  Cached per tensor size (a model has few distinct sizes); read-only.
    """
    gen = torch.Generator().manual_seed(_SAMPLE_SEED)
    starts = torch.arange(size + 1, dtype=torch.int64) * n // size
    widths = (starts[1:] - starts[:-1]).to(torch.float64)
    offsets = (torch.rand(size, generator=gen, dtype=torch.float64) * widths).long()
    positions = (starts[:-1] + offsets).numpy()
    positions.setflags(write=False)
    return positions


def _bracket(sorted_sample: np.ndarray, frac: float) -> tuple[float | None, float | None, list[float]]:
    """``(lo, hi, heavy)``: sample bracket of the top-``frac`` quantile (None = unbounded) and the values
    inside it frequent enough to count instead of gather (0.0 whenever zeros are inside).  ``sorted_sample``
    holds the sampled magnitudes in ascending order."""
    size = sorted_sample.size
    centre = size * (1.0 - frac)  # ascending sample position of the answer
    half = _BRACKET_SIGMAS * math.sqrt(size * frac * (1.0 - frac)) + 2.0
    lo_pos, hi_pos = math.floor(centre - half), math.ceil(centre + half)
    lo = float(sorted_sample[lo_pos]) if lo_pos >= 0 else None
    hi = float(sorted_sample[hi_pos]) if hi_pos < size else None
    if lo == 0.0:
        lo = None  # zeros are inside: counted as a heavy value
    first = int(np.searchsorted(sorted_sample, np.float32(lo), "left")) if lo is not None else 0
    stop = int(np.searchsorted(sorted_sample, np.float32(hi), "right")) if hi is not None else size
    values, counts = np.unique(sorted_sample[first:stop], return_counts=True)
    heavy = [
        float(v) for v, c in zip(values.tolist(), counts.tolist(), strict=True) if c >= _HEAVY_SHARE * size
    ]
    if lo is None and 0.0 not in heavy:
        heavy.insert(0, 0.0)
    return lo, hi, heavy


def _resolve(
    rank: int, parts: list[Tensor], heavy: list[float], heavy_counts: list[list[int]]
) -> Threshold | None:
    """The ``rank``-th largest of (gathered pool) + (heavy values with their counts), or None if the
    bracket missed."""
    pool = torch.cat(parts)
    heavy_totals = [sum(c) for c in heavy_counts]
    if not 1 <= rank <= pool.numel() + sum(heavy_totals):
        return None
    consumed = 0  # pool entries above the current heavy value
    for h in sorted(range(len(heavy)), key=lambda i: heavy[i], reverse=True):
        pool_above = int(torch.gt(pool, heavy[h]).sum())
        if rank <= pool_above - consumed:
            return _from_pool(pool, parts, consumed + rank)
        rank -= pool_above - consumed
        consumed = pool_above
        if rank <= heavy_totals[h]:
            return Threshold(heavy[h], rank, heavy_totals[h], heavy_counts[h])
        rank -= heavy_totals[h]
    return _from_pool(pool, parts, consumed + rank)


def _from_pool(pool: Tensor, parts: list[Tensor], rank: int) -> Threshold:
    """The ``rank``-th largest entry of ``pool`` (all of whose ties lie in the pool)."""
    position = pool.numel() - rank  # ascending
    if pool.device.type == "cpu":
        t = float(np.partition(pool.numpy(), position)[position])  # numpy's select: ~3x faster than kthvalue
    else:
        t = pool.kthvalue(position + 1).values.item()
    per_chunk = [int(torch.eq(p, t).sum()) for p in parts]
    return Threshold(t, rank - int(torch.gt(pool, t).sum()), sum(per_chunk), per_chunk)


def _exact_chunked(flat: Tensor, k: int, ws: Workspace) -> Threshold:
    """Fallback: ``kthvalue`` over all of ``|flat|``, tie counts chunk by chunk."""
    magnitudes = flat.abs()
    n = magnitudes.numel()
    t = magnitudes.kthvalue(n - k + 1).values.item()
    greater = int(torch.gt(magnitudes, t).sum())
    del magnitudes

    def count(c: int, start: int, stop: int, s: Scratch) -> int:
        a = torch.abs(flat[start:stop], out=s.a[: stop - start])
        return int(torch.eq(a, t, out=s.b[: stop - start]).sum())

    per_chunk = ws.map(count)
    return Threshold(t, k - greater, sum(per_chunk), per_chunk)


# --------------------------------------------------------------------------------------------------------
# Applying magnitude masks.


def _zero_tie_ordinals_(
    chunk: Tensor, value: float, first_ordinal: int, drop: Callable[[Tensor], Tensor], s: Scratch
) -> None:
    """In ``chunk``, zero the entries with ``|x| == value`` whose tie ordinal (counted across chunks from
    ``first_ordinal``, in index order) satisfies ``drop(ordinals)``."""
    a = torch.abs(chunk, out=s.c[: chunk.numel()])
    positions = torch.nonzero(a == value).reshape(-1)
    ordinals = torch.arange(first_ordinal, first_ordinal + positions.numel(), device=chunk.device)
    chunk[positions[drop(ordinals)]] = 0.0


class Band:
    """Zeroes the entries outside the top ``k_keep`` magnitudes (``keep_top``) and inside the top ``k_drop``
    (``drop_top``; ``k_drop < k_keep``), one chunk at a time, in any chunk order.

    Ties at a threshold follow index order (lower index = larger).  Chunks wholly before or after a tie
    boundary need one ``hardshrink`` (its threshold nudged by one float32 ulp keeps or drops the ties);
    only the chunk holding the boundary locates its tied entries.
    """

    def __init__(self, keep_top: Threshold | None, drop_top: Threshold | None) -> None:
        self.keep_top, self.drop_top = keep_top, drop_top
        self.lo_v = keep_top.value if keep_top is not None and keep_top.value > 0 else None
        self.hi_v = drop_top.value if drop_top is not None else None
        same = self.lo_v is not None and self.lo_v == self.hi_v
        # Ties at lo_v with ordinals in [lo_first, lo_end) are kept; ties at hi_v with ordinals < hi_drop dropped.
        self.lo_first = drop_top.ties_in_top if same and drop_top is not None else 0
        self.lo_end = keep_top.ties_in_top if keep_top is not None else 0
        self.hi_drop = (
            drop_top.ties_in_top if drop_top is not None and not same and (self.hi_v or 0) > 0 else 0
        )
        # first tie ordinal in each chunk
        self.lo_start = (
            list(itertools.accumulate(keep_top.chunk_ties, initial=0)) if self.lo_v is not None else []
        )
        self.hi_start = list(itertools.accumulate(drop_top.chunk_ties, initial=0)) if self.hi_drop else []

    def apply(self, c: int, chunk: Tensor, s: Scratch) -> None:
        """Apply the band to ``chunk``, the ``c``-th chunk."""
        if self.lo_v is not None:
            lo_v, first, end = self.lo_v, self.lo_first, self.lo_end
            start, stop = self.lo_start[c], self.lo_start[c + 1]
            disjoint = stop > start and (stop <= first or start >= end)
            # hardshrink keeps |x| > lambd: _below(lo_v) keeps the ties at lo_v, lo_v drops them
            torch.hardshrink(chunk, lo_v if disjoint else _below(lo_v), out=chunk)
            if stop > start and not disjoint and not (start >= first and stop <= end):
                _zero_tie_ordinals_(chunk, lo_v, start, lambda o: (o < first) | (o >= end), s)
        if self.hi_v is not None:
            hi_v, hi_drop = self.hi_v, self.hi_drop
            if hi_v == 0:
                chunk.zero_()  # the top k_drop holds every nonzero entry
                return
            start, stop = (self.hi_start[c], self.hi_start[c + 1]) if hi_drop else (0, 0)
            # chunk - hardshrink(chunk, lambd) zeros |x| > lambd and leaves the rest exactly
            lambd = _below(hi_v) if stop > start and stop <= hi_drop else hi_v
            chunk.sub_(torch.hardshrink(chunk, lambd, out=s.b[: chunk.numel()]))
            if start < hi_drop < stop:
                _zero_tie_ordinals_(chunk, hi_v, start, lambda o: o < hi_drop, s)


def keep_band_(
    x: Tensor, keep_top: Threshold | None, drop_top: Threshold | None, ws: Workspace, l1: bool = False
) -> float:
    """Apply ``Band(keep_top, drop_top)`` to all of ``x`` in place; return ``sum |result|`` if ``l1``."""
    flat = x.reshape(-1)
    band = Band(keep_top, drop_top)

    def apply(c: int, start: int, stop: int, s: Scratch) -> float:
        chunk = flat[start:stop]
        band.apply(c, chunk, s)
        return float(torch.abs(chunk, out=s.a[: stop - start]).sum(dtype=torch.float64)) if l1 else 0.0

    return sum(ws.map(apply))


def l1_norm(x: Tensor, ws: Workspace) -> float:
    """``sum |x|`` in float64, chunk by chunk (summed in chunk order)."""
    flat = x.reshape(-1)
    return sum(
        ws.map(
            lambda c, start, stop, s: float(
                torch.abs(flat[start:stop], out=s.a[: stop - start]).sum(dtype=torch.float64)
            )
        )
    )


def l1_rescale_(x: Tensor, before: float, after: float) -> None:
    """Scale ``x`` by ``before / after`` (MergeKit: not if either L1 norm is below 1e-7)."""
    if before < RESCALE_EPS or after < RESCALE_EPS:
        return
    x.mul_(torch.tensor(before, dtype=torch.float32) / torch.tensor(after, dtype=torch.float32))


# --------------------------------------------------------------------------------------------------------
# Sparsifiers: one task vector (a contiguous row of ``deltas``), in place.  The magnitude ones may return a
# Band instead of applying it, so that the combine pass applies it chunk by chunk (saves a full pass).


def magnitude_(
    delta: Tensor, density: float, rescale: bool, ws: Workspace, defer: bool = False
) -> Band | None:
    """TIES trim: keep exactly ``max(1, int(density*n))`` largest-magnitude entries (all if density >= 1)."""
    if density >= 1:
        return None
    n = delta.numel()
    if density <= 0 or n == 0:
        delta.zero_()
        return None
    k = max(1, int(density * n))
    if k >= n:
        return None
    (threshold,), before = magnitude_thresholds(delta, [k], ws, l1=rescale)
    if defer and not rescale:
        return Band(threshold, None)
    after = keep_band_(delta, threshold, None, ws, l1=rescale)
    if rescale:
        l1_rescale_(delta, before, after)
    return None


def magnitude_outliers_(
    delta: Tensor, density: float, gamma: float, rescale: bool, ws: Workspace, defer: bool = False
) -> Band | None:
    """Breadcrumbs: drop the ``gamma`` largest outliers and the smallest, keeping ``int(density*n)`` entries.

    MergeKit's rule: ``target = int(density*n)``, ``n_top = int(gamma*n)``, ``n_bot = max(0, n - target -
    n_top)``; the kept entries are ascending ranks ``[n_bot, n_bot + target)``, so the outlier cut shrinks
    when ``target + n_top > n``.  Density >= 1 keeps everything (gamma is then ignored).
    """
    if density >= 1:
        return None
    n = delta.numel()
    target = int(density * n)
    if target <= 0:
        delta.zero_()  # L1 rescaling of an all-zero result is skipped, as in MergeKit
        return None
    n_top = int(gamma * n)
    n_bot = max(0, n - target - n_top)
    dropped_top = n - n_bot - target  # the outliers actually removed
    ks = ([dropped_top + target] if n_bot > 0 else []) + ([dropped_top] if dropped_top > 0 else [])
    if not ks:
        return None
    thresholds, before = magnitude_thresholds(delta, ks, ws, l1=rescale)
    found = dict(zip(ks, thresholds, strict=True))
    keep_top = found[dropped_top + target] if n_bot > 0 else None
    if defer and not rescale:
        return Band(keep_top, found.get(dropped_top))
    after = keep_band_(delta, keep_top, found.get(dropped_top), ws, l1=rescale)
    if rescale:
        l1_rescale_(delta, before, after)
    return None


def random_(
    delta: Tensor, density: float, rescale: bool, rescale_mode: str, generator: torch.Generator, ws: Workspace
) -> None:
    """DARE: keep each entry independently with probability ``density``.

    The mask is ``rand < density`` drawn from ``generator`` over ``delta`` in order (chunk by chunk draws
    the same stream), which is bit-for-bit what ``torch.bernoulli(full_like(delta, density))`` (MergeKit)
    draws from a generator in the same state.
    """
    if density >= 1:
        return
    flat = delta.reshape(-1)
    l1 = rescale and rescale_mode == "l1"
    before = l1_norm(delta, ws) if l1 else 0.0
    s = ws.scratch
    with single_threaded(ws.device):
        for start, stop in ws.ranges:
            size = stop - start
            keep = torch.lt(s.b[:size].uniform_(generator=generator), density, out=s.c[:size])
            flat[start:stop].mul_(keep)  # like MergeKit's tensor * mask (dropped negatives become -0.0)
    if not rescale or density <= 0:
        return
    if l1:
        l1_rescale_(delta, before, l1_norm(delta, ws))
    else:
        delta.div_(density)


def della_magprune_(
    delta: Tensor,
    density: float,
    epsilon: float,
    rescale: bool,
    rescale_mode: str,
    generator: torch.Generator,
    ws: Workspace,
    model_index: int = 0,
) -> None:
    """DELLA MagPrune: keep probability rises linearly with magnitude rank, from density-eps to density+eps.

    Ranks are taken along dim 1 (1-D tensors are one row), as MergeKit does: with ``L`` entries per row,
    the entry of ascending rank ``r`` (1..L) is kept with probability ``density - eps + 2*eps*(r-1)/(L-1)``.
    Rows of one entry get ``density`` (MergeKit divides 0/0 there and crashes).  Ranking needs a per-row
    sort; it is one stable argsort (MergeKit does two).
    """
    if density >= 1:
        return
    if density <= 0:
        delta.zero_()
        return
    if density + epsilon >= 1 or density - epsilon <= 0:
        raise ParameterError(
            f"DELLA: model {model_index} has density={density} and epsilon={epsilon}; density +/- epsilon "
            "must lie strictly inside (0, 1): lower epsilon or move density away from 0 and 1"
        )
    rows = delta if delta.dim() >= 2 else delta.reshape(1, -1)
    rows = rows.movedim(1, -1)  # rank along MergeKit's dim 1
    length = rows.shape[-1]
    # Descending stable sort: position j holds ascending rank L - j; ties give the lower index the higher rank.
    order = rows.abs().argsort(dim=-1, descending=True, stable=True)
    if length > 1:
        # Same float32 arithmetic as MergeKit so that probabilities (and hence masks) agree bit for bit.
        positions = torch.arange(length - 1, -1, -1, dtype=torch.float32, device=delta.device)
        rank_norm = (positions / float(length - 1)).clamp(0, 1)
        by_position = rank_norm * 2 * epsilon + (density - epsilon)
    else:
        by_position = torch.full((length,), density, dtype=torch.float32, device=delta.device)
    probs = torch.empty_like(rows).scatter_(-1, order, by_position.expand_as(order))
    del order
    probs = probs.movedim(-1, 1).reshape(delta.shape)
    l1 = rescale and rescale_mode == "l1"
    before = l1_norm(delta, ws) if l1 else 0.0
    keep = torch.rand(delta.shape, generator=generator, device=delta.device).lt_(probs)  # = bernoulli(probs)
    delta.mul_(keep)
    del keep
    if not rescale:
        return
    if l1:
        l1_rescale_(delta, before, l1_norm(delta, ws))
    else:
        delta.div_(probs)


# --------------------------------------------------------------------------------------------------------
# The combine step shared by task_arithmetic, ties, dare_*, breadcrumbs*, della*.

# (delta row, model index, workspace) -> a Band still to apply to that row, or None (already sparsified)
Sparsifier = Callable[[Tensor, int, Workspace], "Band | None"]

_BIG = 3.0e38  # a finite stand-in for infinity in clamp bounds (inf * 0 would give NaN)


def merge_task_vectors(
    base: Tensor,
    deltas: Tensor,
    weights: Tensor,
    *,
    sparsify: Sparsifier | None,
    consensus: bool,
    normalize: bool,
    lambda_: float,
    sign_election: str = "weighted",
) -> Tensor:
    """``base + lambda * combine(w_i * sparsify(tau_i))``, overwriting ``deltas``.

    Without consensus: ``sum_i w_i tau_i``, divided by ``sum_i w_i`` (if |.| >= 1e-8) when normalizing.
    With consensus (TIES): per entry, elect ``s = sign(sum_i w_i tau_i)`` (zero -> +), keep the
    contributions of sign ``s`` and divide by the sum of their weights (0 -> 1) when normalizing.
    ``sign_election="unweighted"`` elects on ``sum_i tau_i`` and breaks zero sums by the tensor's majority
    elected sign (original TIES code); weights then apply to the kept entries only.
    """
    # one intra-op thread for the whole merge: toggling it per pass costs more than it saves
    with single_threaded(base.device):
        return _merge_task_vectors(
            base, deltas, weights, sparsify, consensus, normalize, lambda_, sign_election
        )


def _merge_task_vectors(
    base: Tensor,
    deltas: Tensor,
    weights: Tensor,
    sparsify: Sparsifier | None,
    consensus: bool,
    normalize: bool,
    lambda_: float,
    sign_election: str,
) -> Tensor:
    if not deltas.is_contiguous():
        deltas = deltas.contiguous()
    k = deltas.shape[0]
    n = base.numel()
    weights = weights.to(torch.float32)
    ws = Workspace(n, base.device)
    bands: list[Band | None] = [None] * k
    if sparsify is not None:
        for i in range(k):
            bands[i] = sparsify(deltas[i], i, ws)

    rows = deltas.reshape(k, n)
    w_col = weights.reshape(k, 1)
    weight_list = weights.tolist()
    unit_weights = all(w == 1.0 for w in weight_list)  # multiplying by 1 is exact: skip it
    scalar_divisor = None
    if normalize and not consensus:
        total_weight = weights.sum()
        scalar_divisor = total_weight if total_weight.abs() >= 1e-8 else torch.ones_like(total_weight)
    weighted_first = sign_election == "weighted"
    zero_plus = True
    if consensus and not weighted_first:
        pending = [(i, band) for i, band in enumerate(bands) if band is not None]
        if pending:  # the majority count needs the sparsified rows first

            def apply(c: int, start: int, stop: int, s: Scratch) -> None:
                for i, band in pending:
                    band.apply(c, rows[i, start:stop], s)

            ws.map(apply)
        bands = [None] * k
        zero_plus = _majority_plus(rows, ws)

    # The result overwrites the first task vector, chunk by chunk after the chunk's last use: a fresh output
    # buffer would page-fault on every first write (~40% of the combine's time on CPU).
    merged = rows[0]
    base_flat = base.reshape(-1)

    def combine(c: int, start: int, stop: int, s: Scratch) -> None:
        size = stop - start
        block = rows[:, start:stop]
        out = merged[start:stop]
        for i, band in enumerate(bands):
            if band is not None:
                band.apply(c, block[i], s)
        if not consensus:
            if not unit_weights:
                block.mul_(w_col)
            sum_rows(block, out)
            if scalar_divisor is not None:
                out.div_(scalar_divisor)
        else:
            if weighted_first and not unit_weights:
                block.mul_(w_col)
            plus = sum_rows(block, s.a[:size])
            (torch.ge if zero_plus else torch.gt)(plus, 0, out=plus)  # 1.0 where + is elected, else 0.0
            # clamp(x, low, high) keeps x where its sign is the elected one and gives 0 elsewhere, exactly:
            # + elected: [0, BIG]; - elected: [-BIG, 0].
            high = torch.mul(plus, _BIG, out=s.b[:size])
            low = torch.sub(high, _BIG, out=s.c[:size])
            for i in range(k):
                torch.clamp(block[i], min=low, max=high, out=block[i])
            divisor = None
            if normalize:
                divisor = s.a[:size].zero_()  # plus is no longer needed
                flag = s.b[:size]  # nor is high
                for i, w in enumerate(weight_list):
                    # an entry that survived (nonzero) is exactly an agreeing one
                    divisor.add_(torch.ne(block[i], 0, out=flag), alpha=w)
                divisor.add_(torch.eq(divisor, 0, out=flag))  # 0 -> 1
            if not weighted_first and not unit_weights:
                block.mul_(w_col)
            sum_rows(block, out)
            if divisor is not None:
                out.div_(divisor)
        if lambda_ != 1:
            out.mul_(lambda_)
        out.add_(base_flat[start:stop])

    ws.map(combine)
    return merged.reshape(base.shape)


def _majority_plus(rows: Tensor, ws: Workspace) -> bool:
    """Whether at least as many entries have a positive as a negative unweighted sum (original TIES)."""

    def count(c: int, start: int, stop: int, s: Scratch) -> tuple[int, int]:
        size = stop - start
        total = sum_rows(rows[:, start:stop], s.a[:size])
        return int(torch.gt(total, 0, out=s.b[:size]).sum()), int(torch.lt(total, 0, out=s.b[:size]).sum())

    counts = ws.map(count)
    return sum(p for p, _ in counts) >= sum(m for _, m in counts)


def sparsifier_for(
    kind: str,
    *,
    density: Tensor,
    rescale: bool = False,
    rescale_mode: str = "l1",
    gamma: Tensor | None = None,
    epsilon: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Sparsifier:
    """A per-model sparsifier closure reading model ``i``'s density (and gamma/epsilon)."""
    dens: Sequence[float] = per_model_values(density)
    if kind == "magnitude":
        return lambda d, i, s: magnitude_(d, dens[i], rescale, s, defer=True)
    if kind == "magnitude_outliers":
        assert gamma is not None
        gam = per_model_values(gamma)
        return lambda d, i, s: magnitude_outliers_(d, dens[i], gam[i], rescale, s, defer=True)
    if kind == "random":
        assert generator is not None
        return lambda d, i, s: random_(d, dens[i], rescale, rescale_mode, generator, s)
    if kind == "della_magprune":
        assert generator is not None and epsilon is not None
        eps = per_model_values(epsilon)
        return lambda d, i, s: della_magprune_(d, dens[i], eps[i], rescale, rescale_mode, generator, s, i)
    raise ValueError(f"unknown sparsification {kind!r}")
