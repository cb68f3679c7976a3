"""AdaMerging++'s task vectors: TIES' trim and sign election applied to each task vector, without the merge.

AdaMerging++ (Yang et al., ICLR 2024, Sec. 3.2) learns its coefficients on the entries TIES-Merging (Yadav et al.,
NeurIPS 2023) would keep: per tensor ``n``,

    tau'_k = trim(tau_k)       keep the k = max(1, int(density * numel)) largest |entries| (all if density >= 1;
                               equal magnitudes at the threshold: the lower index is kept)
    s      = sign(sum_k tau'_k)        (unweighted; where the sum is 0: + if at least as many entries of the
                                        tensor have a positive sum as a negative one, else -)
    hat tau_k = tau'_k * [sign(tau'_k) = s]

and the merged model is ``theta_0 + sum_k lambda_k hat tau_k`` (the "dis-sum" of the official code, no division).

Checked against the official code (EnnengYang/AdaMerging, ``ties_merging_utils.py``: ``topk_values_mask``,
``resolve_sign``, ``disjoint_merge_split``, with ``K = 20``, i.e. density 0.2).  Two deliberate differences: the
official code trims each task vector over the whole flattened model and keeps every entry tied at the
threshold, and breaks zero sums with the whole model's majority sign; here trim and majority are per tensor
with exactly k entries kept, which is what transfuse's ``ties`` (like MergeKit's) computes with
``sign_election: unweighted, normalize: false`` -- so the learned coefficients replay as an ordinary recipe.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from transfuse.adapt.errors import AdaptParameterError
from transfuse.methods._params import per_model_values


def ties_density_value(density: float) -> float:
    """``density`` as transfuse's TIES reads it from a recipe (the float32 value's shortest decimal), checked."""
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0.0 < density <= 1.0:
        raise AdaptParameterError(
            f"ties_density must be a number in (0, 1] (the fraction of each tensor's entries TIES keeps, "
            f"0.2 in the paper), got {density!r}"
        )
    return per_model_values(torch.tensor([float(density)], dtype=torch.float32))[0]


def trim_top_k(x: Tensor, density: float) -> Tensor:
    """A copy of ``x`` keeping exactly its ``max(1, int(density * numel))`` largest-magnitude entries.

    The threshold is the k-th largest magnitude (``kthvalue``, no sort); entries tied at it are kept in index
    order until k are kept.
    """
    flat = x.reshape(-1)
    n = flat.numel()
    if density >= 1 or n == 0:
        return x.clone()
    k = max(1, int(density * n))
    if k >= n:
        return x.clone()
    magnitude = flat.abs()
    threshold = torch.kthvalue(magnitude, n - k + 1).values
    keep = magnitude > threshold
    missing = k - int(keep.sum())
    if missing > 0:
        keep[torch.nonzero(magnitude == threshold).reshape(-1)[:missing]] = True
    return torch.where(keep, flat, torch.zeros((), dtype=flat.dtype, device=flat.device)).reshape(x.shape)


def elect_and_select(trimmed: Tensor) -> Tensor:
    """``hat tau_k = tau'_k [sign(tau'_k) = s]`` for a stack ``trimmed [K, *shape]`` (see the module doc)."""
    total = trimmed.sum(0)
    plus_wins_ties = int((total > 0).sum()) >= int((total < 0).sum())
    elected_plus = total >= 0 if plus_wins_ties else total > 0
    return torch.where(elected_plus, trimmed.clamp(min=0), trimmed.clamp(max=0))


def ties_task_vectors(
    task_vectors: Mapping[str, Mapping[str, Tensor]], density: float
) -> dict[str, dict[str, Tensor]]:
    """AdaMerging++'s per-task vectors ``hat tau_k`` (new tensors; the inputs are not modified).

    Each tensor's sign is elected among the tasks whose vector has it (a missing one counts as zero).
    """
    density = ties_density_value(density)
    out: dict[str, dict[str, Tensor]] = {task: {} for task in task_vectors}
    names: dict[str, None] = {}
    for vector in task_vectors.values():
        names.update(dict.fromkeys(vector))
    for name in names:
        owners = [task for task, vector in task_vectors.items() if name in vector]
        trimmed = torch.stack([trim_top_k(task_vectors[task][name], density) for task in owners])
        selected = elect_and_select(trimmed)
        del trimmed
        for task, row in zip(owners, selected.unbind(0)):
            out[task][name] = row.clone()  # its own storage: the stack is freed
    return out
