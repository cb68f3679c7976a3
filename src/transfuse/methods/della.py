"""DELLA: magnitude-ranked random drop (MagPrune), then TIES-style or linear merge."""

from __future__ import annotations

from torch import Tensor

from transfuse.methods._combine import merge_task_vectors
from transfuse.methods._params import (
    DENSITY,
    EPSILON,
    INT8_MASK,
    LAMBDA,
    NORMALIZE_FALSE,
    NORMALIZE_TRUE,
    RESCALE_MODE,
    RESCALE_TRUE,
    SIGN_ELECTION,
)
from transfuse.methods._sparsifiers import sparsifier_for
from transfuse.methods.context import MethodContext
from transfuse.methods.registry import register

_PAPER = (
    "Deep et al., DELLA-Merging: Reducing Interference in Model Merging through Magnitude-Based Sampling, "
    "2024 (arXiv:2406.11617)"
)


def check_epsilon(_global: dict, per_model: dict) -> str | None:
    """MagPrune's keep probabilities density +/- epsilon must stay inside (0, 1) (checked when 0 < density < 1)."""
    for i, (density, epsilon) in enumerate(zip(per_model["density"], per_model["epsilon"])):
        if 0 < density < 1 and (density + epsilon >= 1 or density - epsilon <= 0):
            return (
                f"model {i} has density={density:g} and epsilon={epsilon:g}; density +/- epsilon must lie strictly "
                "inside (0, 1): lower epsilon or move density away from 0 and 1"
            )
    return None


@register(
    "della",
    params=(DENSITY, EPSILON, NORMALIZE_TRUE, RESCALE_TRUE, RESCALE_MODE, LAMBDA, SIGN_ELECTION, INT8_MASK),
    paper=_PAPER,
    random=True,
    check=check_epsilon,
    mergekit_name="della",
)
def della(
    base: Tensor,
    deltas: Tensor,
    weights: Tensor,
    *,
    density: Tensor,
    epsilon: Tensor,
    normalize: bool,
    rescale: bool,
    rescale_mode: str,
    lambda_: float,
    sign_election: str = "weighted",
    ctx: MethodContext,
) -> Tensor:
    """DELLA: MagPrune each task vector, elect signs, average the agreeing entries.

    MagPrune: along dim 1 (1-D tensors: the whole vector) with L entries per row, the entry of ascending
    magnitude rank r is kept with p = density - eps + 2 eps (r - 1)/(L - 1); kept entries are rescaled to
    the L1 norm of tau_i (``rescale_mode: l1``, MergeKit) or divided by p (``inverse_density``, the paper).
    Requires 0 < density -/+ eps < 1 when 0 < density < 1.  Then as TIES:
    merged = base + lambda * sum_i w_i tau'_i [sign(tau'_i) = s] / sum_i w_i [sign(tau'_i) = s].

    Deep et al., "DELLA-Merging", 2024.  MergeKit: ``della``.
    """
    return merge_task_vectors(
        base,
        deltas,
        weights,
        sparsify=sparsifier_for(
            "della_magprune",
            density=density,
            epsilon=epsilon,
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


@register(
    "della_linear",
    params=(DENSITY, EPSILON, NORMALIZE_FALSE, RESCALE_TRUE, RESCALE_MODE, LAMBDA, INT8_MASK),
    paper=_PAPER,
    random=True,
    check=check_epsilon,
    mergekit_name="della_linear",
)
def della_linear(
    base: Tensor,
    deltas: Tensor,
    weights: Tensor,
    *,
    density: Tensor,
    epsilon: Tensor,
    normalize: bool,
    rescale: bool,
    rescale_mode: str,
    lambda_: float,
    ctx: MethodContext,
) -> Tensor:
    """DELLA MagPrune (as in della), then task arithmetic without sign election.

    merged = base + lambda * sum_i w_i tau'_i  (/ sum_i w_i when normalize).

    Deep et al., "DELLA-Merging", 2024.  MergeKit: ``della_linear``.
    """
    return merge_task_vectors(
        base,
        deltas,
        weights,
        sparsify=sparsifier_for(
            "della_magprune",
            density=density,
            epsilon=epsilon,
            rescale=rescale,
            rescale_mode=rescale_mode,
            generator=ctx.random_generator(),
        ),
        consensus=False,
        normalize=normalize,
        lambda_=lambda_,
        ctx=ctx,
    )
