"""RegMean: each linear layer merged by the closed-form least-squares fit to every model's outputs."""

from __future__ import annotations

import torch
from torch import Tensor

from transfuse.errors import ParameterError
from transfuse.methods._weighted_mean import weighted_mean_delta
from transfuse.methods.context import MethodContext
from transfuse.methods.registry import ParamSpec, register


def shrink_off_diagonal(gram: Tensor, alpha: float) -> Tensor:
    """``alpha * G + (1 - alpha) * diag(G)``: the off-diagonal entries scaled by ``alpha``, the diagonal kept."""
    if alpha == 1.0:
        return gram
    diagonal = torch.diagonal(gram, dim1=-2, dim2=-1)
    out = gram * alpha
    torch.diagonal(out, dim1=-2, dim2=-1).copy_(diagonal)
    return out


@register(
    "regmean",
    params=(
        ParamSpec(
            "alpha",
            float,
            0.9,
            "scale of the Gram matrices' off-diagonal entries (1: exact least squares; 0: diagonal, a "
            "per-input-feature weighted average)",
            low=0.0,
            high=1.0,
        ),
    ),
    paper="Jin, Ren, Preotiuc-Pietro & Cheng, 'Dataless Knowledge Fusion by Merging Weights of Language "
    "Models', ICLR 2023",
    family="needs-statistics",
    needs=("gram",),
    optional_statistics=("gram_input_dim",),
    fallback="the weighted mean of the task vectors (biases, norms, embeddings: not linear maps)",
)
def regmean(
    base: Tensor, deltas: Tensor, weights: Tensor, *, alpha: float = 0.9, ctx: MethodContext
) -> Tensor:
    """RegMean: ``W* = argmin_W sum_i w_i ||X_i W^T - X_i W_i^T||^2``, in closed form per linear layer.

    With each model's input Gram matrix ``G_i = X_i^T X_i / n_i`` (statistic ``gram``, ``[in, in]``; see
    ``transfuse statistics``) shrunk to ``G~_i = alpha G_i + (1 - alpha) diag(G_i)``, a weight ``[out, in]``
    (``nn.Linear``) merges to ``W* = (sum_i w_i W_i G~_i) (sum_i w_i G~_i)^-1``, i.e.
    ``base + (sum_i w_i tau_i G~_i) (sum_i w_i G~_i)^-1`` with task vectors ``tau_i``; a ``[in, out]`` weight
    (GPT-2's ``Conv1D``, statistic ``gram_input_dim = 0``) the transpose of that.  A singular system (input
    features no model ever saw) takes the least-norm solution, which leaves those inputs' weights at the base.
    Tensors without a Gram matrix get the weighted mean of the task vectors (the paper averages them).
    Jin et al., "Dataless Knowledge Fusion by Merging Weights of Language Models", ICLR 2023 (alpha: the
    authors' "reduce non-diagonal ratio"; 0.9 is their usual setting for transformers).
    """
    gram = ctx.statistics.get("gram")
    if gram is None:
        return base + weighted_mean_delta(deltas, weights, "regmean").to(base.dtype)
    input_dims = ctx.statistics.get("gram_input_dim")
    input_dim = 1 if input_dims is None else int(input_dims.reshape(-1)[0])
    if input_dims is not None and bool((input_dims.reshape(-1) != input_dim).any()):
        raise ParameterError(f"tensor {ctx.name!r}: the models' statistics disagree on its input dim")
    if base.dim() != 2 or gram.shape[-1] != base.shape[input_dim] or gram.shape[0] != deltas.shape[0]:
        raise ParameterError(
            f"tensor {ctx.name!r} {list(base.shape)}: Gram matrices of shape {list(gram.shape)} do not fit "
            f"a [out, in] weight with input dim {input_dim} and {deltas.shape[0]} models"
        )
    w = weights.to(device=gram.device, dtype=torch.float32).reshape(-1, 1, 1)
    g = shrink_off_diagonal(gram.float(), alpha) * w  # [K, in, in]
    tau = deltas.float() if input_dim == 1 else deltas.float().transpose(1, 2)  # [K, out, in]
    rhs = torch.einsum("koi,kij->oj", tau, g)  # sum_i w_i tau_i G~_i
    system = g.sum(0)
    # Solve X system = rhs, i.e. system X^T = rhs^T (system is symmetric).
    solution, info = torch.linalg.solve_ex(system, rhs.T)
    if int(info) != 0 or not bool(torch.isfinite(solution).all()):
        solution = torch.linalg.lstsq(system.double(), rhs.T.double(), driver="gelsd").solution.float()
    merged_delta = solution.T if input_dim == 1 else solution
    return base + merged_delta.to(base.dtype)
