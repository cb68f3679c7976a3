"""DARE: random drop of task-vector entries with rescaling, combined linearly or with TIES sign election."""

from __future__ import annotations

from torch import Tensor

from transfuse.methods._combine import merge_task_vectors
from transfuse.methods._params import (
    DENSITY,
    INT8_MASK,
    LAMBDA,
    NORMALIZE_FALSE,
    RESCALE_MODE,
    RESCALE_TRUE,
    SIGN_ELECTION,
)
from transfuse.methods._sparsifiers import sparsifier_for
from transfuse.methods.context import MethodContext
from transfuse.methods.registry import register

_PAPER = (
    "Yu et al., Language Models are Super Mario: Absorbing Abilities from Homologous Models as a Free "
    "Lunch, ICML 2024 (arXiv:2311.03099)"
)


@register(
    "dare_linear",
    params=(DENSITY, NORMALIZE_FALSE, RESCALE_TRUE, RESCALE_MODE, LAMBDA, INT8_MASK),
    paper=_PAPER,
    random=True,
    mergekit_name="dare_linear",
)
def dare_linear(
    base: Tensor,
    deltas: Tensor,
    weights: Tensor,
    *,
    density: Tensor,
    normalize: bool,
    rescale: bool,
    rescale_mode: str,
    lambda_: float,
    ctx: MethodContext,
) -> Tensor:
    """DARE + task arithmetic: drop each entry with probability 1 - density, rescale, sum the weighted vectors.

    tau'_i = m_i * tau_i with m_i ~ Bernoulli(density_i) per entry, then rescaled:
    ``rescale_mode: l1`` (MergeKit) multiplies by ||tau_i||_1 / ||tau'_i||_1; ``inverse_density`` (the paper)
    divides by density_i.  merged = base + lambda * sum_i w_i tau'_i (/ sum_i w_i when normalize).

    Yu et al., "Language Models are Super Mario", ICML 2024.  MergeKit: ``dare_linear``.
    """
    return merge_task_vectors(
        base,
        deltas,
        weights,
        sparsify=sparsifier_for(
            "random",
            density=density,
            rescale=rescale,
            rescale_mode=rescale_mode,
            generator=ctx.random_generator(),
        ),
        consensus=False,
        normalize=normalize,
        lambda_=lambda_,
        ctx=ctx,
    )


@register(
    "dare_ties",
    params=(DENSITY, NORMALIZE_FALSE, RESCALE_TRUE, RESCALE_MODE, LAMBDA, SIGN_ELECTION, INT8_MASK),
    paper=_PAPER,
    random=True,
    mergekit_name="dare_ties",
)
def dare_ties(
    base: Tensor,
    deltas: Tensor,
    weights: Tensor,
    *,
    density: Tensor,
    normalize: bool,
    rescale: bool,
    rescale_mode: str,
    lambda_: float,
    sign_election: str = "weighted",
    ctx: MethodContext,
) -> Tensor:
    """DARE + TIES: random drop and rescale as in dare_linear, then TIES sign election and disjoint merge.

    tau'_i as in dare_linear; s = sign(sum_i w_i tau'_i) (zero -> +);
    merged = base + lambda * sum_i w_i tau'_i [sign(tau'_i) = s]  (/ sum of agreeing w_i when normalize).

    Yu et al., "Language Models are Super Mario", ICML 2024.  MergeKit: ``dare_ties``.
    """
    return merge_task_vectors(
        base,
        deltas,
        weights,
        sparsify=sparsifier_for(
            "random",
            density=density,
            rescale=rescale,
            rescale_mode=rescale_mode,
            generator=ctx.random_generator(),
        ),
        consensus=True,
        normalize=normalize,
        lambda_=lambda_,
        sign_election=sign_election,
        ctx=ctx,
    )
