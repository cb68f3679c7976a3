"""Model Stock: interpolate between the base and the average of the fine-tunes by their mutual angle."""

from __future__ import annotations

import torch
from torch import Tensor

from transfuse.errors import RecipeError
from transfuse.methods.registry import ParamSpec, register

# MergeKit's guards, kept identical for parity: the norm product is floored at 1e-6, and a denominator
# 1 + (K-1) cos within 1e-6 of zero (no finite estimate) keeps the base for that filter.
_NORM_FLOOR = 1e-6
_SINGULAR = 1e-6


@register(
    "model_stock",
    params=(
        ParamSpec(
            "filter_wise",
            bool,
            False,
            "compute the angle and ratio per row (last axis) instead of over the whole tensor",
        ),
    ),
    paper="Jang, Yun & Han, 'Model Stock: All we need is just a few fine-tuned models', ECCV 2024",
    min_models=2,
    mergekit_name="model_stock",
)
def model_stock(base: Tensor, deltas: Tensor, weights: Tensor, *, filter_wise: bool = False) -> Tensor:
    """Model Stock: ``base + t * mean_k(delta_k)`` with ``t = K cos / (1 + (K-1) cos)``.

    ``cos`` is the mean pairwise cosine between the task vectors ``delta_k = theta_k - theta_0`` (over the
    flattened tensor, or per row of the last axis with ``filter_wise``), clamped to [-1, 1]; the interpolation
    ratio of Jang et al., "Model Stock: All we need is just a few fine-tuned models", ECCV 2024,
    i.e. ``t = 2 cos / (1 + cos)`` for two models.  Where ``|1 + (K-1) cos| < 1e-6`` the base is kept.

    Semantics follow MergeKit 0.1.5's ``model_stock`` (including ``filter_wise`` on 1-D tensors acting like the
    whole-tensor mode).  ``weights`` are ignored, as in MergeKit: the ratio is geometric, not user-set.
    """
    k = deltas.shape[0]
    if k < 2:
        raise RecipeError(
            f"model_stock needs at least 2 fine-tuned models, got {k}; add a model or use linear"
        )
    shape = base.shape
    if filter_wise:
        # Rows along the last axis; a scalar or vector is one row (MergeKit unsqueezes 1-D tensors).
        rows = deltas.reshape(k, 1, -1) if base.dim() <= 1 else deltas
    else:
        rows = deltas.reshape(k, -1)

    norms = torch.linalg.vector_norm(rows, dim=-1)  # [K, *rows]
    total = torch.zeros_like(norms[0])
    for i in range(k):
        for j in range(i + 1, k):
            dot = (rows[i] * rows[j]).sum(dim=-1)
            total += (dot / (norms[i] * norms[j]).clamp(min=_NORM_FLOOR)).clamp(-1.0, 1.0)
    cos = (total / (k * (k - 1) // 2)).unsqueeze(-1)
    denominator = 1 + (k - 1) * cos
    singular = denominator.abs() < _SINGULAR
    t = torch.where(singular, torch.zeros_like(cos), k * cos / torch.where(singular, 1.0, denominator))

    # Same association as MergeKit (t * average of the fine-tuned weights + (1 - t) * base) so rounding agrees.
    base_rows = base.reshape(rows.shape[1:])
    average = rows[0] + base_rows
    for i in range(1, k):
        average += rows[i] + base_rows
    average /= k
    return (t * average + (1 - t) * base_rows).reshape(shape)
