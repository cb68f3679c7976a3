"""Model Breadcrumbs: drop the smallest entries and the largest outliers of each task vector."""

from __future__ import annotations

from torch import Tensor

from transfuse.methods._combine import merge_task_vectors
from transfuse.methods._params import (
    DENSITY,
    GAMMA,
    INT8_MASK,
    LAMBDA,
    NORMALIZE_FALSE,
    RESCALE_FALSE,
    SIGN_ELECTION,
)
from transfuse.methods._sparsifiers import sparsifier_for
from transfuse.methods.context import MethodContext
from transfuse.methods.registry import register

_PAPER = (
    "Davari & Belilovsky, Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse Masks, "
    "ECCV 2024 (arXiv:2312.06795)"
)


@register(
    "breadcrumbs",
    params=(DENSITY, GAMMA, NORMALIZE_FALSE, RESCALE_FALSE, LAMBDA, INT8_MASK),
    paper=_PAPER,
    mergekit_name="breadcrumbs",
)
def breadcrumbs(
    base: Tensor,
    deltas: Tensor,
    weights: Tensor,
    *,
    density: Tensor,
    gamma: Tensor,
    normalize: bool,
    rescale: bool,
    lambda_: float,
    ctx: MethodContext,
) -> Tensor:
    """Breadcrumbs: keep the magnitude band below the top outliers, then task arithmetic.

    Per model with n entries: target = int(density*n), n_top = int(gamma*n), n_bot = max(0, n - target -
    n_top); tau'_i keeps the entries of ascending magnitude rank [n_bot, n_bot + target) (so the outlier
    cut shrinks when target + n_top > n; density >= 1 keeps all).
    merged = base + lambda * sum_i w_i tau'_i  (/ sum_i w_i when normalize).

    Davari & Belilovsky, "Model Breadcrumbs", ECCV 2024.  MergeKit: ``breadcrumbs``.
    """
    return merge_task_vectors(
        base,
        deltas,
        weights,
        sparsify=sparsifier_for("magnitude_outliers", density=density, gamma=gamma, rescale=rescale),
        consensus=False,
        normalize=normalize,
        lambda_=lambda_,
        ctx=ctx,
    )


@register(
    "breadcrumbs_ties",
    params=(DENSITY, GAMMA, NORMALIZE_FALSE, RESCALE_FALSE, LAMBDA, SIGN_ELECTION, INT8_MASK),
    paper=_PAPER,
    mergekit_name="breadcrumbs_ties",
)
def breadcrumbs_ties(
    base: Tensor,
    deltas: Tensor,
    weights: Tensor,
    *,
    density: Tensor,
    gamma: Tensor,
    normalize: bool,
    rescale: bool,
    lambda_: float,
    sign_election: str = "weighted",
    ctx: MethodContext,
) -> Tensor:
    """Breadcrumbs masks, then TIES sign election and disjoint merge.

    tau'_i as in breadcrumbs; s = sign(sum_i w_i tau'_i) (zero -> +);
    merged = base + lambda * sum_i w_i tau'_i [sign(tau'_i) = s]  (/ sum of agreeing w_i when normalize).

    Davari & Belilovsky, "Model Breadcrumbs", ECCV 2024.  MergeKit: ``breadcrumbs_ties``.
    """
    return merge_task_vectors(
        base,
        deltas,
        weights,
        sparsify=sparsifier_for("magnitude_outliers", density=density, gamma=gamma, rescale=rescale),
        consensus=True,
        normalize=normalize,
        lambda_=lambda_,
        sign_election=sign_election,
        ctx=ctx,
    )
