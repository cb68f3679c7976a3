"""The weighted mean of task vectors, the fallback of statistics-based methods for tensors without statistics."""

from __future__ import annotations

import torch
from torch import Tensor

from transfuse.errors import ParameterError


def weighted_mean_delta(deltas: Tensor, weights: Tensor, method: str) -> Tensor:
    """``sum_i w_i delta_i / sum_i w_i`` in float32; ``ParameterError`` when the weights sum to 0."""
    w = weights.to(device=deltas.device, dtype=torch.float32)
    total = float(w.sum())
    if total == 0.0:
        raise ParameterError(f"{method}: the model weights sum to 0; give weights with a nonzero sum")
    shape = (-1,) + (1,) * (deltas.dim() - 1)
    return (deltas.float() * w.reshape(shape)).sum(0) / total
