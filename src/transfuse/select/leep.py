"""LEEP and N-LEEP: the log expected empirical prediction of a source classifier (or of a Gaussian mixture fit
on the features) re-mapped to the target labels."""

from __future__ import annotations

import math

import torch

from transfuse.select._validate import (
    Labels,
    SelectionInputError,
    as_labels,
    as_matrix,
    as_probabilities,
    pca,
)


def leep(source_probs, labels) -> float:
    r"""LEEP (Nguyen, Hassner, Seeger, Archambeau: "LEEP: A New Measure to Evaluate Transferability of Learned
    Representations", ICML 2020).

    `source_probs` [N, Z] are the source model's predicted probabilities over its own label set (softmax of its
    logits; rows must sum to 1), `labels` [N] the target labels. With the empirical joint
    ``P(y, z) = (1/N) sum_{i: y_i = y} theta_i(z)``, ``P(z) = sum_y P(y, z)`` and ``P(y | z) = P(y, z) / P(z)``:

    .. math::
        \mathrm{LEEP} = \frac1N \sum_i \log \sum_z P(y_i \mid z)\, \theta_i(z).

    Higher is better; range ``(-inf, 0]``. It is 0 when the source predictions are deterministic and map
    one-to-one onto the target classes, and ``-H(Y)`` (the entropy of the target label frequencies, in nats)
    when every row is uniform. Source labels that no sample predicts (``P(z) = 0``) drop out.
    """
    theta = as_probabilities(source_probs, "source_probs")
    y = as_labels(labels, theta.shape[0], device=theta.device)
    return _leep(theta, y)


def _leep(theta: torch.Tensor, y: Labels) -> float:
    n = theta.shape[0]
    joint = torch.zeros(y.num_classes, theta.shape[1], dtype=theta.dtype, device=theta.device)
    joint.index_add_(0, y.index, theta)  # N * P(y, z)  [C, Z]
    marginal = joint.sum(0, keepdim=True)  # N * P(z)
    cond = torch.where(
        marginal > 0, joint / marginal.clamp_min(torch.finfo(theta.dtype).tiny), 0.0
    )  # P(y | z)
    eep = (theta * cond[y.index]).sum(1)  # sum_z P(y_i | z) theta_i(z) > 0: sample i itself feeds P(y_i, z)
    return float(torch.log(eep).sum() / n)


def nleep(
    features,
    labels,
    *,
    n_components: int | None = None,
    variance: float = 0.8,
    seed: int = 0,
    max_iter: int = 100,
    tol: float = 1e-3,
) -> float:
    r"""N-LEEP (Li, Jia, Sun, Hsieh, Chen, Mensink, Frey, Hu, Zhang: "Ranking Neural Checkpoints", CVPR 2021).

    LEEP with the source classifier replaced by a Gaussian mixture fit on the target features: the features are
    centered and projected on the principal axes that explain more than `variance` (0.8) of their variance, a
    mixture of `n_components` Gaussians (default ``5 * C``, as in the paper and the reference implementations;
    at most N) is fit by EM, and its posteriors ``p(k | x_i)`` take the place of ``theta_i(z)`` in
    :func:`leep`. Higher is better; range ``(-inf, 0]``.

    The mixture has **diagonal** covariances (scikit-learn's default, used by the reference code, is full
    covariance: ``K`` full ``d x d`` matrices, too slow at ``K = 5C`` components in hundreds of dimensions).
    Initialization as scikit-learn's ``init_params="kmeans"``: k-means++ seeding, at most 10 Lloyd steps, one
    M-step from the hard assignment. EM stops when the mean log-likelihood changes by less than `tol` or after
    `max_iter` steps; covariances get ``+1e-6`` (scikit-learn's ``reg_covar``). Deterministic for a given
    `seed`, but the mixture (and so the score) depends on the seed and, through the seeding, on the row order.
    """
    f = as_matrix(features, "features")
    y = as_labels(labels, f.shape[0], device=f.device)
    if not 0 < variance <= 1:
        raise SelectionInputError(
            f"variance: {variance} is not in (0, 1]; pass the share of variance PCA keeps"
        )
    k = 5 * y.num_classes if n_components is None else int(n_components)
    if k < 1:
        raise SelectionInputError(f"n_components: {n_components} must be at least 1")
    k = min(k, f.shape[0])
    z = pca(f, variance=variance)
    posteriors = _diagonal_gmm_posteriors(z, k, seed=seed, max_iter=max_iter, tol=tol)
    return _leep(posteriors, y)


