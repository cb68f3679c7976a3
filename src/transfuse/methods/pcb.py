"""PCB-merging: score every weight of every task by intra- and inter-task balance, drop the rest, average."""

from __future__ import annotations

import torch
from torch import Tensor

from transfuse.methods.registry import ParamSpec, register


def _kth(rows: Tensor, index: int) -> Tensor:
    """``sort(rows, dim=1)[:, index]`` (index clamped into range) without sorting: ``[K, 1]``."""
    index = min(max(index, 0), rows.shape[1] - 1)
    return rows.kthvalue(index + 1, dim=1, keepdim=True).values


@register(
    "pcb",
    params=(
        ParamSpec("lambda", float, 1.0, "scale of the merged task vector added to the base"),
        ParamSpec(
            "density",
            float,
            0.1,
            "share of each task's weights kept after balancing (the paper's r / pcb_ratio)",
            low=0.0,
            high=1.0,
        ),
        ParamSpec(
            "clip_ratio",
            float,
            1e-4,
            "share of smallest and of largest |delta| clipped per task before scoring (outlier guard)",
            low=0.0,
            high=0.5,
        ),
    ),
    paper=(
        "Du, Lee, Li, Jiang, Guo, Yu, Liu, Goh, Tang, He & Zhang, 'Parameter Competition Balancing for Model "
        "Merging', NeurIPS 2024"
    ),
    min_models=1,
)
def pcb(
    base: Tensor,
    deltas: Tensor,
    weights: Tensor,
    *,
    lambda_: float = 1.0,
    density: float = 0.1,
    clip_ratio: float = 1e-4,
) -> Tensor:
    """PCB-merging: ``base + lambda * sum_t(w_t * beta_t ⊙ tau^_t) / sum_t(beta_t)``.

    Per task t (over the flattened tensor, ``K`` tasks), following the official ``PCB_merge``
    (github.com/duguodong7/pcb-merging, ``pcb-merging.py``):

    - ``tau^_t = sign(tau_t) * clip(|tau_t|)``: ``|tau_t|`` clipped to its ``clip_ratio`` and ``1 - clip_ratio``
      order statistics;
    - intra-balancing ``exp(K * norm(|tau^_t|)^2)`` (``norm`` = min-max over the task's weights; the paper's
      Softmax with temperature ``K`` up to a per-task constant, which the final normalization cancels);
    - inter-balancing ``tanh(tau_t ⊙ sum_j tau_j)`` (the code's form of the paper's cross-task similarity);
    - ``beta_t = norm(max(intra * inter, q_t))`` where ``q_t`` is the ``1 - density`` quantile: the lowest
      ``1 - density`` share of scores get weight 0 ("drop"), the rest weights in (0, 1] ("rescale").

    ``weights`` are the per-task coefficients the official evolutionary search tunes (they multiply
    ``tau^_t`` only in the final average, not in the scores).  Du et al., "Parameter Competition Balancing for
    Model Merging", NeurIPS 2024.  The official code scores the whole flattened model at once; here each tensor
    is scored on its own.
    """
    k = deltas.shape[0]
    flat = deltas.reshape(k, -1)
    d = flat.shape[1]
    if d == 0:
        return base.clone()

    # Inter-balancing first: it needs the raw (unclipped) task vectors.
    score = (flat * flat.sum(dim=0)).tanh_()

    magnitude = flat.abs()
    low = _kth(magnitude, int(d * clip_ratio))
    high = _kth(magnitude, int(d * (1 - clip_ratio) - 1))
    magnitude = torch.clamp(magnitude, low, high)
    span = high - low
    # Intra-balancing; exp(K (x^2 - 1)) instead of exp(K x^2) avoids overflow for many tasks and only scales a
    # task's scores by a constant, which the min-max normalization below removes.
    intra = torch.where(span > 0, (magnitude - low) / torch.where(span > 0, span, 1.0), 0.0)
    score *= torch.exp(k * (intra.square_() - 1))
    del intra

    # tau^ = sign(tau) * clipped |tau|, written over the deltas buffer (the engine allows it).
    clipped = flat.sign_().mul_(magnitude)
    del magnitude

    # Drop and rescale: scores at or below the (1 - density) quantile get 0, the rest (x - q) / (max - q).
    threshold = _kth(score, int(d * (1 - density)))
    top = score.amax(dim=1, keepdim=True)
    span = top - threshold
    beta = torch.where(span > 0, (score - threshold).clamp_(min=0) / torch.where(span > 0, span, 1.0), 0.0)
    # Nothing strictly above the threshold (a constant row, a 1-element tensor, density -> 0): the official
    # min-max would divide 0/0; keep the top entries at full weight when their score is positive.
    flat_rows = (span <= 0) & (top > 0)
    beta = torch.where(flat_rows & (score >= top), 1.0, beta)
    del score

    coefficient = weights.to(clipped.dtype).reshape(k, 1)
    total = beta.sum(dim=0).clamp_(min=1e-12)
    merged = clipped.mul_(beta).mul_(coefficient).sum(dim=0) / total
    return base + lambda_ * merged.reshape(base.shape)
