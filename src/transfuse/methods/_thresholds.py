"""Exact magnitude thresholds without sorting: the k-th largest ``|x|`` of a task vector, for top-k masks.

TIES keeps the ``k`` largest magnitudes of each task vector and Breadcrumbs a band of them.  MergeKit argsorts
every tensor for that (``O(n log n)``, most of its TIES time); here a stratified sample of ``|x|`` (fixed seed)
brackets the ``k/n`` quantile, one chunked pass counts the entries above the bracket and gathers the few inside
it, and a selection runs on those only.  The answer is exact, with the tie information (``Threshold``) that the
masks need to keep exactly ``k`` entries.

Tie rule for every magnitude mask: entries are ordered by magnitude, and among equal magnitudes the LOWER flat
index counts as larger.  So a top-k keeps the lowest-index entries of a tied group, and an outlier cut
(breadcrumbs) drops the lowest-index ones.  MergeKit's order for ties is whatever its unstable sort yields.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from transfuse.chunks import Scratch, Workspace

_SAMPLE = 1 << 16
_SAMPLE_SEED = 0x5EED  # fixed: thresholds never depend on any caller's random state
_BRACKET_SIGMAS = 6.0


def float32_below(value: float) -> float:
    """The largest float32 below ``value`` (``|x| > float32_below(t)`` is ``|x| >= t`` for float32 ``x``)."""
    return float(np.nextafter(np.float32(value), np.float32(-np.inf)))


def float32_above(value: float) -> float:
    """The smallest float32 above ``value``."""
    return float(np.nextafter(np.float32(value), np.float32(np.inf)))


def _gather_where_nonzero(values: Tensor, mask: Tensor) -> Tensor:
    """The entries of 1-D ``values`` where ``mask`` is nonzero, in index order.  On CPU numpy's ``extract``
    does this ~6x faster than ``torch.nonzero`` + ``index_select`` (the gather dominated the threshold scan)."""
    if values.device.type == "cpu":
        flags = mask.numpy() != 0
        return torch.from_numpy(np.extract(flags, values.numpy()))
    return values.index_select(0, torch.nonzero(mask).reshape(-1))


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
        with ws.single_threaded():
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
                torch.hardshrink(a, float32_below(lo), out=f)  # a where a >= lo, else 0
            else:
                f.copy_(a)
            if hi is not None:
                f.neg_()
                torch.threshold_(f, -float32_above(hi), 0.0)  # -a where a <= hi, else 0
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
