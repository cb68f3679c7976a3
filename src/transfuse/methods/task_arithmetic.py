"""Task arithmetic: add the weighted sum of task vectors to the base."""

from __future__ import annotations

from torch import Tensor

from transfuse.methods._combine import merge_task_vectors
from transfuse.methods._params import INT8_MASK, LAMBDA, NORMALIZE_FALSE
from transfuse.methods.context import MethodContext
from transfuse.methods.registry import register


@register(
    "task_arithmetic",
    params=(NORMALIZE_FALSE, LAMBDA, INT8_MASK),
    paper="Ilharco et al., Editing Models with Task Arithmetic, ICLR 2023 (arXiv:2212.04089)",
    mergekit_name="task_arithmetic",
)
def task_arithmetic(
    base: Tensor,
    deltas: Tensor,
    weights: Tensor,
    *,
    normalize: bool,
    lambda_: float,
    ctx: MethodContext,
) -> Tensor:
    """base + lambda * sum_i w_i tau_i  (divided by sum_i w_i when normalize; a |sum| < 1e-8 divides by 1).

    Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023.  MergeKit: ``task_arithmetic``.
    """
    return merge_task_vectors(
        base, deltas, weights, sparsify=None, consensus=False, normalize=normalize, lambda_=lambda_, ctx=ctx
    )
