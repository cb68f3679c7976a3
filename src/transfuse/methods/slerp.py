"""SLERP: spherical linear interpolation between the base and one fine-tuned model."""

from __future__ import annotations

import torch
from torch import Tensor

from transfuse.errors import RecipeError
from transfuse.methods.registry import ParamSpec, register

# MergeKit 0.1.5's constants: above this |cos| the two tensors are treated as colinear (or antipodal) and
# interpolated linearly, since sin(theta) -> 0 makes the spherical coefficients ill-conditioned; norms at or
# below _EPS are not divided by (a zero tensor has no direction).
_DOT_THRESHOLD = 0.9995
_EPS = 1e-8


@register(
    "slerp",
    params=(
        ParamSpec(
            "t",
            float,
            None,
            "interpolation factor: 0 = the base, 1 = the other model (may vary per layer via a gradient)",
        ),
    ),
    paper="Shoemake, 'Animating rotation with quaternion curves', SIGGRAPH 1985 (as used by MergeKit)",
    min_models=1,
    max_models=1,
    mergekit_name="slerp",
)
def slerp(base: Tensor, deltas: Tensor, weights: Tensor, *, t: float) -> Tensor:
    """SLERP of the whole tensor from ``v0 = base`` to ``v1 = base + delta``.

    ``cos = <v0/|v0|, v1/|v1|>`` (clamped to [-1, 1]; a norm <= 1e-8 is not divided by), ``theta = acos(cos)``;
    the result is ``sin((1-t) theta)/sin(theta) * v0 + sin(t theta)/sin(theta) * v1`` applied to the
    *unnormalized* tensors, and ``(1-t) v0 + t v1`` when ``|cos| > 0.9995``.  Shoemake, SIGGRAPH 1985, in
    MergeKit 0.1.5's form (``merge_methods/slerp.py``), whose results this matches.  ``weights`` are ignored,
    as in MergeKit.
    """
    if deltas.shape[0] != 1:
        raise RecipeError(f"slerp takes exactly one model besides the base, got {deltas.shape[0]}")
    compute = torch.float64 if base.dtype == torch.float64 else torch.float32
    v0 = base.reshape(-1).to(compute)
    v1 = (base + deltas[0]).reshape(-1).to(compute)
    if v0.numel() == 0:
        return v1.reshape(base.shape)

    n0 = torch.linalg.vector_norm(v0)
    n1 = torch.linalg.vector_norm(v1)
    n0 = torch.where(n0 > _EPS, n0, 1.0)
    n1 = torch.where(n1 > _EPS, n1, 1.0)
    # Normalize before the dot product so huge tensors cannot overflow it.
    cos = ((v0 / n0) * (v1 / n1)).sum().clamp(-1.0, 1.0)
    t_ = torch.tensor(t, dtype=compute, device=base.device)
    linear = cos.abs() > _DOT_THRESHOLD
    # acos(0) on the linear branch keeps sin(theta) away from 0 there (torch.where evaluates both branches).
    theta = torch.acos(torch.where(linear, 0.0, cos))
    sin_theta = torch.sin(theta)
    a = torch.where(linear, 1 - t_, torch.sin((1 - t_) * theta) / sin_theta)
    b = torch.where(linear, t_, torch.sin(t_ * theta) / sin_theta)
    return (a * v0 + b * v1).reshape(base.shape)
