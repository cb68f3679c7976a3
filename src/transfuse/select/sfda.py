"""SFDA: a shrunk Fisher/LDA classifier on the features, refit after a self-challenging confidence mix."""

from __future__ import annotations

import math

import torch

from transfuse.select._validate import (
    Labels,
    SelectionInputError,
    class_means,
    features_and_labels,
    symmetric_eigh,
)


def sfda(features, labels) -> float:
    r"""SFDA (Shao, Zhao, Ge, Lin, Shan, Zhang, Li: "Not All Models Are Equal: Predicting Model Transferability
    in a Self-challenging Fisher Space", ECCV 2022).

    1. **Regularized Fisher space.** With class priors ``pi_c = n_c/N``, class means ``mu_c`` and the
       within-class scatter ``S_w = sum_c pi_c cov_c`` (``1/n_c`` covariances), the shrinkage is set
       automatically from the largest eigenvalue of ``S_w``: ``lambda = max(exp(-5 lambda_max(S_w)), 1e-10)``,
       and ``S_w(lambda) = (1 - lambda) S_w + lambda (tr S_w / D) I``. The official code solves
       ``S_b v = e S_w(lambda) v`` and keeps **all** ``D`` eigenvectors ``V`` (``V^T S_w(lambda) V = I``), so its
       classifier weights ``mu_c V V^T`` equal ``mu_c S_w(lambda)^{-1}``; they are computed that way here.
       Class scores ``s_c(x) = x^T S_w(lambda)^{-1} mu_c - mu_c^T S_w(lambda)^{-1} mu_c / 2 + log pi_c`` and
       ``p(c | x) = softmax_c s_c(x)``.
    2. **Self-challenging (ConfMix).** With ``q_i = softmax(p(. | x_i))[y_i]`` (the official code softens the
       probabilities with a second softmax), each sample is pulled towards the mean of the *other* classes'
       means: ``x~_i = q_i x_i + (1 - q_i) mean_{c != y_i} mu_c``.
    3. Step 1 is refit on the mixed features ``x~`` with the same ``lambda``, and

    .. math::
        \mathrm{SFDA} = \frac1N \sum_i \log p(y_i \mid \tilde x_i).

    Higher is better; range ``(-inf, 0]``. Difference from the official code: it averages the probabilities
    ``p(y_i | x~_i)`` themselves (its comment: "the log function is ignored in case of instability"); here the
    paper's log-likelihood is kept and computed stably with ``log_softmax``. ``lambda_max`` is exact here (the
    official code runs three power-iteration steps).
    """
    f, y = features_and_labels(features, labels)
    log_prior = torch.log(y.counts.to(f.dtype) / f.shape[0])
    means = class_means(f, y)
    scatter = _within_scatter(f, means, y)
    evals, evecs = symmetric_eigh(scatter)
    lam = max(math.exp(-5 * float(evals[-1].clamp_min(0))), 1e-10)
    prob = torch.softmax(_scores(f, means, log_prior, evals, evecs, lam), dim=1)
    q = torch.softmax(prob, dim=1).gather(1, y.index[:, None])  # [N, 1]
    c = y.num_classes
    others = (means.sum(0, keepdim=True) - means) / (c - 1)  # mean of the other classes' means [C, D]
    mixed = q * f + (1 - q) * others[y.index]
    means = class_means(mixed, y)
    evals, evecs = symmetric_eigh(_within_scatter(mixed, means, y))
    log_prob = torch.log_softmax(_scores(mixed, means, log_prior, evals, evecs, lam), dim=1)
    return float(log_prob.gather(1, y.index[:, None]).mean())


def _within_scatter(f: torch.Tensor, means: torch.Tensor, y: Labels) -> torch.Tensor:
    """``sum_c pi_c cov_c`` with ``1/n_c`` covariances = ``(1/N) sum_i (x_i - mu_{y_i})(x_i - mu_{y_i})^T``."""
    r = f - means[y.index]
    return r.T @ r / f.shape[0]


def _scores(f, means, log_prior, evals, evecs, lam: float) -> torch.Tensor:
    d = f.shape[1]
    shrunk = (1 - lam) * evals.clamp_min(0) + lam * float(evals.clamp_min(0).sum()) / d
    if float(shrunk.min()) <= 0:
        raise SelectionInputError(
            "features: every class is a single repeated point (zero within-class scatter); SFDA is undefined"
        )
    w = (means @ evecs) / shrunk @ evecs.T  # mu_c S_w(lambda)^{-1}  [C, D]
    return f @ w.T - 0.5 * (w * means).sum(1)[None, :] + log_prior[None, :]
