"""MagMax: per entry, the task-vector value of largest magnitude."""

from __future__ import annotations

import torch
from torch import Tensor

from transfuse.chunks import Scratch
from transfuse.methods._params import LAMBDA
from transfuse.methods.context import MethodContext
from transfuse.methods.registry import register


@register(
    "magmax",
    params=(LAMBDA,),
    paper="Marczak et al., MagMax: Leveraging Model Merging for Seamless Continual Learning, ECCV 2024 "
    "(arXiv:2407.06322)",
)
def magmax(base: Tensor, deltas: Tensor, weights: Tensor, *, lambda_: float, ctx: MethodContext) -> Tensor:
    """MagMax: merged = base + lambda * v, v[j] = w_i tau_i[j] for the i maximising |w_i tau_i[j]|.

    Weights scale each task vector before the selection (default 1 = the paper); weight 0 removes a model,
    a negative weight subtracts its task vector where it wins.  Equal magnitudes: the lowest model index.

    Marczak et al., "MagMax: Leveraging Model Merging for Seamless Continual Learning", ECCV 2024.
    Not in MergeKit.
    """
    k = deltas.shape[0]
    n = base.numel()
    rows = deltas.reshape(k, n)  # a view when contiguous; a copy is fine otherwise (we only read it)
    weight_list = weights.to(torch.float32).tolist()
    merged = torch.empty(n, dtype=torch.float32, device=base.device)
    base_flat = base.reshape(-1)

    def select(c: int, start: int, stop: int, s: Scratch) -> None:
        size = stop - start
        out = torch.mul(rows[0, start:stop], weight_list[0], out=merged[start:stop])
        best = torch.abs(out, out=s.a[:size])
        for i in range(1, k):
            candidate = rows[i, start:stop].mul_(weight_list[i])
            magnitude = torch.abs(candidate, out=s.b[:size])
            better = torch.gt(magnitude, best, out=s.c[:size])  # 1.0/0.0; strict: a tie keeps the earlier
            torch.maximum(best, magnitude, out=best)
            # out*(1-m) + candidate*m selects exactly (x*1 + y*0 = x for finite values); float ops only
            out.mul_(better.neg().add_(1)).addcmul_(candidate, better)
        if lambda_ != 1:
            out.mul_(lambda_)
        out.add_(base_flat[start:stop])

    ctx.workspace(base).map(select)
    return merged.reshape(base.shape)
