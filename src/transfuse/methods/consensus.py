"""Consensus merging: keep only the weights that TALL masks mark as useful to at least ``k`` tasks."""

from __future__ import annotations

import torch
from torch import Tensor

from transfuse.methods._linalg import scale_by_weights
from transfuse.methods.registry import ParamSpec, register


def _trim_top(deltas: Tensor, density: float) -> Tensor:
    """Per task, zero all but the ``int(n * density)`` largest magnitudes (ties at the cut are kept).

    Same rule as the TALL-mask/TIES reference ``topk_values_mask``: threshold at the ``(n - keep)``-th
    smallest magnitude and keep ``|x| >= threshold``.
    """
    k = deltas.shape[0]
    flat = deltas.reshape(k, -1)
    n = flat.shape[1]
    keep = int(n * density)
    if keep >= n or n == 0:
        return deltas
    # keep == 0 thresholds at the maximum, so at least the largest entry survives (as the reference does).
    threshold = flat.abs().kthvalue(n - keep, dim=1, keepdim=True).values
    flat = flat * (flat.abs() >= threshold)
    return flat.reshape(deltas.shape)


def _ties_sum(deltas: Tensor, density: float) -> Tensor:
    """TIES-merging with disjoint *sum* (the consensus paper's TIES variant): trim, elect sign, sum agreeing.

    Yadav et al., NeurIPS 2023.  The elected sign is ``sign(sum_t trimmed_t)``; where that is 0 the majority
    sign of the elected signs is used; entries agreeing with it are summed.
    """
    trimmed = _trim_top(deltas, density)
    sign = torch.sign(trimmed.sum(dim=0))
    sign[sign == 0] = torch.sign(sign.sum())
    agree = torch.where(sign > 0, trimmed > 0, trimmed < 0)
    return (trimmed * agree).sum(dim=0)


@register(
    "consensus",
    params=(
        ParamSpec("lambda", float, 1.0, "scale of the masked multi-task vector added to the base"),
        ParamSpec(
            "tall_mask_lambda",
            float,
            0.4,
            "TALL-mask threshold: task t keeps a weight where |tau_t| > tall_mask_lambda * |tau_MTL - tau_t|",
            low=0.0,
        ),
        ParamSpec(
            "k",
            int,
            2,
            "keep weights marked useful by at least k tasks (0 = plain task arithmetic/TIES)",
            low=0,
        ),
        ParamSpec(
            "base_method",
            str,
            "task_arithmetic",
            "multi-task vector to mask: task_arithmetic (sum) or ties (TIES trim + elect + disjoint sum)",
            choices=("task_arithmetic", "ties"),
        ),
        ParamSpec(
            "density",
            float,
            0.2,
            "ties only: share of each task vector kept by TIES trimming",
            low=0.0,
            high=1.0,
        ),
    ),
    paper=(
        "Wang, Dimitriadis, Ortiz-Jimenez, Fleuret & Frossard, 'Localizing Task Information for Improved Model "
        "Merging and Compression', ICML 2024"
    ),
    min_models=1,
)
def consensus(
    base: Tensor,
    deltas: Tensor,
    weights: Tensor,
    *,
    lambda_: float = 1.0,
    tall_mask_lambda: float = 0.4,
    k: int = 2,
    base_method: str = "task_arithmetic",
    density: float = 0.2,
) -> Tensor:
    """Consensus merging: ``base + lambda * (tau_MTL ⊙ [sum_t m_t >= k])``.

    Task vectors ``tau_t = weight_t * delta_t``.  The multi-task vector is ``tau_MTL = sum_t tau_t``
    (task arithmetic) or TIES(trim to ``density``, elect sign, disjoint sum) of the ``tau_t``.  The TALL mask of
    task t is ``m_t = |tau_t| > tall_mask_lambda * |tau_MTL - tau_t|`` (built from the same multi-task
    vector), and the consensus mask keeps the weights at least ``k`` tasks mark as theirs: ``k = 2``
    removes "catastrophic" (no task) and "selfish" (one task) weights, ``k = 0`` is plain TA/TIES.
    Wang et al., "Localizing Task Information for Improved Model Merging and Compression", ICML 2024; formulas
    as in the official code (github.com/nik-dim/tall_masks), which applies them to the whole flattened model,
    here per tensor.
    """
    tau = scale_by_weights(deltas, weights)
    if base_method == "ties":
        # The TALL masks compare each *untrimmed* task vector with the TIES vector, as the reference does.
        merged = _ties_sum(tau, density)
    else:
        merged = tau.sum(dim=0)
    votes = torch.zeros(base.shape, dtype=torch.int32, device=base.device)
    for t in range(tau.shape[0]):
        votes += tau[t].abs() > tall_mask_lambda * (merged - tau[t]).abs()
    return base + lambda_ * merged * (votes >= k)
