"""GBC: (minus) the total pairwise Bhattacharyya overlap of per-class Gaussians in a PCA space."""

from __future__ import annotations

import torch

from transfuse.select._validate import SelectionInputError, class_means, features_and_labels, pca

MIN_VARIANCE = 1e-4  # the reference code's floor on per-dimension variances (constant features)


def gbc(features, labels, *, n_components: int = 64, gaussian: str = "diagonal") -> float:
    r"""GBC (Pándy, Agostinelli, Uijlings, Ferrari, Mensink: "Transferability Estimation using Bhattacharyya
    Class Separability", CVPR 2022).

    The centered features are projected on their top ``min(n_components, D, N)`` principal axes (64 as in
    the paper), each class ``c`` is modelled as a Gaussian with mean ``mu_c`` and diagonal covariance
    ``diag(s_c)`` (per-dimension population variances, floored at 1e-4 as the reference code), and

    .. math::
        D_B(i, j) = \tfrac18 \sum_d \frac{(\mu_{i,d} - \mu_{j,d})^2}{\bar s_d}
        + \tfrac12 \Big(\sum_d \log \bar s_d - \tfrac12 \sum_d \log s_{i,d} - \tfrac12 \sum_d \log s_{j,d}\Big),
        \quad \bar s = \tfrac{s_i + s_j}{2},

    .. math::
        \mathrm{GBC} = -\sum_{i \ne j} e^{-D_B(i, j)}.

    Higher (less class overlap) is better; range ``[-C(C - 1), 0]``. ``gaussian="spherical"`` replaces each
    ``s_c`` by its mean over dimensions (the reference code's other option, and its default in the source
    selection experiments).
    """
    if gaussian not in ("diagonal", "spherical"):
        raise SelectionInputError(f"gaussian: {gaussian!r} is not 'diagonal' or 'spherical'")
    if n_components < 1:
        raise SelectionInputError(f"n_components: {n_components} must be at least 1")
    f, y = features_and_labels(features, labels)
    z = pca(f, n_components=n_components)
    means = class_means(z, y)  # [C, d]
    var = class_means((z - means[y.index]) ** 2, y).clamp_min(MIN_VARIANCE)
    if gaussian == "spherical":
        var = var.mean(1, keepdim=True).expand_as(var)
    log_var = torch.log(var).sum(1)  # [C]
    c, d = means.shape
    total = torch.zeros((), dtype=z.dtype, device=z.device)
    step = max(1, (1 << 22) // max(1, c * d))  # rows of the [C, C, d] pair tensor per chunk
    for start in range(0, c, step):
        rows = slice(start, min(c, start + step))
        avg = (var[rows, None, :] + var[None, :, :]) / 2  # [r, C, d]
        maha = ((means[rows, None, :] - means[None, :, :]) ** 2 / avg).sum(-1) / 8
        dist = maha + 0.5 * (torch.log(avg).sum(-1) - 0.5 * log_var[rows, None] - 0.5 * log_var[None, :])
        coeff = torch.exp(-dist)
        idx = torch.arange(rows.start, rows.stop, device=z.device)
        coeff[idx - rows.start, idx] = 0.0  # i == j
        total = total + coeff.sum()
    return float(-total)
