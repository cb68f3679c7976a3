"""H-score and its Ledoit-Wolf shrinkage version: how much of the feature covariance the class means explain."""

from __future__ import annotations

import torch

from transfuse.select._validate import Labels, features_and_labels, symmetric_eigh


def h_score(features, labels) -> float:
    r"""H-score (Bao, Li, Huang, Zheng, Wang, Zhang, Tong: "An Information-Theoretic Approach to Transferability
    in Task Transfer Learning", ICIP 2019).

    .. math::
        \mathcal{H} = \operatorname{tr}\big(\operatorname{cov}(f)^{+}\, \operatorname{cov}(\mathbb{E}[f \mid y])\big),

    with ``cov(f)`` the feature covariance, ``^+`` the pseudo-inverse (eigenvalues below ``max(N, D) * eps``
    times the largest are dropped) and ``cov(E[f|y]) = sum_c (n_c/N)(mu_c - mu)(mu_c - mu)^T`` the covariance
    of the class means (both with the ``1/N`` normalization, so the ``N`` vs ``N-1`` choice of the reference
    code cancels). Higher is better; range ``[0, min(D, C - 1)]``: each term of the trace is a squared
    correlation between a whitened feature direction and the labels.

    Computed from the eigendecomposition of the smaller of the two centered Gram matrices, so ``N < D`` costs
    ``O(N^2 D)``: the class means lie in the row space of the features and only that subspace matters.
    """
    f, y = features_and_labels(features, labels)
    lam, w = _spectrum(f, y)
    keep = lam > lam.max() * max(f.shape) * torch.finfo(f.dtype).eps
    return float((w[keep] / lam[keep]).sum())


def shrinkage_h_score(features, labels) -> float:
    r"""Shrinkage-based H-score (Ibrahim, Ponomareva, Mazumder: "Newer is not always better: Rethinking
    transferability metrics, their peculiarities, stability and performance", ECML-PKDD 2022; the
    ``regularized H-score`` of the reference code).

    .. math::
        \mathcal{H}_\alpha = \operatorname{tr}\big(\Sigma_\alpha^{-1} (1 - \alpha)
        \operatorname{cov}(\mathbb{E}[f \mid y])\big), \quad
        \Sigma_\alpha = (1 - \alpha) S + \alpha \frac{\operatorname{tr} S}{D} I,

    with ``S`` the (``1/N``) feature covariance and ``alpha`` the Ledoit-Wolf shrinkage coefficient (Ledoit &
    Wolf 2004, the estimator of scikit-learn's ``ledoit_wolf``): for the centered rows ``x_i``,
    ``mu = tr(S)/D``, ``b = (1/(N^2 D)) sum_i ||x_i x_i^T - S||_F^2 = ((1/N) sum_i ||x_i||^4 - ||S||_F^2) / (N D)``,
    ``d = ||S - mu I||_F^2 / D``, ``alpha = min(b, d) / d``. Higher is better; range ``[0, min(D, C - 1))``.
    Unlike :func:`h_score` it stays stable when ``D`` approaches or exceeds ``N``.

    The reference code divides the class-mean covariance by ``N - 1`` and the Ledoit-Wolf estimate by ``N``;
    here both use ``1/N`` (the reference value is ``N / (N - 1)`` times this one).
    """
    f, y = features_and_labels(features, labels)
    n, d = f.shape
    fc = f - f.mean(0, keepdim=True)
    lam, w = _spectrum(f, y)  # nonzero part of S's spectrum and the class-mean weights on it
    alpha = _ledoit_wolf_shrinkage(fc, lam)
    mu = float(lam.sum()) / d
    if mu <= 0:
        return 0.0
    return float(((1 - alpha) * w / ((1 - alpha) * lam + alpha * mu)).sum())


def _ledoit_wolf_shrinkage(fc: torch.Tensor, lam: torch.Tensor) -> float:
    """Ledoit-Wolf shrinkage of centered rows `fc` [N, D], given the eigenvalues `lam` of ``S = fc^T fc / N``
    (its zero eigenvalues may be left out)."""
    n, d = fc.shape
    mu = float(lam.sum()) / d
    s_norm2 = float((lam * lam).sum())  # ||S||_F^2
    fourth = float(((fc * fc).sum(1) ** 2).sum())  # sum_i ||x_i||^4
    b = (fourth / n - s_norm2) / (n * d)
    delta = (s_norm2 - d * mu * mu) / d  # ||S - mu I||_F^2 / D
    if delta <= 0:
        return 0.0  # S is already a multiple of I
    return min(max(b, 0.0), delta) / delta


def _spectrum(f: torch.Tensor, y: Labels) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues ``lam_i`` of the covariance ``S`` (1/N) and ``w_i = ||v_i^T M||^2`` for its eigenvectors
    ``v_i``, with ``M = [sqrt(n_c/N) (mu_c - mu)]`` [D, C] so that ``cov(E[f|y]) = M M^T``.

    From the smaller Gram matrix: with ``N <= D`` only the (at most N) eigen-directions in the row space of the
    centered features are returned, which hold all of ``M``."""
    n, d = f.shape
    fc = f - f.mean(0, keepdim=True)
    counts = y.counts.to(f.dtype)
    if n <= d:
        # fc = U s V^T; M = fc^T B with B[i, c] = [y_i = c] sqrt(n_c/N) / n_c, so v_i^T M = s_i u_i^T B.
        g, u = symmetric_eigh(fc @ fc.T)
        g = g.clamp_min(0)
        b = y.one_hot(f.dtype) * ((counts / n).sqrt() / counts)[None, :]
        w = g * ((u.T @ b) ** 2).sum(1)
        return g / n, w
    g, v = symmetric_eigh(fc.T @ fc)
    sums = torch.zeros(y.num_classes, d, dtype=f.dtype, device=f.device).index_add_(0, y.index, fc)
    m = (sums / counts[:, None]) * (counts / n).sqrt()[:, None]  # [C, D] rows sqrt(pi_c) (mu_c - mu)
    w = ((v.T @ m.T) ** 2).sum(1)
    return g.clamp_min(0) / n, w
