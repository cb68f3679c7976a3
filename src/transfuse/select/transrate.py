"""TransRate: how much the coding rate of the features drops once the class labels are known."""

from __future__ import annotations

import torch

from transfuse.select._validate import SelectionInputError, features_and_labels


def transrate(features, labels, *, eps: float = 1e-4, normalize: bool = True) -> float:
    r"""TransRate (Huang, Huang, Rong, Yang, Wei: "Frustratingly Easy Transferability Estimation", ICML 2022).

    .. math::
        \mathrm{TrR} = R(Z, \epsilon) - \sum_c \frac{n_c}{N} R(Z_c, \epsilon), \quad
        R(Z, \epsilon) = \tfrac12 \log\det\Big(I + \frac{1}{n\,\epsilon} Z^\top Z\Big),

    where ``Z`` [N, D] are the features centered on their mean and, with `normalize` (default, as the
    official code), each row scaled to unit L2 norm afterwards; ``Z_c`` are the ``n_c`` rows of class ``c``
    (not re-centered) and ``n`` is the number of rows of the matrix at hand. `eps` is the official code's
    ``eps`` (the paper's ``epsilon^2 / d``). Higher is better; range ``[0, inf)`` (``R`` is concave in
    ``Z^T Z / n``, so the class-weighted rates never exceed the total), with normalized rows at most
    ``(D/2) log(1 + 1/(D eps))``.

    Choices: the class rates are weighted by ``n_c / N`` as in the paper and the official eigenvalue code;
    the short snippet in the paper's appendix (copied by most toolkits) averages them with weight ``1/C``
    and does not normalize rows (``normalize=False`` gives its ``R(Z)``). Each log-determinant is a Cholesky
    factorization of the smaller of ``I + Z^T Z / (n eps)`` and ``I + Z Z^T / (n eps)`` (equal determinants).
    """
    if eps <= 0:
        raise SelectionInputError(f"eps: {eps} must be positive")
    f, y = features_and_labels(features, labels)
    n = f.shape[0]
    z = f - f.mean(0, keepdim=True)
    if normalize:
        z = z / z.norm(dim=1, keepdim=True).clamp_min(torch.finfo(z.dtype).tiny)
    total = _coding_rate(z, eps)
    order = torch.argsort(y.index, stable=True)
    counts = y.counts.tolist()
    parts = torch.split(z[order], counts)
    conditional = sum(nc / n * _coding_rate(part, eps) for nc, part in zip(counts, parts))
    return float(total - conditional)


def _coding_rate(z: torch.Tensor, eps: float) -> float:
    n, d = z.shape
    gram = z @ z.T if n < d else z.T @ z
    a = torch.eye(gram.shape[0], dtype=z.dtype, device=z.device) + gram / (n * eps)
    chol = torch.linalg.cholesky(a)
    return float(torch.log(torch.diagonal(chol)).sum())  # (1/2) log det = sum log diag(L)
