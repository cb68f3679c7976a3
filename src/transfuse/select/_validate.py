"""Input checks shared by every transferability metric.

Every metric takes numpy arrays or torch tensors, computes in float64 on the tensor's device (CPU for numpy
input) and raises :class:`SelectionInputError` with a message that says what to do when an input is unusable.
Labels may be any hashable values (ints, strings, ...); they are remapped to ``0..C-1`` in sorted order, so
``{3, 7, 9}`` and ``{0, 1, 2}`` give the same score.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from transfuse.errors import TransfuseError

DTYPE = torch.float64


class SelectionInputError(TransfuseError, ValueError):
    """The features, predictions or labels given to a transferability metric cannot be scored."""


@dataclass(frozen=True)
class Labels:
    """Target labels remapped to ``0..C-1``: `index` [N] (int64), `counts` [C], `classes` (original values)."""

    index: torch.Tensor
    counts: torch.Tensor
    classes: np.ndarray

    @property
    def num_classes(self) -> int:
        return int(self.counts.numel())

    def one_hot(self, dtype: torch.dtype = DTYPE) -> torch.Tensor:
        return torch.nn.functional.one_hot(self.index, self.num_classes).to(dtype)


def _to_numpy(x, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    try:
        return np.asarray(x)
    except Exception as exc:  # ragged lists and the like
        raise SelectionInputError(
            f"{name}: cannot be read as an array ({exc}); pass a numpy array or tensor"
        ) from exc


def as_matrix(x, name: str = "features", *, device: torch.device | None = None) -> torch.Tensor:
    """`x` as a finite 2-D float64 tensor [N, D] (on `x`'s device if it is a tensor, else on `device`/CPU)."""
    if isinstance(x, torch.Tensor):
        t = x.detach()
        if t.is_complex() or t.dtype == torch.bool:
            raise SelectionInputError(
                f"{name}: dtype {t.dtype} is not a real number type; pass float features"
            )
        t = t.to(DTYPE)
    else:
        a = _to_numpy(x, name)
        if a.dtype == object or not (
            np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)
        ):
            raise SelectionInputError(
                f"{name}: dtype {a.dtype} is not a real number type; pass float features"
            )
        t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64))
        if device is not None:
            t = t.to(device)
    if t.ndim != 2:
        raise SelectionInputError(
            f"{name}: expected a 2-D array [num_samples, num_features], got shape {tuple(t.shape)}; "
            "flatten or pool each sample's features into one row"
        )
    if t.shape[0] == 0 or t.shape[1] == 0:
        raise SelectionInputError(
            f"{name}: empty array of shape {tuple(t.shape)}; pass at least one sample and one feature"
        )
    finite = torch.isfinite(t)
    if not bool(finite.all()):
        bad_rows = (~finite).any(dim=1).nonzero().flatten()
        raise SelectionInputError(
            f"{name}: {int((~finite).sum())} NaN/Inf values in {bad_rows.numel()} rows "
            f"(first row {int(bad_rows[0])}); drop or impute those rows before scoring"
        )
    return t


def as_labels(y, num_samples: int, name: str = "labels", *, device: torch.device | None = None) -> Labels:
    """`y` ([N] or [N, 1], any hashable values) remapped to ``0..C-1``; C >= 2 and N > C are required."""
    a = _to_numpy(y, name)
    if a.ndim == 2 and a.shape[1] == 1:
        a = a[:, 0]
    if a.ndim != 1:
        raise SelectionInputError(
            f"{name}: expected one label per sample (shape [N]), got shape {a.shape}; "
            "for one-hot or probability targets pass their argmax"
        )
    if a.shape[0] != num_samples:
        raise SelectionInputError(
            f"{name}: {a.shape[0]} labels for {num_samples} samples; pass exactly one label per feature row"
        )
    if np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all():
            raise SelectionInputError(f"{name}: NaN/Inf labels; drop those samples or give them a class")
        if not np.array_equal(a, np.round(a)):
            raise SelectionInputError(
                f"{name}: non-integer float labels look like regression targets; these metrics need class labels"
            )
    try:
        classes, inverse = np.unique(a, return_inverse=True)
    except TypeError as exc:
        raise SelectionInputError(
            f"{name}: labels of mixed types cannot be sorted ({exc}); use one type"
        ) from exc
    if classes.size < 2:
        raise SelectionInputError(
            f"{name}: only one class ({classes[0]!r}) is present; transferability needs at least two classes"
        )
    if num_samples <= classes.size:
        raise SelectionInputError(
            f"{name}: {num_samples} samples for {classes.size} classes; need more samples than classes "
            "(collect more labelled examples per class)"
        )
    index = torch.from_numpy(inverse.reshape(-1).astype(np.int64))
    if device is not None:
        index = index.to(device)
    counts = torch.bincount(index, minlength=classes.size)
    return Labels(index=index, counts=counts, classes=classes)


