"""NCE: negative conditional entropy of the target labels given the source model's hard predictions."""

from __future__ import annotations

import numpy as np
import torch

from transfuse.select._validate import SelectionInputError, as_labels


def nce(source_labels, labels) -> float:
    r"""NCE (Tran, Nguyen, Hassner: "Transferability and Hardness of Supervised Classification Tasks",
    ICCV 2019).

    `source_labels` [N] are the source model's hard predictions on the target samples (any hashable values,
    e.g. ``argmax`` of its logits), `labels` [N] the target labels. From the empirical joint ``P(z, y)`` of the
    two label sequences:

    .. math::
        \mathrm{NCE} = -H(Y \mid Z) = \sum_{z, y} P(z, y) \log \frac{P(z, y)}{P(z)}.

    Higher is better; range ``(-inf, 0]`` (in nats, bounded below by ``-H(Y) >= -log C``). It is 0 when the
    source label determines the target label, and ``-H(Y)`` when the two are independent.
    """
    y = as_labels(labels, _length(source_labels), name="labels")
    z = _source_labels(source_labels)
    n = y.index.numel()
    joint = torch.zeros(int(z.max()) + 1, y.num_classes, dtype=torch.float64)
    joint.index_put_((z, y.index.cpu()), torch.ones(n, dtype=torch.float64), accumulate=True)
    marginal = joint.sum(1, keepdim=True)
    nz = joint > 0
    terms = torch.where(nz, joint * torch.log(joint / marginal.clamp_min(1)), 0.0)
    return float(terms.sum() / n)


def _length(x) -> int:
    try:
        return len(x)
    except TypeError as exc:
        raise SelectionInputError("source_labels: pass one hard source label per sample (shape [N])") from exc


def _source_labels(z) -> torch.Tensor:
    a = z.detach().cpu().numpy() if isinstance(z, torch.Tensor) else np.asarray(z)
    if a.ndim == 2 and a.shape[1] == 1:
        a = a[:, 0]
    if a.ndim != 1:
        raise SelectionInputError(
            f"source_labels: expected hard labels of shape [N], got shape {a.shape}; "
            "for source probabilities use leep(), or pass their argmax"
        )
    if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all():
        raise SelectionInputError(
            "source_labels: NaN/Inf values; pass hard (integer or string) source labels"
        )
    _, inverse = np.unique(a, return_inverse=True)
    return torch.from_numpy(inverse.reshape(-1).astype(np.int64))
