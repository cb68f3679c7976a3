"""NuSLERP: spherical interpolation of two task vectors, whole-tensor or per row/column."""

from __future__ import annotations

import torch
from torch import Tensor

from transfuse.methods._params import per_model_values
from transfuse.methods.context import MethodContext
from transfuse.methods.registry import ParamSpec, register

ROW_WISE = ParamSpec(
    "nuslerp_row_wise",
    bool,
    False,
    "with nuslerp_flatten false: interpolate the columns (vectors along dim 0) instead of the rows (last dim)",
)
FLATTEN = ParamSpec(
    "nuslerp_flatten",
    bool,
    True,
    "interpolate the whole tensor as one vector (false: row by row, see row_wise)",
)

# MergeKit 0.1.5's constants: norms are clamped at _NORM_FLOOR before dividing; vectors with
# 1 - cos^2 <= _EPS^2 are colinear (or antipodal) and interpolated linearly.
_NORM_FLOOR = 1e-7
_EPS = 1e-8


def slerp_vectors(t: float, v0: Tensor, v1: Tensor, *, dim: int = -1, flatten: bool = False) -> Tensor:
    """SLERP from ``v0`` to ``v1`` at ``t`` along ``dim`` (each slice is one vector; ``flatten``: the whole
    tensor is one vector), on the unnormalized vectors.

    cos = <v0/max(|v0|, 1e-7), v1/max(|v1|, 1e-7)> clamped to [-1, 1], theta = acos(cos);
    (sin((1-t) theta) v0 + sin(t theta) v1) / sin(theta), or (1-t) v0 + t v1 where 1 - cos^2 <= 1e-16.
    """
    shape = v0.shape
    if flatten or v0.dim() == 0:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif dim != -1:
        v0, v1 = v0.transpose(dim, -1), v1.transpose(dim, -1)
    u0 = v0 / torch.linalg.vector_norm(v0, dim=-1, keepdim=True).clamp(min=_NORM_FLOOR)
    u1 = v1 / torch.linalg.vector_norm(v1, dim=-1, keepdim=True).clamp(min=_NORM_FLOOR)
    cos = (u0 * u1).sum(dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= _EPS**2
    theta = torch.acos(torch.where(colinear, 0, cos))  # acos(0) keeps sin(theta) away from 0 on that branch
    out = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    out = torch.where(colinear, (1 - t) * v0 + t * v1, out)
    if dim != -1 and not flatten and out.dim() > 0:
        out = out.transpose(dim, -1)
    return out.reshape(shape)


def _flatten_or_rows(global_params: dict, per_model: dict) -> str | None:
    if global_params.get("nuslerp_row_wise") and global_params.get("nuslerp_flatten", True):
        return (
            "nuslerp_row_wise: true has no effect with nuslerp_flatten: true (a flattened tensor has no rows); "
            "set nuslerp_flatten: false"
        )
    return None


@register(
    "nuslerp",
    params=(ROW_WISE, FLATTEN),
    paper="Shoemake, 'Animating rotation with quaternion curves', SIGGRAPH 1985; NuSLERP as defined by "
    "MergeKit (Goddard et al., EMNLP 2024 Industry, arXiv:2403.13257)",
    min_models=2,
    max_models=2,
    check=_flatten_or_rows,
    needs_base=False,
    base_optional=True,
    mergekit_name="nuslerp",
)
def nuslerp(
    base: Tensor,
    deltas: Tensor,
    weights: Tensor,
    *,
    nuslerp_row_wise: bool,
    nuslerp_flatten: bool,
    ctx: MethodContext = MethodContext(),
) -> Tensor:
    """NuSLERP: SLERP between the two task vectors (or, without a base, the two models), ``t`` from the weights.

    t = w_2 / (w_1 + w_2)  (0.5 when |w_1 + w_2| < 1e-6);
    with a base (``ctx.has_base``): merged = base + slerp_vectors(t, delta_1, delta_2); without one (the
    engine then passes model 1 as ``base``, so the models are theta_i = base + delta_i):
    merged = slerp_vectors(t, theta_1, theta_2).  Over the whole tensor (``nuslerp_flatten``, default), or per
    row (each slice along the last dim), or per column (``nuslerp_row_wise``: slices along dim 0).  So ``t = 0``
    (w_2 = 0) gives model 1 and ``t = 1`` model 2.  MergeKit 0.1.5's ``nuslerp``, with and without a
    ``base_model``, whose results this matches.

    Shoemake, SIGGRAPH 1985.  MergeKit: ``nuslerp``.
    """
    w1, w2 = per_model_values(weights)
    total = w1 + w2
    t = 0.5 if abs(total) < 1e-6 else w2 / total
    dim = 0 if nuslerp_row_wise else -1
    if not ctx.has_base:
        return slerp_vectors(t, base + deltas[0], base + deltas[1], dim=dim, flatten=nuslerp_flatten)
    return base + slerp_vectors(t, deltas[0], deltas[1], dim=dim, flatten=nuslerp_flatten)
