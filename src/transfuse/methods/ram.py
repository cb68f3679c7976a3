"""RAM and RAM+ (tensor-local): average task vectors only where several models changed an entry."""

from __future__ import annotations

import torch
from torch import Tensor

from transfuse.methods.registry import ParamSpec, register

_PAPER = "Reinforced Agent Merging (RAM), arXiv:2601.13572 (as implemented by MergeKit 0.1.5)"

EPSILON = ParamSpec(
    "epsilon",
    float,
    1e-5,
    "an entry counts as changed by a model when |fine-tuned - base| > epsilon",
    low=0.0,
)
R = ParamSpec(
    "r", float, 0.1, "RAM+: how much a model's unique entries are boosted per unit of overlap ratio", low=0.0
)
ALPHA = ParamSpec("alpha", float, 0.2, "RAM+: the overlap ratio rho is clipped to [0, alpha]", low=0.0)


def _counted(deltas: Tensor, epsilon: float) -> tuple[Tensor, Tensor, Tensor]:
    """Zero the entries with |delta| <= epsilon (in place); return the [K, n] rows, the changed mask and the
    number of models that changed each entry ([n])."""
    rows = deltas.reshape(deltas.shape[0], -1)
    changed = rows.abs() > epsilon
    rows.mul_(changed)
    return rows, changed, changed.sum(dim=0)


@register("ram", params=(EPSILON,), paper=_PAPER, mergekit_name="ram")
def ram(base: Tensor, deltas: Tensor, weights: Tensor, *, epsilon: float) -> Tensor:
    """RAM: keep each entry a single model changed, average the entries several models changed.

    m_i = [|delta_i| > epsilon], c = sum_i m_i (per entry);
    merged = base + sum_i m_i delta_i / max(c, 1)
    (where only one model changed an entry its change is kept whole; where c > 1 the changes are averaged over
    the models that made them, not over all K, so a model's change is not diluted by models that left the entry
    alone).  ``weights`` are ignored, as in MergeKit (which has no weight for RAM).

    Reinforced Agent Merging, arXiv:2601.13572.  MergeKit: ``ram``.
    """
    rows, _, counts = _counted(deltas, epsilon)
    merged = rows.sum(dim=0).div_(counts.clamp(min=1))
    return merged.reshape(base.shape).add_(base)


@register("ramplus_tl", params=(R, ALPHA, EPSILON), paper=_PAPER, mergekit_name="ramplus_tl")
def ramplus_tl(
    base: Tensor, deltas: Tensor, weights: Tensor, *, r: float, alpha: float, epsilon: float
) -> Tensor:
    """RAM+ (tensor-local): RAM, with each model's unique entries boosted by how much it overlaps the others.

    m_i = [|delta_i| > epsilon], c = sum_i m_i; per model (over this tensor's entries):
    rho_i = #{m_i and c > 1} / max(#{m_i and c = 1}, epsilon),  lambda_i = 1 + r * clip(rho_i, 0, alpha);
    merged = base + sum_i m_i delta_i ([c = 1] lambda_i + [c > 1] / c)
    The paper computes rho over the whole model; MergeKit's ``ramplus_tl`` (and this) per tensor.  ``weights``
    are ignored, as in MergeKit.

    Reinforced Agent Merging, arXiv:2601.13572.  MergeKit: ``ramplus_tl``.
    """
    rows, changed, counts = _counted(deltas, epsilon)
    unique = counts == 1
    shared_n = (changed & (counts > 1)).sum(dim=1).to(rows.dtype)
    unique_n = (changed & unique).sum(dim=1).to(rows.dtype)
    rho = shared_n / unique_n.clamp(min=epsilon)
    boost = 1 + r * rho.clamp(min=0, max=alpha)
    merged = torch.where(unique, rows * boost[:, None], rows / counts.clamp(min=1)).sum(dim=0)
    return merged.reshape(base.shape).add_(base)
