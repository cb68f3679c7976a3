"""Arcee Fusion: keep a fine-tune's changes only where they matter most (importance above a Tukey fence)."""

from __future__ import annotations

import torch
from torch import Tensor

from transfuse.methods.registry import register

_KL_EPS = 1e-8


def importance(other: Tensor, base: Tensor) -> Tensor:
    """|other - base| times the KL divergence of softmax(other) from softmax(base) along the last dim (one
    divergence per row, broadcast over it; a 1-D tensor is one row)."""
    p = torch.softmax(other, dim=-1) + _KL_EPS
    q = torch.softmax(base, dim=-1) + _KL_EPS
    kl = torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    return (other - base).abs() * kl


def tukey_fence(scores: Tensor) -> Tensor:
    """median + 1.5 (q3 - q1) of ``scores``, each quantile the sorted entry at index floor(q (n - 1)) with
    ``q (n - 1)`` computed in float32 (MergeKit's ``approximate_quantiles`` on tensors of at most 1e6 entries)."""
    flat = scores.reshape(-1)
    n = flat.numel()
    positions = (torch.tensor([0.25, 0.5, 0.75]) * (n - 1)).long().tolist()
    q1, median, q3 = (torch.kthvalue(flat, p + 1).values for p in positions)
    return median + 1.5 * (q3 - q1)


@register(
    "arcee_fusion",
    paper="Arcee AI, Arcee Fusion (https://arcee.ai; MergeKit's arcee_fusion, Goddard et al., EMNLP 2024 "
    "Industry, arXiv:2403.13257)",
    min_models=1,
    max_models=1,
    mergekit_name="arcee_fusion",
)
def arcee_fusion(base: Tensor, deltas: Tensor, weights: Tensor) -> Tensor:
    """Arcee Fusion: apply the fine-tune's change only at entries whose importance passes a Tukey fence.

    b = base + delta; I = |delta| * KL(softmax(b) || softmax(base)) (softmax and KL along the last dim, +1e-8
    inside the KL); tau = median(I) + 1.5 (q3(I) - q1(I)); merged = base + delta * [I >= tau].
    The quantiles are exact (sorted entries at floor(q (n - 1))).  MergeKit 0.1.5 computes them the same way
    on tensors of at most 1e6 entries and on a random sample of 1e6 entries (with replacement, unseeded) of
    larger ones, so there its result varies from run to run and this is its exact, deterministic limit.
    ``weights`` are ignored, as in MergeKit.

    MergeKit: ``arcee_fusion``.
    """
    delta = deltas[0]
    other = base + delta
    scores = importance(other, base)
    keep = scores >= tukey_fence(scores)
    return base + delta * keep
