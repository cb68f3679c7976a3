"""TIES-Merging: trim, elect sign, disjoint merge."""

from __future__ import annotations

from torch import Tensor

from transfuse.methods._combine import merge_task_vectors
from transfuse.methods._params import (
    DENSITY,
    INT8_MASK,
    LAMBDA,
    NORMALIZE_TRUE,
    RESCALE_FALSE,
    SIGN_ELECTION,
)
from transfuse.methods._sparsifiers import sparsifier_for
from transfuse.methods.context import MethodContext
from transfuse.methods.registry import register


@register(
    "ties",
    params=(DENSITY, NORMALIZE_TRUE, RESCALE_FALSE, LAMBDA, SIGN_ELECTION, INT8_MASK),
    paper="Yadav et al., TIES-Merging: Resolving Interference When Merging Models, NeurIPS 2023 "
    "(arXiv:2306.01708)",
    mergekit_name="ties",
)
def ties(
    base: Tensor,
    deltas: Tensor,
    weights: Tensor,
    *,
    density: Tensor,
    normalize: bool,
    rescale: bool,
    lambda_: float,
    sign_election: str = "weighted",
    ctx: MethodContext,
) -> Tensor:
    """TIES: trim each task vector to its top-k magnitudes, elect a sign per entry, average the agreeing ones.

    tau'_i = topk(tau_i, k_i = max(1, int(density_i * n)))   (exactly k_i entries; ties: lowest index)
    s = sign(sum_i w_i tau'_i)  (a zero sum elects +)
    merged = base + lambda * sum_i w_i tau'_i [sign(tau'_i) = s] / sum_i w_i [sign(tau'_i) = s]
    (no division when normalize is false; a zero divisor divides by 1).  ``rescale`` restores each trimmed
    tau'_i to the L1 norm of tau_i.  ``sign_election: unweighted`` elects ``sign(sum_i tau'_i)`` instead and
    breaks zero sums by the tensor's majority sign, as the original TIES code does.

    Yadav et al., "TIES-Merging: Resolving Interference When Merging Models", NeurIPS 2023.
    MergeKit: ``ties``.
    """
    return merge_task_vectors(
        base,
        deltas,
        weights,
        sparsify=sparsifier_for("magnitude", density=density, rescale=rescale),
        consensus=True,
        normalize=normalize,
        lambda_=lambda_,
        sign_election=sign_election,
        ctx=ctx,
    )
