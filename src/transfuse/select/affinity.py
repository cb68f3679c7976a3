"""Task affinity before merging: which experts can share one model without hurting each other?

For a pool of experts fine-tuned from one base, three pairwise matrices:

- **cosine**: cosine similarity of the task vectors ``tau_i = theta_i - theta_base`` (all tensors flattened into
  one vector).  Cheap: one pass over the weights.
- **sign conflict**: among the entries that both task vectors keep after TIES' trim to their top-`density`
  magnitudes (:func:`top_magnitude_mask`, the rule of ``transfuse.methods`` ``ties``), the fraction whose signs
  differ (0 = the two never disagree where both matter).  With ``density=1`` every entry where both are non-zero
  counts.  Cheap.
- **interference** (measured): the mean accuracy drop, on the two tasks, of the pairwise task-arithmetic merge
  ``theta_base + lambda (tau_i + tau_j)`` relative to each task's own expert:
  ``((acc_i(expert_i) - acc_i(merge)) + (acc_j(expert_j) - acc_j(merge))) / 2``.  Costs one merge and two
  evaluations per pair.

:func:`predictiveness` reports how well each cheap signal ranks the pairs by measured interference (Spearman and
Kendall rank correlation over the ``K (K - 1) / 2`` pairs).  A useful signal has cosine correlating negatively
and sign conflict positively with interference.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from transfuse.errors import TransfuseError


class AffinityError(TransfuseError, ValueError):
    """The experts cannot be compared: fewer than two, or tensors that differ from the base's."""


def task_vectors(
    base: Mapping[str, torch.Tensor], experts: Mapping[str, Mapping[str, torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """``{expert: flattened float32 task vector}`` over the floating-point tensors the base and experts share."""
    if len(experts) < 2:
        raise AffinityError(f"task affinity needs at least two experts, got {len(experts)}")
    names = sorted(k for k, v in base.items() if v.is_floating_point())
    for label, state in experts.items():
        missing = [n for n in names if n not in state]
        if missing:
            raise AffinityError(f"expert {label!r} lacks tensors of the base: {missing[:3]}")
        bad = [n for n in names if state[n].shape != base[n].shape]
        if bad:
            raise AffinityError(f"expert {label!r} has tensors shaped unlike the base's: {bad[:3]}")
    return {
        label: torch.cat([(state[n].float() - base[n].float()).reshape(-1) for n in names])
        for label, state in experts.items()
    }


def cosine_matrix(vectors: Mapping[str, torch.Tensor]) -> np.ndarray:
    """``[K, K]`` cosine similarities of the task vectors (1 on the diagonal; 0 against an all-zero vector)."""
    stacked = torch.stack([v.double() for v in vectors.values()])
    norms = stacked.norm(dim=1)
    gram = stacked @ stacked.T
    denom = norms[:, None] * norms[None, :]
    cos = torch.where(denom > 0, gram / denom.clamp_min(1e-300), torch.zeros_like(gram))
    return cos.numpy()


def top_magnitude_mask(vector: torch.Tensor, density: float) -> torch.Tensor:
    """Which entries TIES' trim keeps of a flat `vector`: exactly ``k = max(1, int(density * n))`` of them, the
    largest magnitudes, and among equal magnitudes at the threshold the lowest indices (everything if
    ``density >= 1``).  The same rule as the ``ties`` merge method, so a sign conflict counts what TIES would keep.
    """
    n = vector.numel()
    k = n if density >= 1 else max(1, int(density * n))
    if k >= n:
        return torch.ones(n, dtype=torch.bool, device=vector.device)
    magnitude = vector.abs().reshape(-1)
    threshold = torch.kthvalue(magnitude, n - k + 1).values  # the k-th largest magnitude
    keep = magnitude > threshold
    tied = torch.nonzero(magnitude == threshold).reshape(-1)  # ascending indices
    keep[tied[: k - int(keep.sum())]] = True
    return keep


def sign_conflict_matrix(vectors: Mapping[str, torch.Tensor], *, density: float = 0.2) -> np.ndarray:
    """``[K, K]`` fraction of sign disagreements among entries both task vectors keep (0 on the diagonal).

    Each vector keeps what TIES' trim keeps (:func:`top_magnitude_mask`: exactly ``max(1, int(density * n))``
    entries, ties at the threshold broken by lowest index); entries that are zero never count.  A pair with no
    entry kept by both gets 0.
    """
    if not 0 < density <= 1:
        raise AffinityError(f"density must be in (0, 1], got {density}")
    kept = [top_magnitude_mask(v, density) & (v.reshape(-1) != 0) for v in vectors.values()]
    signs = [torch.sign(v.reshape(-1)) for v in vectors.values()]
    k_models = len(kept)
    out = np.zeros((k_models, k_models))
    for i, j in itertools.combinations(range(k_models), 2):
        both = kept[i] & kept[j]
        n = int(both.sum())
        rate = float((signs[i][both] != signs[j][both]).sum()) / n if n else 0.0
        out[i, j] = out[j, i] = rate
    return out


def interference_matrix(
    names: Sequence[str],
    merge_pair: Callable[[str, str], Any],
    evaluate_model: Callable[[Any, Sequence[str]], Mapping[str, float]],
    expert_accuracy: Mapping[str, float],
    *,
    log: Callable[[str], None] | None = None,
) -> tuple[np.ndarray, dict[str, dict[str, float]]]:
    """Measured pairwise interference (see the module docstring) and each pair merge's accuracies.

    `merge_pair(a, b)` returns the merged model of experts `a` and `b`; `evaluate_model(model, [a, b])` its
    accuracy on those two tasks; `expert_accuracy[t]` is the accuracy of task t's own expert (same examples).
    """
    k = len(names)
    out = np.zeros((k, k))
    accuracies: dict[str, dict[str, float]] = {}
    for i, j in itertools.combinations(range(k), 2):
        a, b = names[i], names[j]
        acc = evaluate_model(merge_pair(a, b), [a, b])
        drop = ((expert_accuracy[a] - acc[a]) + (expert_accuracy[b] - acc[b])) / 2
        out[i, j] = out[j, i] = drop
        accuracies[f"{a}+{b}"] = dict(acc)
        if log is not None:
            log(f"{a} + {b}: interference {100 * drop:+.1f} points")
    return out, accuracies


def upper_pairs(matrix: np.ndarray) -> np.ndarray:
    """The ``K (K - 1) / 2`` entries above the diagonal, row by row."""
    rows, cols = np.triu_indices(matrix.shape[0], k=1)
    return np.asarray(matrix)[rows, cols]


def predictiveness(signal: np.ndarray, interference: np.ndarray) -> dict[str, float]:
    """Spearman rho and Kendall tau between a cheap signal and measured interference over the pairs."""
    from scipy.stats import kendalltau, spearmanr

    x, y = upper_pairs(signal), upper_pairs(interference)
    if len(x) < 3:
        return {"spearman": math.nan, "kendall": math.nan, "pairs": len(x)}
    rho = spearmanr(x, y).statistic
    tau = kendalltau(x, y).statistic
    return {"spearman": float(rho), "kendall": float(tau), "pairs": len(x)}
