"""Multi-SLERP: barycentric interpolation of several task vectors on the hypersphere."""

from __future__ import annotations

import torch
from torch import Tensor

from transfuse.errors import ParameterError
from transfuse.methods.context import MethodContext
from transfuse.methods.registry import ParamSpec, register

NORMALIZE_WEIGHTS = ParamSpec("normalize_weights", bool, True, "divide the weights by their sum")
EPS = ParamSpec(
    "eps",
    float,
    1e-8,
    "added to each norm before dividing; a weighted mean direction shorter than this is degenerate",
    low=0.0,
)


def _weights_sum(global_params: dict, per_model: dict) -> str | None:
    weights = per_model.get("weight", ())
    if global_params.get("normalize_weights", True) and len(weights) > 1 and sum(weights) == 0:
        return "normalize_weights would divide by the weights' sum, which is 0; change the weights"
    if global_params.get("eps", 1e-8) <= 0:
        return "eps must be > 0 (a zero task vector would divide 0 by 0)"
    return None


@register(
    "multislerp",
    params=(NORMALIZE_WEIGHTS, EPS),
    paper="Goddard, 'Multi-SLERP', https://goddard.blog/posts/multislerp-wow-what-a-cool-idea (tangent-space "
    "barycentric interpolation on the sphere, as in Buss & Fillmore, ACM TOG 2001)",
    min_models=1,
    needs_base=False,
    base_optional=True,
    check=_weights_sum,
    mergekit_name="multislerp",
)
def multislerp(
    base: Tensor,
    deltas: Tensor,
    weights: Tensor,
    *,
    normalize_weights: bool,
    eps: float,
    ctx: MethodContext = MethodContext(),
) -> Tensor:
    """Multi-SLERP of the task vectors (or, without a base, of the models around the origin): interpolate their
    directions in the tangent space at the weighted mean direction, map back to the sphere, scale by the
    weighted mean norm.

    The points x_i are the task vectors delta_i with a base (``ctx.has_base``), else the models
    theta_i = base + delta_i (the engine passes model 1 as ``base`` then).
    w <- w / sum(w) if ``normalize_weights``; u_i = x_i / (|x_i| + eps); m = sum_i w_i u_i, mu = m/|m|;
    v = sum_i w_i (u_i - <u_i, mu> mu) (tangent vectors at mu); r = |v| + eps;
    S = (sum_i w_i |x_i|) (cos(r) mu + sin(r) v / r); merged = base + S with a base, S without.
    One model: that model; every point zero (with a base: a tensor no model changed): the base.  |m| < eps
    otherwise (opposite directions whose weights cancel): two points are averaged linearly
    (w_1 x_1 + w_2 x_2, plus the base if any), more raise ``ParameterError``.  MergeKit 0.1.5's
    ``multislerp``, with and without a ``base_model``, whose results this matches.

    MergeKit: ``multislerp``.
    """
    k = deltas.shape[0]
    if k == 1:
        return base + deltas[0]
    points = deltas if ctx.has_base else base + deltas
    origin = base if ctx.has_base else torch.zeros_like(base)
    flat = points.reshape(k, -1)
    w = weights.to(flat.dtype)
    if normalize_weights:
        w = w / w.sum()
    norms = torch.linalg.vector_norm(flat, dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * w[:, None]).sum(0)
    mean_norm = torch.linalg.vector_norm(mean)
    if not bool(norms.any()):  # every point zero (no model changed it, with a base); MergeKit raises, K >= 3
        return origin.clone()
    if mean_norm < eps:
        if k == 2:
            return origin + (points[0] * w[0] + points[1] * w[1])
        raise ParameterError(
            "multislerp: the weighted mean direction of the points is zero (opposite task vectors or models "
            "whose weights cancel); change the weights"
        )
    mean = mean / mean_norm
    tangents = units - (units * mean).sum(-1, keepdim=True) * mean
    tangent = (tangents * w[:, None]).sum(0)
    length = torch.linalg.vector_norm(tangent) + eps
    out = mean * torch.cos(length) + tangent * (torch.sin(length) / length)
    out = (out * (norms.squeeze(-1) * w).sum()).reshape(base.shape)
    return base + out if ctx.has_base else out
