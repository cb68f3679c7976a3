"""Karcher mean: the Riemannian (Frechet) mean of the models' directions on the unit sphere."""

from __future__ import annotations

import torch
from torch import Tensor

from transfuse.methods.context import MethodContext
from transfuse.methods.registry import ParamSpec, register

MAX_ITER = ParamSpec(
    "max_iter",
    int,
    10,
    "Riemannian gradient steps (0 = the normalized Euclidean mean of the directions)",
    low=0,
)
TOL = ParamSpec(
    "tol",
    float,
    1e-5,
    "stop when the tangent step is shorter than this; norms at or below it count as zero tensors",
    low=0.0,
)


def karcher_mean(points: list[Tensor], max_iter: int, tol: float) -> Tensor:
    """The equally weighted Karcher mean of ``points`` (tensors of one shape), scaled by their mean norm.

    u_i = x_i / |x_i| (points with |x_i| <= tol are left out of the directions; all of them: zero);
    mu_0 = normalize(mean_i u_i) (u_1 if that mean is shorter than tol); then up to ``max_iter`` times
    v = mean_i theta_i / sin(theta_i) (u_i - cos(theta_i) mu), theta_i = acos(<mu, u_i>) (terms with
    theta_i < tol skipped), mu <- cos|v| mu + sin|v| v/|v| (renormalized), stopping when |v| < tol.
    Result: ``mean_i |x_i| * mu`` (the mean norm over all points, zero ones included).  MergeKit 0.1.5's
    ``karcher_merge_tensors`` with equal weights, step for step.
    """
    n = len(points)
    if n == 1:
        return points[0]
    alpha = 1.0 / n
    norms = [torch.linalg.vector_norm(p) for p in points]
    valid = [(p / m) for p, m in zip(points, norms) if m.item() > tol]
    if not valid:
        return torch.zeros_like(points[0])
    share = alpha / (alpha * len(valid))
    mean = torch.zeros_like(valid[0])
    for unit in valid:
        mean += share * unit
    mean_norm = torch.linalg.vector_norm(mean)
    mean = valid[0].clone() if mean_norm.item() < tol else mean / mean_norm
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for unit in valid:
            dot = torch.clamp(torch.dot(mean.reshape(-1), unit.reshape(-1)), -1.0, 1.0)
            theta = torch.arccos(dot)
            if theta.item() < tol:
                continue
            tangent += share * (theta / torch.sin(theta)) * (unit - dot * mean)
        step = torch.linalg.vector_norm(tangent)
        if step.item() < tol:
            break
        mean = torch.cos(step) * mean + torch.sin(step) * (tangent / step)
        length = torch.linalg.vector_norm(mean)
        if length.item() > tol:
            mean = mean / length
    scale = sum(alpha * m for m in norms)
    return scale * mean


@register(
    "karcher",
    params=(MAX_ITER, TOL),
    paper="Karcher, 'Riemannian center of mass and mollifier smoothing', Comm. Pure Appl. Math. 1977; for model "
    "merging: arXiv:2603.04972 (MergeKit's reference)",
    min_models=1,
    needs_base=False,
    base_optional=True,
    mergekit_name="karcher",
)
def karcher(
    base: Tensor,
    deltas: Tensor,
    weights: Tensor,
    *,
    max_iter: int,
    tol: float,
    ctx: MethodContext = MethodContext(),
) -> Tensor:
    """Karcher mean of the models (and the base, if any) on the unit sphere, scaled by their mean norm.

    The models are ``theta_i = base + delta_i``; the points are ``[theta_1..theta_K, theta_0]`` with a base
    (``ctx.has_base``: MergeKit 0.1.5 averages a ``base_model`` in as one more, equally weighted point, last;
    the order only moves rounding) and ``[theta_1..theta_K]`` without (the engine then passes model 1 as ``base``, so ``theta_1 = base``).  The
    result is ``karcher_mean(points)``: the direction ``mu`` minimizing ``sum_i d(mu, x_i/|x_i|)^2`` (geodesic
    distance on the sphere, found by at most ``max_iter`` Riemannian gradient steps), times ``mean_i |x_i|``.
    ``weights`` are ignored (equal weights), as in MergeKit.

    Karcher, Comm. Pure Appl. Math. 30 (1977); arXiv:2603.04972.  MergeKit: ``karcher``.
    """
    compute = torch.float64 if base.dtype == torch.float64 else torch.float32
    points = [(base + d).to(compute) for d in deltas]
    if ctx.has_base:
        points.append(base.to(compute))
    return karcher_mean(points, max_iter, tol).reshape(base.shape)
