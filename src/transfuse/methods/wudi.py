"""WUDI-merging: per linear layer, the merged task vector that least disturbs each task on its own inputs."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from transfuse.methods._linalg import mean_delta, rank_tolerance, scale_by_weights
from transfuse.methods.registry import ParamSpec, register

_PAPER = (
    "Cheng, Xiong, Wei, Zhu & Yuan, 'Whoever Started the Interference Should End It: Guiding Data-Free Model "
    "Merging via Task Vectors', ICML 2025 (arXiv:2503.08099)"
)

#: How a 2-D tensor is merged: the paper's Adam descent, the exact minimiser, or the non-linear-layer rule.
SOLVERS = ("adam", "closed_form", "mean")

#: torch.optim.Adam's defaults, which the official code uses.
_BETA1, _BETA2, _EPS = 0.9, 0.999, 1e-8


@register(
    "wudi",
    output_scale="alpha",
    params=(
        ParamSpec(
            "solver",
            str,
            "adam",
            "how a 2-D tensor is merged: adam (the paper's gradient descent from the task-arithmetic sum), "
            "closed_form (the objective's exact least-squares minimiser) or mean (the mean task vector, what "
            "other tensors get; set it with a filter for embeddings)",
            choices=SOLVERS,
        ),
        ParamSpec(
            "steps",
            int,
            300,
            "Adam steps per 2-D tensor (0 keeps the task-arithmetic sum)",
            low=0,
            high=100_000,
        ),
        ParamSpec(
            "lr",
            float,
            1e-5,
            "Adam learning rate (absolute: ~lr per entry per step; 0 keeps the task-arithmetic sum)",
            low=0.0,
        ),
        ParamSpec("alpha", float, 1.0, "scale of the merged task vector added to the base (the paper: 1.0)"),
    ),
    paper=_PAPER,
    min_models=1,
)
def wudi(
    base: Tensor,
    deltas: Tensor,
    weights: Tensor,
    *,
    solver: str = "adam",
    steps: int = 300,
    lr: float = 1e-5,
    alpha: float = 1.0,
) -> Tensor:
    """WUDI-merging: ``base + alpha * argmin_X sum_i ||(X - tau_i) tau_i^T||_F^2 / ||tau_i||_F^2`` per 2-D tensor.

    ``tau_i = weight_i * delta_i`` (``[out, in]``, ``y = W x``).  Each task's rows stand in for its inputs (the
    paper's Proposition 1: a linear layer's task vector is roughly a combination of the inputs it was trained
    on), so ``(X - tau_i) tau_i^T`` is the interference the merged task vector ``X`` causes on task ``i``; the
    ``1 / ||tau_i||_F^2`` weighting makes each task's term independent of its scale, so a per-model weight
    moves that task's target ``tau_i`` but not its importance.  With ``M_i = tau_i / ||tau_i||_F`` stacked
    into ``M`` (``[K*out, in]``) and ``C = [tau_1 M_1^T, .., tau_K M_K^T]`` (``[out, K*out]``) the objective
    is ``||X M^T - C||_F^2``, its gradient ``2 (X G - B)`` with ``G = M^T M``, ``B = C M``, computed once.

    - ``solver: adam`` (default), as the official code (github.com/nathanielyvo/WUDI-Merging,
      ``nlp_roberta/lamassu.py``; FusionBench's ``fusion_bench/method/wudi/wudi.py``): start from the
      task-arithmetic sum ``sum_i tau_i`` and take ``steps`` Adam steps (torch's defaults, no weight decay),
      each one ``[out, in] x [in, in]`` matmul (or two thinner ones through ``M`` when ``in > 2 K out``).
      The official RoBERTa code uses 300 steps at lr 2e-5, FusionBench 1e-5 (400 steps in its config): lr 1e-5
      and 300 steps here.  Adam's step is absolute (about ``lr`` per entry), so entries move at most about
      ``steps * lr`` from the start: an implicit regulariser the exact minimiser lacks, and not scale-free.
    - ``solver: closed_form``: the minimum-norm exact minimiser ``X = C (M^T)^+``, from an eigendecomposition
      (float64) of the smaller of ``M^T M`` / ``M M^T``; eigenvalues whose square root is at most
      ``max(in, K out) * eps32`` times the largest's count as zero.  With ``K out <= in`` (generic tasks) it solves
      ``X tau_i^T = tau_i tau_i^T`` for every task exactly, whatever the weighting; near-opposed tasks can make
      it large.
    - Tensors that are not 2-D (biases, norms, scalars, conv kernels) and ``solver: mean`` get the mean task
      vector, as FusionBench does for non-matrices; every 2-D tensor is treated as a linear map ``[out, in]``,
      embeddings included (FusionBench's default; the method is not told which tensors are embeddings, so a
      recipe routes them with a filter: ``solver: [{filter: embed, value: mean}, {value: adam}]``).

    Departures from the official code: task vectors that are zero here are left out of the objective (the
    official loss divides by their zero norm: NaN); a single non-zero task gives that task vector exactly (the
    minimiser; Adam would drift by rounding); ``alpha`` (default 1, i.e. none) is a sweepable output scale.
    Cheng et al., "Whoever Started the Interference Should End It: Guiding Data-Free Model Merging via Task
    Vectors", ICML 2025.
    """
    tau = scale_by_weights(deltas, weights)
    if base.dim() != 2 or solver == "mean":
        return base + alpha * mean_delta(tau)
    if base.numel() == 0:
        return base.clone()
    norms = torch.linalg.vector_norm(tau.reshape(tau.shape[0], -1), dim=1)
    live = torch.nonzero(norms > 0).flatten().tolist()
    if not live:  # every task vector is zero here
        return base.clone()
    if len(live) == 1:  # the minimiser is that task vector: nothing to trade off
        return base + alpha * tau[live[0]]
    if solver == "closed_form":
        gram = tau.shape[2] <= tau.shape[0] * tau.shape[1]  # eigendecompose the smaller of M^T M, M M^T
        merged = _closed_form(_Objective(tau, norms, torch.float64, gram=gram)).to(base.dtype)
    else:
        start = tau.sum(dim=0)
        gram = tau.shape[2] <= 2 * tau.shape[0] * tau.shape[1]  # one [in,in] matmul beats two through M
        merged = _adam(start, _Objective(tau, norms, tau.dtype, gram=gram), steps=steps, lr=lr)
    return base + alpha * merged


class _Objective:
    """``||X M^T - C||_F^2`` for one tensor's task vectors, in the form its shape makes cheapest.

    ``M_i = tau_i / ||tau_i||`` (zero for a zero task vector, which so drops out) is stacked into ``M``
    (``[n, in]``, ``n = K out``); ``C_i = tau_i M_i^T = ||tau_i|| M_i M_i^T``.  ``gram`` says which side is
    used: with ``gram`` the ``[in, in]`` pair ``G = M^T M = sum_i M_i^T M_i`` and
    ``B = C M = sum_i ||tau_i|| M_i (M_i^T M_i)`` (``C`` itself, ``[out, n]``, would be vocabulary-squared for an
    embedding); otherwise ``M`` and ``C`` (``C`` is then smaller than ``[out, in]``).  In float32 ``M`` is
    ``tau`` scaled in place (the engine lets a method overwrite ``deltas``); float64 works on copies.
    """

    def __init__(self, tau: Tensor, norms: Tensor, dtype: torch.dtype, *, gram: bool) -> None:
        k, out, inp = tau.shape
        tiny = torch.finfo(norms.dtype).tiny
        inv = torch.where(norms > 0, 1.0 / norms.clamp_min(tiny), torch.zeros_like(norms)).tolist()
        scale = norms.tolist()
        live = [i for i in range(k) if inv[i] > 0]
        self.gram = gram
        self.n = k * out
        if gram:  # one task at a time: float64 never holds more than one [out, in] copy
            self.g = torch.zeros(inp, inp, dtype=dtype, device=tau.device)
            self.b = torch.zeros(out, inp, dtype=dtype, device=tau.device)
            for i in live:
                unit = tau[i].to(dtype).mul_(inv[i])  # in place when dtype is tau's
                g_i = unit.T @ unit
                self.g += g_i
                self.b.addmm_(unit, g_i, alpha=scale[i])
            return
        units = tau.to(dtype).mul_(torch.tensor(inv, dtype=dtype, device=tau.device).reshape(k, 1, 1))
        self.rows = units.reshape(k * out, inp)
        self.c = torch.empty(out, k * out, dtype=dtype, device=tau.device)
        for i in range(k):
            torch.mm(units[i], units[i].T, out=self.c[:, i * out : (i + 1) * out]).mul_(scale[i])

    def gradient(self) -> Callable[[Tensor], Tensor]:
        """``x -> 2 (x M^T - C) M = 2 (x G - B)``, into one reused ``[out, in]`` buffer: one
        ``[out, in] x [in, in]`` matmul per call on the Gram side, two thinner ones through ``M`` otherwise."""
        if self.gram:
            grad = torch.empty_like(self.b)

            def primal(x: Tensor) -> Tensor:
                return torch.mm(x, self.g, out=grad).sub_(self.b).mul_(2.0)

            return primal
        grad = torch.empty(self.c.shape[0], self.rows.shape[1], dtype=self.c.dtype, device=self.c.device)
        residual = torch.empty_like(self.c)

        def dual(x: Tensor) -> Tensor:
            torch.mm(x, self.rows.T, out=residual).sub_(self.c)
            return torch.mm(residual, self.rows, out=grad).mul_(2.0)

        return dual


def _adam(start: Tensor, objective: _Objective, *, steps: int, lr: float) -> Tensor:
    """``steps`` Adam steps on ``objective`` from ``start`` (overwritten): torch.optim.Adam's update
    (betas 0.9/0.999, eps 1e-8, no weight decay) with the analytic gradient."""
    x = start
    if steps == 0 or lr == 0:
        return x
    gradient = objective.gradient()
    m = torch.zeros_like(x)
    v = torch.zeros_like(x)
    denom = torch.empty_like(x)
    for t in range(1, steps + 1):
        grad = gradient(x)
        m.mul_(_BETA1).add_(grad, alpha=1 - _BETA1)
        v.mul_(_BETA2).addcmul_(grad, grad, value=1 - _BETA2)
        torch.sqrt(v, out=denom).div_(math.sqrt(1 - _BETA2**t)).add_(_EPS)
        x.addcdiv_(m, denom, value=-lr / (1 - _BETA1**t))
    return x


def _closed_form(objective: _Objective) -> Tensor:
    """The minimum-norm minimiser ``X = C (M^T)^+``: ``B G^+`` on the Gram side, else ``C (M M^T)^+ M``, from a
    thresholded eigendecomposition of that symmetric matrix."""
    if objective.gram:
        inp = objective.g.shape[0]
        return objective.b @ _pseudo_inverse(objective.g, (inp, objective.n))
    rows = objective.rows
    return (objective.c @ _pseudo_inverse(rows @ rows.T, tuple(rows.shape[::-1]))) @ rows


def _pseudo_inverse(gram: Tensor, shape: tuple[int, int]) -> Tensor:
    """``gram^+`` for a symmetric PSD matrix ``M^T M`` or ``M M^T``: eigenvalues whose square root (a singular
    value of ``M``) is ``<= max(shape) * eps32 * sqrt(lambda_max)`` count as zero."""
    eigvals, eigvecs = torch.linalg.eigh(gram)
    root = eigvals.clamp_min(0).sqrt()
    keep = root > rank_tolerance(root[-1], shape)
    basis = eigvecs[:, keep]
    return (basis / eigvals[keep]) @ basis.T
