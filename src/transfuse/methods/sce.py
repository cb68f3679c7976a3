"""SCE (select, calculate, erase): FuseChat's merge of task vectors by variance and energy."""

from __future__ import annotations

import torch
from torch import Tensor

from transfuse.methods.registry import ParamSpec, register

SELECT_TOPK = ParamSpec(
    "select_topk",
    float,
    1.0,
    "share of the entries whose variance across the models is nonzero that are kept (the highest-variance ones)",
    low=0.0,
    high=1.0,
)
INT8_MASK = ParamSpec(
    "int8_mask",
    bool,
    False,
    "accepted for MergeKit recipes, no effect: MergeKit stores its selection and sign masks as int8 instead of "
    "the compute dtype (memory only; 0/1 and the signs -1/0/+1 are exact in either)",
    inert=True,
)


def top_variance_mask(deltas: Tensor, share: float) -> Tensor:
    """SCE's select step: a boolean mask (shape of one task vector) of the ``k = int(nnz * share)`` entries with
    the largest variance across the ``K`` task vectors, ``nnz`` = the entries whose variance is nonzero.

    Ties at the k-th variance keep the lowest flat indices (MergeKit's ``topk`` picks among them in no defined
    order).  ``k`` is computed like MergeKit's (the count times ``share`` in float32, truncated).
    """
    flat = deltas.reshape(deltas.shape[0], -1)
    n = flat.shape[1]
    if share <= 0:
        return torch.zeros(deltas.shape[1:], dtype=torch.bool, device=deltas.device)
    if share >= 1:
        return torch.ones(deltas.shape[1:], dtype=torch.bool, device=deltas.device)
    var = torch.var(flat, dim=0, unbiased=False)
    nonzero = torch.count_nonzero(var)
    k = int(nonzero * share)  # float32 product, as MergeKit computes it
    if k == 0:
        return torch.zeros(deltas.shape[1:], dtype=torch.bool, device=deltas.device)
    threshold = torch.kthvalue(var, n - k + 1).values  # the k-th largest variance
    keep = var > threshold
    missing = k - int(keep.sum())
    if missing > 0:  # fill up with the lowest-index entries at the threshold
        at = torch.nonzero(var == threshold).reshape(-1)[:missing]
        keep[at] = True
    return keep.reshape(deltas.shape[1:])


@register(
    "sce",
    params=(SELECT_TOPK, INT8_MASK),
    paper="Wan et al., FuseChat: Knowledge Fusion of Chat Models, 2024 (arXiv:2408.07990), the SCE merge",
    mergekit_name="sce",
)
def sce(base: Tensor, deltas: Tensor, weights: Tensor, *, select_topk: float) -> Tensor:
    """SCE: select the high-variance entries, weight each model by its energy, erase minority signs.

    Select: if ``select_topk < 1``, keep in every tau_i only the ``int(select_topk * nnz)`` entries with the
    largest variance ``Var_i(tau_i)`` across models (``nnz`` = entries of nonzero variance), zero the rest.
    Calculate: ``eta_i = mean(tau_i^2) / sum_j mean(tau_j^2)`` (``1/K`` each when that sum is below 1e-6).
    Erase: ``s = sign(sum_i tau_i)`` (a zero sum elects +), ``m_i = [sign(tau_i) = s]`` (zeros never agree).
    merged = base + sum_i eta_i m_i tau_i / max(sum_i eta_i m_i, 1e-6)

    ``weights`` are ignored, as in MergeKit (SCE's weights are the calculated ``eta_i``).  Ties at the k-th
    variance keep the lowest indices (see ``top_variance_mask``).  Overwrites ``deltas``.

    Wan et al., "FuseChat: Knowledge Fusion of Chat Models", 2024.  MergeKit: ``sce``.
    """
    if select_topk < 1:
        deltas.mul_(top_variance_mask(deltas, select_topk))
    k = deltas.shape[0]
    flat = deltas.reshape(k, -1)
    energy = flat.square().mean(dim=1)
    total = float(energy.sum())
    eta = torch.full_like(energy, 1.0 / k) if abs(total) < 1e-6 else energy / total
    elected = torch.where(flat.sum(dim=0) >= 0, 1.0, -1.0)
    agree = flat.sign() == elected
    erased = eta[:, None] * agree
    merged = (flat * erased).sum(dim=0) / erased.sum(dim=0).clamp(min=1e-6)
    return merged.reshape(base.shape).add_(base)
