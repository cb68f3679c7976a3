"""Shared linear algebra for the SVD-based merge methods (TSV, Iso-C, Iso-CTS).

Every routine here is deterministic and NaN-free on rank-deficient, rank-1 and all-zero matrices: singular
directions whose singular value is numerically zero are *dropped* rather than kept.  LAPACK fills such
directions with an arbitrary orthonormal completion, so keeping them (as the papers' reference code does)
makes the merged tensor depend on implementation details; for full-rank inputs nothing is dropped and the
results are the papers' exactly.
"""

from __future__ import annotations

import torch
from torch import Tensor

#: Inputs reach the methods as float32, so float32 rounding sets the noise floor even when the SVD itself
#: runs in float64.
_INPUT_EPS = torch.finfo(torch.float32).eps

SVD_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float64": torch.float64}


def resolve_dtype(name: str) -> torch.dtype:
    """The torch dtype for the ``svd_dtype`` method parameter."""
    return SVD_DTYPES[name]


def scale_by_weights(deltas: Tensor, weights: Tensor) -> Tensor:
    """``deltas[k] *= weights[k]`` in place (the engine lets methods overwrite ``deltas``); returns ``deltas``."""
    if not bool((weights == 1).all()):
        deltas.mul_(weights.to(deltas.dtype).reshape(-1, *([1] * (deltas.dim() - 1))))
    return deltas


def rank_tolerance(s_max: Tensor | float, shape: tuple[int, ...]) -> Tensor | float:
    """Singular values ``<= max(m, n) * eps * s_max`` count as zero (NumPy's ``matrix_rank`` default)."""
    return s_max * max(shape) * _INPUT_EPS


def svd(matrix: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD ``matrix = U diag(S) Vh`` computed in ``dtype`` (descending ``S``)."""
    return torch.linalg.svd(matrix.to(dtype), full_matrices=False)


def polar_factor(matrix: Tensor, dtype: torch.dtype) -> Tensor:
    """The (partial) isometry closest to ``matrix`` in Frobenius norm: ``W Z^T`` from ``matrix = W S Z^T``.

    This is how TSV and Iso-CTS orthogonalize concatenated singular bases (the official code computes
    ``U_u @ Vh_u`` from an SVD).  Only directions with a numerically nonzero singular value are kept, so on
    linearly dependent columns the result is the unique partial isometry instead of an arbitrary completion.
    """
    out_dtype = matrix.dtype
    if matrix.numel() == 0:
        return matrix.clone()
    w, s, zh = svd(matrix, dtype)
    keep = s > rank_tolerance(s[0], tuple(matrix.shape))
    return (w[:, keep] @ zh[keep]).to(out_dtype)


def mean_delta(deltas: Tensor) -> Tensor:
    """Average of the (already weight-scaled) task vectors: the official TSV/Iso fallback for non-matrices."""
    return deltas.mean(dim=0)
