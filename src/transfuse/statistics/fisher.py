"""Diagonal Fisher information of a model's parameters, from per-example gradients (Fisher merging's statistics).

``F = (1/N) sum_n (d/d theta log p(y_n | x_n))^2`` over ``N`` examples, entry by entry, with the labels ``y_n``
either given (the "empirical" Fisher), sampled from the model's own prediction ``y_n ~ p(. | x_n)`` (an unbiased
one-sample estimate of the true Fisher, the default when no labels are given), or the model's ``argmax``.  For
token-level outputs (a language model's ``[batch, tokens, vocab]`` logits) an example's log-likelihood is the sum
over its unmasked tokens.  Each example gets its own backward pass: the square of a batch's summed gradient,
which some implementations use, is not the Fisher (its cross terms do not vanish).  Matena & Raffel, "Merging
Models with Fisher-Weighted Averaging", NeurIPS 2022.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Literal

import torch
from torch import nn

from transfuse.statistics.gram import Batch, default_token_mask
from transfuse.statistics.store import ModelStatistics, StatisticsError

LabelMode = Literal["given", "sampled", "argmax"]
LABEL_MODES: tuple[str, ...] = ("given", "sampled", "argmax")
#: Ignored label value (as in torch's cross-entropy and transformers).
IGNORE_INDEX = -100


def collect_fisher(
    model: nn.Module,
    batches: Iterable[Batch],
    *,
    logits: Callable[[nn.Module, Batch], torch.Tensor],
    labels: LabelMode = "sampled",
    label_fn: Callable[[Batch], torch.Tensor] | None = None,
    token_mask: Callable[[Batch], torch.Tensor | None] = default_token_mask,
    include: Callable[[str], bool] | None = None,
    seed: int = 0,
    statistics: ModelStatistics | None = None,
    progress: Callable[[int], None] | None = None,
) -> ModelStatistics:
    """The diagonal Fisher of ``model``'s trainable parameters over the examples of ``batches``.

    ``logits(model, batch)`` returns ``[B, C]`` (one prediction per example) or ``[B, T, C]`` (per token, with
    ``token_mask(batch)`` of shape ``[B, T]`` selecting the tokens that count).  ``labels``: ``"given"`` reads
    ``label_fn(batch)`` (``[B]`` or ``[B, T]``; -100 = ignore), ``"sampled"`` draws from the model's softmax
    (seeded by ``seed``), ``"argmax"`` takes its top class.  ``include(name)`` picks parameters (default: every
    one that requires grad).  Adds ``fisher`` to ``statistics`` and returns it.
    """
    if labels not in LABEL_MODES:
        raise StatisticsError(f"labels must be one of {', '.join(LABEL_MODES)}, got {labels!r}")
    if labels == "given" and label_fn is None:
        raise StatisticsError("labels='given' needs label_fn(batch) returning the labels")
    params = {
        n: p for n, p in model.named_parameters() if p.requires_grad and (include is None or include(n))
    }
    if not params:
        raise StatisticsError(f"{type(model).__name__} has no trainable parameters to compute a Fisher for")
    names = list(params)
    sums = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    generator = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    examples = tokens = 0
    try:
        for batch in batches:
            count = 0
            for one in _examples(batch):
                mask = token_mask(one)
                given = label_fn(one) if labels == "given" and label_fn is not None else None
                out = logits(model, one)
                log_p = torch.log_softmax(out.float(), dim=-1)
                target, keep = _targets(log_p.detach(), labels, given, mask, generator)
                if not bool(keep.any()):
                    continue
                picked = log_p.gather(-1, target.unsqueeze(-1)).squeeze(-1)
                loglik = picked[keep].sum()
                grads = torch.autograd.grad(loglik, [params[n] for n in names], allow_unused=True)
                for name, grad in zip(names, grads):
                    if grad is not None:
                        sums[name] += grad.float().square()
                examples += 1
                count += 1
                tokens += int(keep.sum())
            if progress is not None:
                progress(count)
    finally:
        model.train(was_training)
    if examples == 0:
        raise StatisticsError("no examples were given (or every label was ignored): the Fisher needs some")
    out_stats = statistics if statistics is not None else ModelStatistics()
    for name in names:
        out_stats.add("fisher", name, sums[name] / examples)
    out_stats.examples = max(out_stats.examples, examples)
    out_stats.tokens = max(out_stats.tokens, tokens)
    return out_stats


def _targets(
    log_p: torch.Tensor,
    mode: str,
    given: torch.Tensor | None,
    mask: torch.Tensor | None,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(labels, which positions count) for one example's log-probabilities ``[1, C]`` or ``[1, T, C]``."""
    shape = log_p.shape[:-1]
    if mode == "given":
        assert given is not None
        target = given.to(log_p.device).reshape(shape).long()
        keep = target != IGNORE_INDEX
        target = target.clamp_min(0)
    elif mode == "argmax":
        target = log_p.argmax(-1)
        keep = torch.ones(shape, dtype=torch.bool, device=log_p.device)
    else:
        probs = log_p.exp().reshape(-1, log_p.shape[-1]).cpu()
        target = torch.multinomial(probs, 1, generator=generator).reshape(shape).to(log_p.device)
        keep = torch.ones(shape, dtype=torch.bool, device=log_p.device)
    if mask is not None and mask.shape == shape:
        keep = keep & mask.to(device=log_p.device, dtype=torch.bool)
    return target, keep


def _examples(batch: Batch) -> Iterator[Batch]:
    """Split a batch into single-example batches: every tensor with the batch's leading size sliced on dim 0,
    and, when the batch is a mapping with an ``attention_mask``, its trailing padding columns cut from every
    tensor as long as the mask (right padding costs nothing then)."""
    size = _leading(batch)
    mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
    for i in range(size):
        length = None
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            real = torch.nonzero(mask[i]).flatten()
            length = int(real[-1]) + 1 if real.numel() else 1

        def one(value: Any, i: int = i, length: int | None = length) -> Any:
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == size:
                row = value[i : i + 1]
                if length is not None and row.dim() >= 2 and row.shape[1] == mask.shape[1]:
                    row = row[:, :length]
                return row
            return value

        if isinstance(batch, Mapping):
            yield {k: one(v) for k, v in batch.items()}
        elif isinstance(batch, (tuple, list)):
            yield type(batch)(one(v) for v in batch)
        else:
            yield one(batch)


def _leading(batch: Batch) -> int:
    values = (
        batch.values()
        if isinstance(batch, Mapping)
        else batch
        if isinstance(batch, (tuple, list))
        else [batch]
    )
    for value in values:
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return int(value.shape[0])
    raise StatisticsError("cannot tell the batch size: the batch holds no tensor with a batch dim")
