"""TMI: the intra-class feature variance, measured as the conditional entropy H(X | Y) of the features."""

from __future__ import annotations

import math

import torch

from transfuse.select._validate import SelectionInputError, features_and_labels


def tmi(features, labels, *, k: int = 3, min_dist: float = 1.0) -> float:
    r"""TMI (Xu, Kang: "Fast and Accurate Transferability Measurement by Evaluating Intra-class Feature
    Variance", ICCV 2023).

    The features are centered on their mean; for each class ``c`` with ``n_c > k`` samples the differential
    entropy of its features is estimated with the Kozachenko-Leonenko k-nearest-neighbour estimator under the
    max (Chebyshev) norm, as in the official code:

    .. math::
        \hat H_c = \psi(n_c) - \psi(k) + \frac{D}{n_c} \sum_{i \in c} \log\big(2 \max(r_{i,k}, r_{\min})\big),

    with ``r_{i,k}`` the max-norm distance from ``x_i`` to its ``k``-th nearest neighbour within the class
    (duplicates count, at distance 0), ``r_min`` = `min_dist` (1.0, the official default floor on distances)
    and ``psi`` the digamma function. Then

    .. math::
        \mathrm{TMI} = \frac{1}{|C'|} \sum_{c \in C'} \frac{n_c}{N} \hat H_c,

    the mean over the classes ``C'`` that have more than `k` samples (the official code averages over the
    classes with a finite estimate; it counts one-sample classes as 0, here they are left out like the other
    classes too small to have a k-th neighbour). Higher (more intra-class variance) is better, as in the paper.
    The value is in nats and unbounded; it grows like ``D log(scale)`` with the feature scale and the
    `min_dist` floor is in feature units, so compare models on comparably scaled features.

    Distances are exact (``torch.cdist``, chunked): ``O(sum_c n_c^2 D)`` time.
    """
    if k < 1:
        raise SelectionInputError(f"k: {k} must be at least 1")
    if min_dist <= 0:
        raise SelectionInputError(f"min_dist: {min_dist} must be positive (log of the distances)")
    f, y = features_and_labels(features, labels)
    n, d = f.shape
    x = f - f.mean(0, keepdim=True)
    order = torch.argsort(y.index, stable=True)
    counts = y.counts.tolist()
    terms = []
    for nc, part in zip(counts, torch.split(x[order], counts)):
        if nc <= k:
            continue
        r = _kth_neighbour_max_norm(part, k).clamp_min(min_dist)
        h = (
            torch.special.digamma(torch.tensor(float(nc), dtype=x.dtype))
            - torch.special.digamma(torch.tensor(float(k), dtype=x.dtype))
            + d / nc * torch.log(2 * r).sum().cpu()
        )
        terms.append(nc / n * float(h))
    if not terms:
        raise SelectionInputError(
            f"labels: no class has more than k={k} samples, so no k-th neighbour exists; "
            "collect more samples per class or pass a smaller k"
        )
    return math.fsum(terms) / len(terms)


def _kth_neighbour_max_norm(x: torch.Tensor, k: int) -> torch.Tensor:
    """Max-norm distance from each row to its k-th nearest other row (the point itself excluded once)."""
    n = x.shape[0]
    out = torch.empty(n, dtype=x.dtype, device=x.device)
    step = max(1, (1 << 24) // max(1, n))
    for start in range(0, n, step):
        dist = torch.cdist(x[start : start + step], x, p=float("inf"))
        out[start : start + step] = dist.kthvalue(k + 1, dim=1).values  # k + 1: the zero self-distance
    return out
