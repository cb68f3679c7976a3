"""Linear merge (model soup): the weighted average of the models."""

from __future__ import annotations

import torch
from torch import Tensor

from transfuse.chunks import Scratch
from transfuse.errors import ParameterError
from transfuse.methods._params import INT8_MASK, NORMALIZE_TRUE
from transfuse.methods.context import MethodContext
from transfuse.methods.registry import register


@register(
    "linear",
    params=(NORMALIZE_TRUE, INT8_MASK),
    paper="Wortsman et al., Model soups, ICML 2022 (arXiv:2203.05482)",
    needs_base=False,
    mergekit_name="linear",
)
def linear(base: Tensor, deltas: Tensor, weights: Tensor, *, normalize: bool, ctx: MethodContext) -> Tensor:
    """Weighted average of the models: sum_i w_i theta_i / sum_i w_i (no division if normalize is false).

    With ``theta_i = base + delta_i`` this is computed as ``base * sum(w) + sum_i w_i delta_i`` (divided by
    ``sum(w)``), so the result does not depend on which tensor the engine used as ``base``.  Overwrites
    ``deltas`` (the result is a view of its first row).  ``int8_mask`` is accepted (inert) because MergeKit's
    evolutionary merge writes it into the ``linear`` recipes it produces; MergeKit's linear ignores it too.

    Wortsman et al., "Model soups: averaging weights of multiple fine-tuned models improves accuracy
    without increasing inference time", ICML 2022.  MergeKit: ``linear``.
    """
    weights = weights.to(torch.float32)
    total = float(weights.sum())
    if normalize and total == 0.0:
        raise ParameterError(
            "linear: the model weights sum to 0, so normalize would divide by zero; "
            "change the weights or set normalize: false"
        )
    k = deltas.shape[0]
    n = base.numel()
    rows = deltas.reshape(k, n)
    base_flat = base.reshape(-1)
    merged = rows[0]  # overwritten chunk by chunk: a fresh buffer would page-fault on every first write
    weight_list = weights.tolist()

    def combine(c: int, start: int, stop: int, s: Scratch) -> None:
        out = merged[start:stop]
        scaled_base = torch.mul(base_flat[start:stop], total, out=s.a[: stop - start])
        torch.add(scaled_base, out, alpha=weight_list[0], out=out)
        for i in range(1, k):
            out.add_(rows[i, start:stop], alpha=weight_list[i])
        if normalize:
            out.div_(total)

    ctx.workspace(base).map(combine)
    return merged.reshape(base.shape)
