"""The statistics a data-driven merge needs from each task expert, computed on that task's train split.

For an expert (encoder + its task head) and its task: the input Gram matrices of the encoder's linear layers
(RegMean) and/or the diagonal Fisher of the encoder's parameters under the head's predictive distribution
(Fisher merging; labels sampled from the model by default, the train labels with ``labels="given"``), from the
first ``examples`` train examples in a seeded shuffled order.  Only train data is used, never validation or test.
Results are cached on disk by the expert's weights and every setting, so a second benchmark run reuses them.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from pathlib import Path

import torch

from transfuse.data.task import Task
from transfuse.eval.cache import tensors_digest
from transfuse.models.backbone import Encoder, mean_pool
from transfuse.models.head import TaskHead
from transfuse.statistics import ModelStatistics, collect_fisher, collect_gram
from transfuse.statistics.store import load_statistics

#: Bump when what is computed changes, so cached statistics are recomputed.
STATISTICS_VERSION = 1


def expert_statistics(
    encoder: Encoder,
    head: TaskHead,
    task: Task,
    kinds: Sequence[str],
    *,
    examples: int = 256,
    batch_size: int = 16,
    max_length: int = 48,
    labels: str = "sampled",
    seed: int = 0,
    cache_dir: str | Path | None = None,
) -> ModelStatistics:
    """``kinds`` (``gram``, ``fisher``) of ``encoder`` on ``task``'s train split (see the module doc)."""
    settings = {
        "version": STATISTICS_VERSION,
        "kinds": sorted(kinds),
        "examples": examples,
        "max_length": max_length,
        "labels": labels,
        "seed": seed,
        "task": task.name,
    }
    path = None
    if cache_dir is not None:
        digest = hashlib.sha256(
            json.dumps(
                {**settings, "encoder": tensors_digest(encoder.state_dict()), "head": _head_digest(head)},
                sort_keys=True,
            ).encode()
        ).hexdigest()[:24]
        path = Path(cache_dir) / f"{task.name}-{digest}.safetensors"
        if path.is_file():
            return load_statistics(path)
    batches = train_batches(encoder, task, examples, batch_size=batch_size, max_length=max_length, seed=seed)
    model = encoder.model
    stats = ModelStatistics(source=f"{encoder.source} on {task.name}", info=dict(settings))
    if "gram" in kinds:
        collect_gram(
            model,
            batches,
            forward=lambda m, b: m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]),
            statistics=stats,
        )
    if "fisher" in kinds:

        def logits(m: torch.nn.Module, b: dict[str, torch.Tensor]) -> torch.Tensor:
            hidden = m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
            return head(mean_pool(hidden, b["attention_mask"]))

        collect_fisher(
            model,
            batches,
            logits=logits,
            labels=labels,  # type: ignore[arg-type]
            label_fn=lambda b: b["labels"],
            token_mask=lambda b: None,
            seed=seed,
            statistics=stats,
        )
    if path is not None:
        stats.save(path)
    return stats


def train_batches(
    encoder: Encoder, task: Task, examples: int, *, batch_size: int = 16, max_length: int = 48, seed: int = 0
) -> list[dict[str, torch.Tensor]]:
    """The first ``examples`` of ``task``'s train split in a ``seed``-shuffled order, tokenized by ``encoder``, as
    batches ``{input_ids, attention_mask, labels}`` on its device."""
    train = task.split("train")
    order = list(range(len(train)))
    random.Random(seed).shuffle(order)
    chosen = [train[i] for i in order[:examples]]
    tokens = encoder.tokenize([e.text for e in chosen], max_length)
    device = encoder.device
    return [
        {
            "input_ids": tokens.input_ids[i : i + batch_size].to(device),
            "attention_mask": tokens.attention_mask[i : i + batch_size].to(device),
            "labels": torch.tensor([e.label for e in chosen[i : i + batch_size]], device=device),
        }
        for i in range(0, len(chosen), batch_size)
    ]


def _head_digest(head: TaskHead) -> str:
    return tensors_digest(dict(head.state_dict()))
