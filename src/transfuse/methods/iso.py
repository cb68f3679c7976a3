"""Isotropic merging (Iso-C, Iso-CTS): flatten the singular spectrum of the merged task matrix."""

from __future__ import annotations

import torch
from torch import Tensor

from transfuse.methods._linalg import (
    SVD_DTYPES,
    mean_delta,
    polar_factor,
    rank_tolerance,
    resolve_dtype,
    scale_by_weights,
    svd,
)
from transfuse.methods.registry import ParamSpec, register

_PAPER = (
    "Marczak, Magistri, Cygert, Twardowski, Bagdanov & van de Weijer, 'No Task Left Behind: Isotropic Model "
    "Merging with Common and Task-Specific Subspaces', ICML 2025"
)
_ALPHA = ParamSpec(
    "alpha",
    float,
    1.0,
    "scale of the merged task matrix added to the base (the paper tunes it on validation data)",
)
_SVD_DTYPE = ParamSpec(
    "svd_dtype",
    str,
    "float32",
    "precision of the SVDs (float64 is slower, rarely needed)",
    choices=tuple(SVD_DTYPES),
)


@register("iso_c", params=(_ALPHA, _SVD_DTYPE), paper=_PAPER, min_models=1, output_scale="alpha")
def iso_c(
    base: Tensor, deltas: Tensor, weights: Tensor, *, alpha: float = 1.0, svd_dtype: str = "float32"
) -> Tensor:
    """Iso-C: ``base + alpha * sigma_bar * U V^T`` where ``U S V^T = sum_t tau_t`` and ``sigma_bar = mean(S)``.

    ``tau_t = weight_t * delta_t``.  The task-arithmetic sum keeps its singular vectors but gets an isotropic
    (flat) spectrum with the same nuclear norm.  Non-2-D tensors get the mean task vector, as the
    official code (github.com/danielm1405/iso-merging) does.  Marczak et al., "No Task Left Behind: Isotropic
    Model Merging with Common and Task-Specific Subspaces", ICML 2025.

    Departure: singular values ``<= max(m, n) * eps * sigma_max`` count as zero, and the mean and the
    directions run over the nonzero ones only.  The official code also spreads the mean over directions LAPACK
    completes arbitrarily when the sum is rank-deficient (e.g. sums of LoRA updates); for full-rank sums the
    two agree.
    """
    tau = scale_by_weights(deltas, weights)
    if base.dim() != 2:
        return base + alpha * mean_delta(tau)
    if base.numel() == 0:
        return base.clone()
    u, s, vh = svd(tau.sum(dim=0), resolve_dtype(svd_dtype))
    keep = s > rank_tolerance(s[0], tuple(base.shape))
    if not bool(keep.any()):  # the task vectors cancel (or are all zero) here
        return base.clone()
    sigma_bar = s[keep].mean()
    merged = sigma_bar * (u[:, keep] @ vh[keep])
    return base + alpha * merged.to(base.dtype)


def _split(rank: int, k: int, fraction: float) -> tuple[int, int]:
    """(common size, per-task size): the official rounding, so that ``common + k * per_task == rank``."""
    common = int(rank * fraction)
    share = (rank - common) / k
    per_task = round(share)  # Python's round, as the official code
    if per_task * k > rank:  # only for tiny fractions; the official code would index with a negative size
        per_task = int(share)
    return rank - per_task * k, per_task


@register(
    "iso_cts",
    output_scale="alpha",
    params=(
        _ALPHA,
        ParamSpec(
            "common_space_fraction",
            float,
            0.8,
            "share of the rank given to the common subspace (top singular vectors of the sum)",
            low=0.0,
            high=1.0,
        ),
        _SVD_DTYPE,
    ),
    paper=_PAPER,
    min_models=1,
)
def iso_cts(
    base: Tensor,
    deltas: Tensor,
    weights: Tensor,
    *,
    alpha: float = 1.0,
    common_space_fraction: float = 0.8,
    svd_dtype: str = "float32",
) -> Tensor:
    """Iso-CTS: ``base + alpha * sigma_bar * polar(U) polar(V^T)`` over common and task-specific subspaces.

    With ``tau_t = weight_t * delta_t``, ``M = sum_t tau_t = U S V^T`` and ``r = min(m, n)``: the common
    subspace is the top ``c`` triplets of ``M`` (``c ~ common_space_fraction * r``, rounded so that the rest
    splits evenly); each task contributes the top ``(r - c) / K`` triplets of its residual
    ``tau_t - U_c U_c^T tau_t``.  The concatenated ``U`` and ``V^T`` are orthogonalized (``polar(X) = P Q^T``
    from ``X = P Sigma Q^T``) and every singular value is replaced by the mean ``sigma_bar`` of the selected
    ones.  Non-2-D tensors get the mean task vector, as the official code does.  Marczak et al.,
    "No Task Left Behind: Isotropic Model Merging with Common and Task-Specific Subspaces", ICML 2025.

    Departure: numerically-zero singular values (``<= max(m, n) * eps * sigma_max``) and their arbitrary
    LAPACK directions are left out of the subspaces and of the mean; for full-rank inputs nothing changes.
    """
    tau = scale_by_weights(deltas, weights)
    if base.dim() != 2:
        return base + alpha * mean_delta(tau)
    if base.numel() == 0:
        return base.clone()
    k = tau.shape[0]
    shape = tuple(base.shape)
    dtype = resolve_dtype(svd_dtype)
    common, per_task = _split(min(shape), k, common_space_fraction)

    u, s, vh = svd(tau.sum(dim=0), dtype)
    scale = s[0]
    keep = s[:common] > rank_tolerance(scale, shape)
    us, ss, vhs = [u[:, :common][:, keep]], [s[:common][keep]], [vh[:common][keep]]
    u_common = us[0]
    if per_task > 0:
        for t in range(k):
            task = tau[t].to(dtype)
            residual = task - u_common @ (u_common.T @ task)
            ut, st, vht = svd(residual, dtype)
            # Relative to the layer's scale too, so a task lying inside the common subspace adds no noise.
            tol = rank_tolerance(torch.maximum(scale, st[0]), shape)
            j = min(per_task, int((st > tol).sum()))
            us.append(ut[:, :j])
            ss.append(st[:j])
            vhs.append(vht[:j])
    s_all = torch.cat(ss)
    if s_all.numel() == 0:
        return base.clone()
    sigma_bar = s_all.mean()
    u_orth = polar_factor(torch.cat(us, dim=1), dtype)
    vh_orth = polar_factor(torch.cat(vhs, dim=0), dtype)
    merged = sigma_bar * (u_orth @ vh_orth)
    return base + alpha * merged.to(base.dtype)