# ----------------------------------------------------------------------------------- diagonal Gaussian mixture

REG_COVAR = 1e-6


def _kmeans_init(x: torch.Tensor, k: int, gen: torch.Generator, lloyd_steps: int = 10) -> torch.Tensor:
    """Hard cluster assignment [N] from k-means++ seeding and a few Lloyd steps."""
    n = x.shape[0]
    sq = (x * x).sum(1)
    first = int(torch.randint(n, (1,), generator=gen))
    centers = [first]
    closest = (sq - 2 * x @ x[first] + sq[first]).clamp_min(0)
    for _ in range(1, k):
        total = closest.sum()
        if total <= 0:  # fewer distinct points than clusters: take any unused point
            weights = torch.ones_like(closest)
            weights[centers] = 0
        else:
            weights = closest
        nxt = int(torch.multinomial(weights.cpu(), 1, generator=gen))
        centers.append(nxt)
        closest = torch.minimum(closest, (sq - 2 * x @ x[nxt] + sq[nxt]).clamp_min(0))
    c = x[centers].clone()
    assign = None
    for _ in range(lloyd_steps):
        dist = sq[:, None] - 2 * x @ c.T + (c * c).sum(1)[None, :]
        new = dist.argmin(1)
        if assign is not None and bool((new == assign).all()):
            break
        assign = new
        counts = torch.bincount(assign, minlength=k).to(x.dtype)
        sums = torch.zeros_like(c).index_add_(0, assign, x)
        c = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], c)  # empty: keep the center
    return assign


def _m_step(x: torch.Tensor, x2: torch.Tensor, resp: torch.Tensor):
    eps = 10 * torch.finfo(x.dtype).eps
    nk = resp.sum(0) + eps  # [K]
    means = resp.T @ x / nk[:, None]
    var = (resp.T @ x2 / nk[:, None] - means * means).clamp_min(0) + REG_COVAR
    return nk / x.shape[0], means, var


def _log_joint(x: torch.Tensor, x2: torch.Tensor, weights, means, var) -> torch.Tensor:
    """log w_k + log N(x_i | mu_k, diag var_k), [N, K], with two matrix products."""
    prec = 1.0 / var
    quad = x2 @ prec.T - 2 * x @ (means * prec).T + (means * means * prec).sum(1)[None, :]
    log_norm = -0.5 * (x.shape[1] * math.log(2 * math.pi) + torch.log(var).sum(1))
    return torch.log(weights)[None, :] + log_norm[None, :] - 0.5 * quad


def _diagonal_gmm_posteriors(
    x: torch.Tensor, k: int, *, seed: int, max_iter: int, tol: float
) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x2 = x * x
    assign = _kmeans_init(x, k, gen)
    resp = torch.nn.functional.one_hot(assign, k).to(x.dtype)
    params = _m_step(x, x2, resp)
    previous = -math.inf
    for _ in range(max_iter):
        log_joint = _log_joint(x, x2, *params)
        log_norm = torch.logsumexp(log_joint, dim=1, keepdim=True)
        bound = float(log_norm.mean())
        resp = torch.exp(log_joint - log_norm)
        params = _m_step(x, x2, resp)
        if abs(bound - previous) < tol:
            break
        previous = bound
    log_joint = _log_joint(x, x2, *params)
    return torch.softmax(log_joint, dim=1)
