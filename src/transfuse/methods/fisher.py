"""Fisher merging: each parameter the models' average weighted by their diagonal Fisher information."""

from __future__ import annotations

import torch
from torch import Tensor

from transfuse.errors import ParameterError
from transfuse.methods._weighted_mean import weighted_mean_delta
from transfuse.methods.context import MethodContext
from transfuse.methods.registry import ParamSpec, register


@register(
    "fisher",
    params=(
        ParamSpec(
            "epsilon",
            float,
            1e-6,
            "added to every Fisher entry, relative to the tensor's mean Fisher (keeps entries no model is "
            "sensitive to at the weighted mean)",
            low=0.0,
        ),
    ),
    paper="Matena & Raffel, 'Merging Models with Fisher-Weighted Averaging', NeurIPS 2022",
    family="needs-statistics",
    needs=("fisher",),
    fallback="the weighted mean of the task vectors (tensors without a Fisher, e.g. buffers)",
)
def fisher(
    base: Tensor, deltas: Tensor, weights: Tensor, *, epsilon: float = 1e-6, ctx: MethodContext
) -> Tensor:
    """Fisher merging: ``theta* = sum_i w_i F_i theta_i / sum_i w_i F_i``, entry by entry.

    ``F_i`` is model ``i``'s diagonal Fisher information (statistic ``fisher``, the tensor's shape; see
    ``transfuse statistics``), each entry raised by ``epsilon * mean(F)`` (the mean over the models and
    entries of this tensor) so that entries no model is sensitive to fall back to the weighted mean.  With
    ``theta_i = base + tau_i`` this is ``base + sum_i w_i F_i tau_i / sum_i w_i F_i``.  Tensors without a
    Fisher get the weighted mean of the task vectors.  Matena & Raffel, "Merging Models with
    Fisher-Weighted Averaging", NeurIPS 2022 (their Eq. 3 with the per-model scalars ``lambda_i = w_i``).
    """
    information = ctx.statistics.get("fisher")
    if information is None:
        return base + weighted_mean_delta(deltas, weights, "fisher").to(base.dtype)
    if tuple(information.shape) != tuple(deltas.shape):
        raise ParameterError(
            f"tensor {ctx.name!r}: Fisher of shape {list(information.shape)} for task vectors of shape "
            f"{list(deltas.shape)}"
        )
    w = weights.to(device=deltas.device, dtype=torch.float32)
    if float(w.sum()) == 0.0:
        raise ParameterError("fisher: the model weights sum to 0; give weights with a nonzero sum")
    f = information.float()
    floor = epsilon * float(f.mean()) if f.numel() else 0.0
    shape = (-1,) + (1,) * (deltas.dim() - 1)
    weighted = (f + floor) * w.reshape(shape)  # [K, *shape]
    total = weighted.sum(0)
    numerator = (weighted * deltas.float()).sum(0)
    zero = total == 0  # no model sensitive and no floor (all-zero Fisher with epsilon 0)
    merged_delta = torch.where(
        zero, weighted_mean_delta(deltas, weights, "fisher"), numerator / total.where(~zero, 1.0)
    )
    return base + merged_delta.to(base.dtype)