def features_and_labels(features, labels) -> tuple[torch.Tensor, Labels]:
    """Checked float64 features [N, D] and remapped labels on the same device."""
    f = as_matrix(features, "features")
    return f, as_labels(labels, f.shape[0], device=f.device)


def as_probabilities(p, name: str = "source_probs", *, atol: float = 1e-3) -> torch.Tensor:
    """Checked row-stochastic matrix [N, Z] (non-negative rows summing to 1 within `atol`)."""
    t = as_matrix(p, name)
    if bool((t < 0).any()):
        raise SelectionInputError(
            f"{name}: negative entries; pass probabilities (softmax of the logits), not logits"
        )
    sums = t.sum(dim=1)
    worst = float((sums - 1).abs().max())
    if worst > atol:
        raise SelectionInputError(
            f"{name}: rows must sum to 1 (worst row is off by {worst:.3g}); pass softmax(logits) over the "
            "source label set"
        )
    return t / sums[:, None]


def class_sums(x: torch.Tensor, labels: Labels) -> torch.Tensor:
    """Per-class sums of the rows of `x`: [C, D]."""
    out = torch.zeros(labels.num_classes, x.shape[1], dtype=x.dtype, device=x.device)
    return out.index_add_(0, labels.index, x)


def class_means(x: torch.Tensor, labels: Labels) -> torch.Tensor:
    """Per-class means of the rows of `x`: [C, D]."""
    return class_sums(x, labels) / labels.counts.to(x.dtype)[:, None]


def symmetric_eigh(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigen-decomposition of a symmetric matrix (symmetrized first), eigenvalues ascending."""
    return torch.linalg.eigh((a + a.T) / 2)


def pca(x: torch.Tensor, *, n_components: int | None = None, variance: float | None = None) -> torch.Tensor:
    """Project centered `x` [N, D] on its leading principal axes: `n_components` of them, or the fewest that
    explain more than a `variance` share (as scikit-learn's ``PCA(n_components=0.8)``)."""
    xc = x - x.mean(dim=0, keepdim=True)
    n, d = xc.shape
    if n < d:  # principal axes from the N x N Gram matrix: scores = U * s
        evals, evecs = symmetric_eigh(xc @ xc.T)
        evals, evecs = evals.flip(0).clamp_min(0), evecs.flip(1)
        scores_basis = evecs * evals.sqrt()
    else:
        evals, evecs = symmetric_eigh(xc.T @ xc)
        evals, evecs = evals.flip(0).clamp_min(0), evecs.flip(1)
        scores_basis = None
    if n_components is None:
        if variance is None:
            raise ValueError("give n_components or variance")
        ratio = torch.cumsum(evals, 0) / evals.sum().clamp_min(torch.finfo(evals.dtype).tiny)
        n_components = (
            int(torch.searchsorted(ratio, torch.tensor(variance, dtype=ratio.dtype), right=True)) + 1
        )
    k = max(1, min(n_components, evals.numel(), n))
    if scores_basis is not None:
        return scores_basis[:, :k]
    return xc @ evecs[:, :k]
