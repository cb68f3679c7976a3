"""TSV-Merge: low-rank task singular vectors, decorrelated across tasks before summing."""

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


@register(
    "tsv",
    output_scale="alpha",
    params=(
        ParamSpec("alpha", float, 1.0, "scale of the merged task matrix added to the base (TSV-M uses 1.0)"),
        ParamSpec(
            "svd_dtype",
            str,
            "float32",
            "precision of the SVDs (float64 is slower, rarely needed)",
            choices=tuple(SVD_DTYPES),
        ),
    ),
    paper=(
        "Gargiulo, Crisostomi, Bucarelli, Scardapane, Silvestri & Rodolà, 'Task Singular Vectors: Reducing "
        "Task Interference in Model Merging', CVPR 2025"
    ),
    min_models=1,
)
def tsv(
    base: Tensor, deltas: Tensor, weights: Tensor, *, alpha: float = 1.0, svd_dtype: str = "float32"
) -> Tensor:
    """TSV-Merge: ``base + alpha * polar(U) diag(S) polar(V^T)``.

    For a 2-D tensor and task matrices ``tau_t = weight_t * delta_t = U_t S_t V_t^T`` (``K`` tasks, rank bound
    ``r = min(m, n)``), keep each task's top ``max(1, int(r / K))`` singular triplets, concatenate them
    (``U = [U_1 .. U_K]``, ``S``, ``V^T = [V_1^T; ..; V_K^T]``) and replace ``U`` and ``V^T`` by their closest
    (semi-)orthogonal matrices ``polar(X) = P Q^T`` from ``X = P Sigma Q^T`` (the "TSV-M" variant).
    Other tensors (biases, norms, scalars, conv kernels) get the mean task vector, as the official code
    (github.com/AntoAndGar/task_singular_vectors) does.  Gargiulo et al., "Task Singular Vectors: Reducing Task
    Interference in Model Merging", CVPR 2025.

    Departures: at least one triplet per task (the official ``int(r / K)`` keeps none when ``r < K``), and
    numerically-zero singular values (``<= max(m, n) * eps * sigma_max``) are dropped instead of contributing
    LAPACK's arbitrary singular vectors; both are no-ops for generic full-rank task matrices.
    """
    tau = scale_by_weights(deltas, weights)
    if base.dim() != 2:
        return base + alpha * mean_delta(tau)
    k = tau.shape[0]
    m, n = base.shape
    rank = min(m, n)
    if rank == 0:
        return base.clone()
    dtype = resolve_dtype(svd_dtype)
    per_task = max(1, int(rank * (1.0 / k)))  # the official int(r * sv_reduction), sv_reduction = 1/K

    us, ss, vhs = [], [], []
    for t in range(k):
        u, s, vh = svd(tau[t], dtype)
        nonzero = int((s > rank_tolerance(s[0], (m, n))).sum())
        j = min(per_task, nonzero)
        us.append(u[:, :j])
        ss.append(s[:j])
        vhs.append(vh[:j])
    s_all = torch.cat(ss)
    if s_all.numel() == 0:  # every task vector is zero here
        return base.clone()
    u_orth = polar_factor(torch.cat(us, dim=1), dtype)
    vh_orth = polar_factor(torch.cat(vhs, dim=0), dtype)
    merged = (u_orth * s_all) @ vh_orth
    return base + alpha * merged.to(base.dtype)
