"""Sparsifiers: how each task vector is thinned before the combine, following MergeKit 0.1.5's counts.

One function per rule, each IN PLACE on one task vector (a row of the engine's ``deltas`` buffer):
``magnitude_`` (TIES: top-k), ``magnitude_outliers_`` (Breadcrumbs: a band below the outliers), ``random_``
(DARE: Bernoulli drop), ``della_magprune_`` (DELLA: rank-dependent drop), with L1 rescaling where asked.  The
magnitude masks find exact thresholds in ``_thresholds`` and may be returned as a ``Band`` instead of applied, so
that the combine pass applies them chunk by chunk (one full pass fewer).  ``sparsifier_for`` binds one rule to
each model's parameters for ``_combine.merge_task_vectors``.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from transfuse.chunks import Scratch, Workspace
from transfuse.errors import ParameterError
from transfuse.methods._params import per_model_values
from transfuse.methods._thresholds import Threshold, float32_below, magnitude_thresholds

#: MergeKit's guard for rescaling by a near-zero norm.
RESCALE_EPS = 1e-7

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
            # hardshrink keeps |x| > lambd: float32_below(lo_v) keeps the ties at lo_v, lo_v drops them
            torch.hardshrink(chunk, lo_v if disjoint else float32_below(lo_v), out=chunk)
            if stop > start and not disjoint and not (start >= first and stop <= end):
                _zero_tie_ordinals_(chunk, lo_v, start, lambda o: (o < first) | (o >= end), s)
        if self.hi_v is not None:
            hi_v, hi_drop = self.hi_v, self.hi_drop
            if hi_v == 0:
                chunk.zero_()  # the top k_drop holds every nonzero entry
                return
            start, stop = (self.hi_start[c], self.hi_start[c + 1]) if hi_drop else (0, 0)
            # chunk - hardshrink(chunk, lambd) zeros |x| > lambd and leaves the rest exactly
            lambd = float32_below(hi_v) if stop > start and stop <= hi_drop else hi_v
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
    with ws.single_threaded():
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


# (delta row, model index, workspace) -> a Band still to apply to that row, or None (already sparsified)
Sparsifier = Callable[[Tensor, int, Workspace], "Band | None"]


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
