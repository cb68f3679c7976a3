"""LogME: the maximum log evidence of a Bayesian linear model from features to one-hot labels."""

from __future__ import annotations

import math

import torch

from transfuse.select._validate import SelectionInputError, features_and_labels, symmetric_eigh


def logme(features, labels, *, max_iter: int = 200, tol: float = 1e-10) -> float:
    r"""LogME (You, Liu, Wang, Long: "LogME: Practical Assessment of Pre-trained Models for Transfer Learning",
    ICML 2021).

    For each class ``c`` the one-hot column ``y_c`` is modelled as ``y_c = F w + noise``, ``w ~ N(0, I/alpha)``,
    ``noise ~ N(0, I/beta)``, with ``F`` the features [N, D] (used as given: no centering or scaling). Its log
    evidence is

    .. math::
        \mathcal{L}(\alpha, \beta) = \tfrac{D}{2}\log\alpha + \tfrac{N}{2}\log\beta - \tfrac{N}{2}\log 2\pi
        - \tfrac{\beta}{2}\lVert F m - y\rVert^2 - \tfrac{\alpha}{2} m^\top m - \tfrac12 \log\lvert A\rvert,
        \quad A = \alpha I_D + \beta F^\top F,\ m = \beta A^{-1} F^\top y,

    maximized over ``alpha, beta > 0``. The score is ``(1/C) sum_c max L_c / N``. Higher is better; the range
    is unbounded on both sides (typically about -2 to 2 for normalized features).

    ``log|A|`` runs over all ``D`` eigenvalues of ``F^T F``, zeros included: ``sum_{i<=k} log(alpha +
    beta sigma_i) + (D - k) log alpha`` for rank ``k``. The reference code (thuml/LogME) keeps only the ``k``
    nonzero ones, so its value carries an extra ``(D - k) log(alpha) / (2N)`` whenever ``N < D`` or the
    features are rank-deficient; here the evidence is the exact one at every shape.

    Computation (float64): one eigendecomposition of the smaller of ``F^T F`` and ``F F^T``; then, for all
    classes at once, the maximization over ``t = alpha / beta`` of the evidence with ``beta`` at its optimum
    ``N / (|Fm - y|^2 + t |m|^2)``. MacKay's fixed point ``alpha = gamma / |m|^2``, ``beta = (N - gamma) /
    |Fm - y|^2`` (``gamma = sum_i beta sigma_i / (alpha + beta sigma_i)``, the update of the reference code) is
    exactly the stationarity condition of that profile; the iteration takes Newton steps on ``log t`` where the
    profile is concave and fixed-point steps elsewhere, halving any step that would lower the evidence, until
    ``log t`` moves by less than `tol` (or `max_iter` steps; the reference stops after 11 steps or a 0.1%
    change). Where the evidence keeps rising towards ``alpha -> inf`` (no signal) or ``beta -> inf`` (exact
    interpolation, possible when ``N <= D``), ``t`` stops ``e^35`` away from the mean eigenvalue, where the
    evidence equals its limit to many digits.
    """
    f, y = features_and_labels(features, labels)
    n, d = f.shape
    counts = y.counts.to(f.dtype)  # |y_c|^2 of the one-hot columns
    if n <= d:  # N x N Gram: F F^T = U diag(sigma) U^T, x = U^T y (U is square: no residual outside it)
        sigma, u = symmetric_eigh(f @ f.T)
        x2 = (u.T @ y.one_hot(f.dtype)) ** 2  # [N, C]
        g2 = None
    else:  # D x D Gram: F^T F = V diag(sigma) V^T, g = V^T F^T y = sqrt(sigma) x
        sigma, v = symmetric_eigh(f.T @ f)
        g2 = (v.T @ _class_sums_t(f, y)) ** 2  # [D, C]
        x2 = None
    k = sigma.numel()
    sigma = sigma.clamp_min(0)
    zero = sigma <= sigma.max() * max(n, d) * torch.finfo(f.dtype).eps
    sigma = sigma.masked_fill(zero, 0.0)[:, None]  # [k, 1]
    if g2 is not None:
        g2 = g2.masked_fill(zero[:, None], 0.0)
    else:
        g2 = sigma * x2  # (v_i^T F^T y)^2 = sigma_i x_i^2
    tiny = torch.finfo(f.dtype).tiny

    def energy_of(t: torch.Tensor) -> torch.Tensor:
        """E(t) = |Fm - y|^2 + t |m|^2 at t = alpha / beta, [C]: the profile evidence is a function of it."""
        if x2 is not None:
            return (x2 * (t / (t + sigma))).sum(0)
        return (counts - (g2 / (t + sigma)).sum(0)).clamp_min(0)

    def profile(s: torch.Tensor) -> torch.Tensor:
        """The evidence maximized over beta at t = exp(s), up to a constant: the function to maximize."""
        t = torch.exp(s)
        return -0.5 * torch.log1p(sigma / t).sum(0) - n / 2 * torch.log(energy_of(t).clamp_min(tiny))

    # Iterate on s = log t. MacKay's fixed point t <- gamma |Fm - y|^2 / ((N - gamma) |m|^2) is the
    # stationarity condition of the profile evidence L(s); its step and the Newton step (where L is concave)
    # both point up the gradient. Take Newton where L is concave (quadratic convergence), the fixed-point
    # step elsewhere, halved until L does not decrease.
    scale = float(sigma.sum()) / max(1, int((~zero).sum()))
    if scale <= 0:
        raise SelectionInputError("features: every value is 0; LogME needs features that vary")
    s_lo, s_hi = math.log(scale) - 35.0, math.log(scale) + 35.0
    s = torch.full((y.num_classes,), math.log(scale), dtype=f.dtype, device=f.device)
    current = profile(s)
    active = torch.ones_like(s, dtype=torch.bool)
    for _ in range(max_iter):
        t = torch.exp(s)
        inv = 1.0 / (t + sigma)  # [k, C]
        gamma = (sigma * inv).sum(0)
        energy = energy_of(t).clamp_min(tiny)
        m2 = (g2 * inv * inv).sum(0)  # |m|^2 = dE/dt
        res2 = (energy - t * m2).clamp_min(0)
        grad = 0.5 * (gamma - n * t * m2 / energy)  # dL/ds
        tm2 = t * m2
        dtm2 = tm2 - 2 * t * t * (g2 * inv**3).sum(0)  # d(t |m|^2)/ds
        hess = 0.5 * (-(t * sigma * inv * inv).sum(0) - n * (dtm2 / energy - (tm2 / energy) ** 2))
        fixed = (
            torch.log((gamma * res2).clamp_min(tiny) / ((n - gamma).clamp_min(tiny) * m2).clamp_min(tiny)) - s
        )
        newton = -grad / torch.where(hess < 0, hess, -1.0)
        step = torch.where(hess < 0, newton, fixed).clamp(-5.0, 5.0)
        step = torch.where(active, (s + step).clamp(s_lo, s_hi) - s, 0.0)
        for _ in range(40):  # backtracking: never let the evidence go down
            candidate = profile(s + step)
            worse = candidate < current - 1e-13 * current.abs()
            if not bool(worse.any()):
                break
            step = torch.where(worse, step / 2, step)
        step = torch.where(worse, 0.0, step)  # no ascent found (rounding level): stay
        s = s + step
        current = torch.where(worse, current, candidate)
        active = active & (step.abs() > tol)
        if not bool(active.any()):
            break

    t = torch.exp(s)
    energy = energy_of(t)
    beta = n / energy.clamp_min(tiny)
    alpha = t * beta
    logdet = torch.log(alpha + beta * sigma).sum(0) + (d - k) * torch.log(alpha)
    evidence = (
        d / 2 * torch.log(alpha)
        + n / 2 * torch.log(beta)
        - 0.5 * logdet
        - 0.5 * beta * energy
        - n / 2 * math.log(2 * math.pi)
    )
    return float((evidence / n).mean())


def _class_sums_t(f: torch.Tensor, y) -> torch.Tensor:
    """``F^T Y`` [D, C] for one-hot ``Y`` without building ``Y``: the per-class feature sums."""
    out = torch.zeros(y.num_classes, f.shape[1], dtype=f.dtype, device=f.device)
    return out.index_add_(0, y.index, f).T
