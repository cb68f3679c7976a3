"""AdaMerging for this project's text experts: a shared encoder (``transfuse.models.Encoder``), mean pooling,
one linear ``TaskHead`` per task.

:func:`text_adaptation` builds what :func:`transfuse.adapt.adamerge` takes: the base state dict, ``forward``
(``torch.func.functional_call`` of the backbone's Hugging Face module on the merged parameters, mean pooling
over the attention mask, the task's frozen head) and each task's unlabeled batches of token ids.
:func:`text_task_vectors` reads the experts' encoders and subtracts the base.  Typical use::

    adaptation = text_adaptation(heads, tokens, backbone_dir=backbone)
    vectors = text_task_vectors(adaptation.base, {task: expert_dir for ...})
    result = adamerge(adaptation.base, vectors, adaptation.forward, adaptation.batches, granularity="layer")
    merged = Encoder.from_state_dict(result.merged_state_dict(), backbone)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from transfuse.adapt.adamerging import Forward
from transfuse.adapt.errors import (
    AdaptParameterError,
    EmptyBatchesError,
    TaskVectorMismatchError,
    UnknownTaskError,
)
from transfuse.models.backbone import Encoder, TokenizedTexts, mean_pool, read_encoder_state
from transfuse.models.head import TaskHead


@dataclass
class TextAdaptation:
    """The inputs of :func:`adamerge` for text experts: ``base`` (the backbone's state dict), ``forward``,
    ``batches`` (``{task: [TokenizedTexts, ...]}``) and the ``encoder`` whose module ``forward`` calls."""

    base: dict[str, Tensor]
    forward: Forward
    batches: dict[str, list[TokenizedTexts]]
    encoder: Encoder


def text_adaptation(
    heads: Mapping[str, TaskHead],
    texts: Mapping[str, TokenizedTexts],
    *,
    backbone_dir: str | Path | None = None,
    batch_size: int = 16,
    max_batches: int | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> TextAdaptation:
    """The base, forward and batches of AdaMerging over ``heads[task]`` and the unlabeled ``texts[task]``.

    ``backbone_dir``: the pretrained encoder (default: all-MiniLM-L6-v2).  Each task's texts are shuffled once
    (``seed``) and cut into batches of ``batch_size`` (each trimmed to its longest row), at most
    ``max_batches`` per task.  The encoder runs in eval mode (no dropout) and the heads are frozen.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise AdaptParameterError(f"batch_size must be an integer >= 1 (16 in the paper), got {batch_size!r}")
    if max_batches is not None and (not isinstance(max_batches, int) or max_batches < 1):
        raise AdaptParameterError(f"max_batches must be an integer >= 1 or None, got {max_batches!r}")
    unknown = [t for t in texts if t not in heads]
    if unknown:
        raise UnknownTaskError(
            f"texts are given for tasks without a head {unknown}; the heads are {list(heads)}"
        )
    missing = [t for t in heads if t not in texts or len(texts[t]) == 0]
    if missing:
        raise EmptyBatchesError(
            f"no unlabeled texts for tasks {missing}: give tokenized texts for every head"
        )

    encoder = Encoder.load(backbone_dir, device=device)
    encoder.model.eval().requires_grad_(False)
    for task, head in heads.items():
        if head.hidden_size != encoder.hidden_size:
            raise TaskVectorMismatchError(
                f"the head of {task!r} takes vectors of size {head.hidden_size}, the backbone "
                f"{encoder.source} gives {encoder.hidden_size}"
            )
    frozen = {task: head.to(device).eval().requires_grad_(False) for task, head in heads.items()}
    module = encoder.model

    def forward(params: Mapping[str, Tensor], task: str, batch: TokenizedTexts) -> Tensor:
        ids, mask = batch.input_ids.to(device), batch.attention_mask.to(device)
        out = torch.func.functional_call(
            module, dict(params), args=(), kwargs={"input_ids": ids, "attention_mask": mask}
        )
        return frozen[task](mean_pool(out.last_hidden_state, mask))

    generator = torch.Generator().manual_seed(seed)
    batches: dict[str, list[TokenizedTexts]] = {}
    for task in heads:
        tokens = texts[task]
        order = torch.randperm(len(tokens), generator=generator)
        chunks = [order[i : i + batch_size] for i in range(0, len(tokens), batch_size)]
        batches[task] = [tokens.select(c) for c in chunks[:max_batches]]
    return TextAdaptation(encoder.state_dict(), forward, batches, encoder)


def text_task_vectors(
    base: Mapping[str, Tensor], experts: Mapping[str, str | Path]
) -> dict[str, dict[str, Tensor]]:
    """``{task: expert encoder - base}`` for every floating-point tensor of the base, read from each expert's
    directory (``experts[task]``, as ``train.train_experts`` writes them)."""
    vectors: dict[str, dict[str, Tensor]] = {}
    for task, path in experts.items():
        state = read_encoder_state(path)
        extra = sorted(set(state) - set(base))
        if extra:
            raise TaskVectorMismatchError(
                f"the expert of {task!r} ({path}) has tensors the base lacks, e.g. {extra[:3]}: "
                "is it a fine-tune of this backbone?"
            )
        vector = {}
        for name, value in base.items():
            if not value.is_floating_point():
                continue
            if name not in state:
                raise TaskVectorMismatchError(f"the expert of {task!r} ({path}) has no tensor {name!r}")
            if state[name].shape != value.shape:
                raise TaskVectorMismatchError(
                    f"the expert of {task!r} ({path}): {name!r} has shape {tuple(state[name].shape)}, "
                    f"the base {tuple(value.shape)}"
                )
            vector[name] = state[name].float() - value.float()
        vectors[task] = vector
    return vectors
