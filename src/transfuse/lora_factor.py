"""Truncated SVD of one weight delta into LoRA factors: the math of ``transfuse lora extract``.

For a delta ``Δ = W_ft − W_base`` of shape ``[m, n]`` with singular values ``σ_1 ≥ σ_2 ≥ ...``::

    Δ ≈ B A,   B = U_r S_r^(1/2),  A = S_r^(1/2) V_rᵀ        (split="sqrt", the default)
               B = U_r S_r,        A = V_rᵀ                  (split="b")

so ``B A = U_r S_r V_rᵀ`` either way, the best rank-r approximation (Eckart–Young): its error is
``‖Δ − B A‖_F = sqrt(Σ_{i>r} σ_i²)``.  With ``energy=e`` the rank is the smallest r whose kept share
``Σ_{i≤r} σ_i² / ‖Δ‖_F²`` reaches e, capped at ``rank``.  The factors are written with ``lora_alpha = r``, so PEFT's
scale ``alpha / r`` is 1 and ``W_base + B A`` is the approximation itself.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

SVD_METHODS = ("exact", "randomized")
SCALE_SPLITS = ("sqrt", "b")


@dataclass(frozen=True)
class LowRankFactors:
    """``b`` [m, r] and ``a`` [r, n] with ``b @ a ≈ delta``; the norms are those of the factors as returned (after
    the cast to their dtype), measured against the float32 delta."""

    b: torch.Tensor
    a: torch.Tensor
    delta_norm: float
    error_norm: float

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])

    @property
    def relative_error(self) -> float:
        """``‖Δ − B A‖_F / ‖Δ‖_F`` (0 for a zero delta)."""
        return self.error_norm / self.delta_norm if self.delta_norm > 0 else 0.0


def rank_for_energy(singular_values: torch.Tensor, total_energy: float, energy: float) -> int | None:
    """The smallest r with ``Σ_{i≤r} σ_i² ≥ energy · total_energy`` (to a relative 1e-6, float32's precision, so
    ``energy=1`` stops at the numerical rank), or None when the given singular values (a leading part of the
    spectrum, e.g. from a randomized SVD) do not reach it."""
    if total_energy <= 0:
        return 1
    kept = torch.cumsum(singular_values.double() ** 2, 0)
    reached = torch.nonzero(kept >= energy * total_energy * (1 - 1e-6))
    return int(reached[0, 0]) + 1 if len(reached) else None


@contextmanager
def one_cpu_thread(device: torch.device) -> Iterator[None]:
    """Run the enclosed CPU ops on one intra-op thread, restoring the count after.  torch's threaded LAPACK is
    pathological on thin matrices: on the 2-core dev machine (with other processes running) a QR of
    1536×40 took 560 ms on 2 threads and 8 ms on one, the SVD of 40×1536 960 ms against 9 ms, the full SVD of
    1536×1536 6.4-13.6 s against 3.7 s."""
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def randomized_svd(
    matrix: torch.Tensor, q: int, *, oversample: int, power_iterations: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The leading ``q`` singular triplets ``U [m, q], S [q], Vh [q, n]`` of ``matrix`` by a randomized range
    finder (Halko, Martinsson & Tropp 2011, algorithm 4.4): ``Y = (Δ Δᵀ)^p Δ Ω`` for a Gaussian ``Ω`` of
    ``q + oversample`` columns, re-orthonormalised after every product; then the exact SVD of ``Qᵀ Δ``."""
    m, n = matrix.shape
    k = min(q + oversample, m, n)
    omega = torch.randn(n, k, generator=generator, device="cpu").to(matrix.device)

    def orthonormal(columns: torch.Tensor) -> torch.Tensor:
        with one_cpu_thread(columns.device):
            return torch.linalg.qr(columns).Q

    basis = orthonormal(matrix @ omega)
    for _ in range(power_iterations):
        basis = orthonormal(matrix.T @ basis)
        basis = orthonormal(matrix @ basis)
    small = basis.T @ matrix
    with one_cpu_thread(small.device):
        u_small, s, vh = torch.linalg.svd(small, full_matrices=False)
    return (basis @ u_small)[:, :q], s[:q], vh[:q]


def low_rank_factors(
    delta: torch.Tensor,
    *,
    rank: int,
    energy: float | None = None,
    svd: str = "randomized",
    oversample: int = 8,
    power_iterations: int = 4,
    split: str = "sqrt",
    dtype: torch.dtype | None = None,
    generator: torch.Generator | None = None,
) -> LowRankFactors:
    """Factor a 2-D ``delta`` (any float dtype, on any device; computed in float32) as ``B A`` of rank
    ``min(rank, m, n)``, or with ``energy`` the smallest rank keeping that share of ``‖Δ‖_F²``, at most ``rank``.

    ``svd="exact"`` is ``torch.linalg.svd``; ``"randomized"`` is :func:`randomized_svd` with ``oversample`` extra
    columns and ``power_iterations`` (it falls back to the exact SVD when the rank asked for is more than a
    quarter of ``min(m, n)``, where a randomized SVD saves nothing).  ``b`` and ``a`` are returned in ``dtype``
    (default: the delta's).  The reported error is measured on the returned factors: ``‖Δ − B A‖_F``.
    """
    if delta.ndim != 2:
        raise ValueError(f"delta must be 2-D, got shape {tuple(delta.shape)}")
    if svd not in SVD_METHODS:
        raise ValueError(f"svd must be one of {', '.join(SVD_METHODS)}, got {svd!r}")
    if split not in SCALE_SPLITS:
        raise ValueError(f"split must be one of {', '.join(SCALE_SPLITS)}, got {split!r}")
    out_dtype = dtype or delta.dtype
    work = delta.to(torch.float32)
    m, n = work.shape
    cap = max(1, min(rank, m, n))
    total = float(torch.linalg.vector_norm(work)) ** 2
    if total == 0.0:
        zeros_b = torch.zeros(m, 1, dtype=out_dtype, device=work.device)
        return LowRankFactors(zeros_b, torch.zeros(1, n, dtype=out_dtype, device=work.device), 0.0, 0.0)
    if svd == "randomized" and 4 * cap <= min(m, n):
        gen = generator or torch.Generator().manual_seed(0)
        u, s, vh = randomized_svd(
            work, cap, oversample=oversample, power_iterations=power_iterations, generator=gen
        )
    else:
        with one_cpu_thread(work.device):
            u, s, vh = torch.linalg.svd(work, full_matrices=False)
    r = cap
    if energy is not None:
        r = min(rank_for_energy(s[:cap], total, energy) or cap, cap)
    if split == "sqrt":
        root = s[:r].sqrt()
        b, a = u[:, :r] * root, root[:, None] * vh[:r]
    else:
        b, a = u[:, :r] * s[:r], vh[:r]
    b, a = b.to(out_dtype).contiguous(), a.to(out_dtype).contiguous()
    residual = work - b.to(torch.float32) @ a.to(torch.float32)
    error = float(torch.linalg.vector_norm(residual))
    return LowRankFactors(b, a, math.sqrt(total), error)
