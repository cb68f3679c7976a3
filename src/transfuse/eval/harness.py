"""Evaluate one encoder on every task of a suite, each task through its OWN head.

This is the protocol of the task-arithmetic literature (Ilharco et al. 2023; Yadav et al. 2023): a merged
encoder is scored on task *t* with the linear head of *t*'s expert, so the numbers measure what the merge kept
of each expert's representation.  The same call scores the experts (their own encoder), the pretrained encoder
with the experts' heads (the floor) and a multi-task model (its own heads).

Tokenized splits are cached in memory per (tokenizer, task, split, max_length, examples), so evaluating many
merges of the same backbone tokenizes each split once.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from transfuse.data.task import Task, TaskSuite
from transfuse.errors import TransfuseError
from transfuse.models.backbone import Encoder, TokenizedTexts
from transfuse.models.head import TaskHead, load_heads

EncoderLike = Encoder | Mapping[str, torch.Tensor] | str | Path
HeadsLike = Mapping[str, TaskHead | str | Path | Any] | str | Path


class EvaluationError(TransfuseError, ValueError):
    """The encoder, heads and tasks of an evaluation do not fit together (a missing head, an empty split...)."""


def evaluate(
    encoder: EncoderLike,
    heads: HeadsLike,
    suite: TaskSuite | Sequence[Task] | Task,
    *,
    split: str = "test",
    batch_size: int = 64,
    max_length: int = 48,
    device: str = "cpu",
    max_examples: int | None = None,
    backbone_dir: str | Path | None = None,
    return_correct: bool = False,
) -> dict[str, float] | tuple[dict[str, float], dict[str, np.ndarray]]:
    """Accuracy of `encoder` on every task of `suite`, each task through its own head.

    - `encoder`: an :class:`~transfuse.models.Encoder`, an HF directory, or a state dict with the backbone's
      tensor names (e.g. from ``merge_state_dicts``), placed in the architecture and tokenizer of
      `backbone_dir` (default: all-MiniLM-L6-v2).
    - `heads`: ``{task name: TaskHead | expert dir | Expert}``, or one directory holding the heads (a
      multi-task model).  Every task of `suite` needs a head whose labels match the task's.
    - `max_examples`: score only the first `max_examples` examples of each split (the stored order is
      already shuffled).

    Returns ``{task: accuracy}`` in suite order; with ``return_correct=True`` also
    ``{task: bool array}`` saying which examples were classified correctly (for :func:`paired_bootstrap`).
    """
    tasks = _as_tasks(suite)
    if batch_size < 1 or max_length < 1:
        raise EvaluationError(f"batch_size and max_length must be >= 1, got {batch_size} and {max_length}")
    if max_examples is not None and max_examples < 1:
        raise EvaluationError(f"max_examples must be >= 1 or None, got {max_examples}")
    head_map = _as_heads(heads, tasks, device)
    model = _as_encoder(encoder, backbone_dir, device)

    accuracy: dict[str, float] = {}
    correct: dict[str, np.ndarray] = {}
    for task in tasks:
        examples = task.split(split)
        if max_examples is not None:
            examples = examples[:max_examples]
        if not examples:
            raise EvaluationError(f"task {task.name!r} has no {split!r} examples to evaluate on")
        tokens = tokenized(model, task, split, max_length, max_examples)
        head = head_map[task.name]
        vectors = model.embed(tokens, batch_size=batch_size)
        predicted = head.to(vectors.device).predict(vectors).cpu().numpy()
        hits = predicted == np.asarray([e.label for e in examples])
        accuracy[task.name] = float(hits.mean())
        correct[task.name] = hits
    return (accuracy, correct) if return_correct else accuracy


# ---- tokenization cache ----------------------------------------------------------------------------------

_TOKEN_CACHE: OrderedDict[tuple, TokenizedTexts] = OrderedDict()
_TOKEN_CACHE_SIZE = 64


def tokenized(
    encoder: Encoder, task: Task, split: str, max_length: int, max_examples: int | None = None
) -> TokenizedTexts:
    """The split's texts tokenized by `encoder`'s tokenizer, from the cache when seen before."""
    texts = task.texts(split)
    if max_examples is not None:
        texts = texts[:max_examples]
    digest = hashlib.sha256("\x00".join(texts).encode()).hexdigest()
    key = (encoder.tokenizer_key(), task.name, split, max_length, len(texts), digest)
    cached = _TOKEN_CACHE.get(key)
    if cached is None:
        cached = encoder.tokenize(texts, max_length)
        _TOKEN_CACHE[key] = cached
        while len(_TOKEN_CACHE) > _TOKEN_CACHE_SIZE:
            _TOKEN_CACHE.popitem(last=False)
    else:
        _TOKEN_CACHE.move_to_end(key)
    return cached


def clear_token_cache() -> None:
    """Forget every cached tokenized split."""
    _TOKEN_CACHE.clear()


# ---- argument normalisation ------------------------------------------------------------------------------


def _as_tasks(suite: TaskSuite | Sequence[Task] | Task) -> list[Task]:
    tasks = [suite] if isinstance(suite, Task) else list(suite)
    if not tasks:
        raise EvaluationError("no tasks to evaluate")
    return tasks


def _as_encoder(encoder: EncoderLike, backbone_dir: str | Path | None, device: str) -> Encoder:
    if isinstance(encoder, Encoder):
        return encoder.to(device)
    if isinstance(encoder, (str, Path)):
        return Encoder.load(encoder, device=device)
    if isinstance(encoder, Mapping):
        return Encoder.from_state_dict(encoder, backbone_dir, device=device)
    raise EvaluationError(
        f"cannot evaluate a {type(encoder).__name__}: pass an Encoder, an HF directory or a state dict"
    )


def _as_heads(heads: HeadsLike, tasks: list[Task], device: str) -> dict[str, TaskHead]:
    if isinstance(heads, (str, Path)):
        loaded = load_heads(heads, device=device)
    else:
        loaded = {}
        for name, head in heads.items():
            if isinstance(head, TaskHead):
                loaded[name] = head
            else:  # an expert directory or an object with a .path (an Expert)
                path = head if isinstance(head, (str, Path)) else getattr(head, "path", None)
                if path is None:
                    raise EvaluationError(f"head of {name!r}: expected a TaskHead, a directory or an Expert")
                found = load_heads(path, device=device)
                if name not in found:
                    raise EvaluationError(f"{path} has no head for task {name!r} (it has {sorted(found)})")
                loaded[name] = found[name]
    for task in tasks:
        head = loaded.get(task.name)
        if head is None:
            raise EvaluationError(
                f"no head for task {task.name!r}; heads given for: {', '.join(sorted(loaded)) or 'none'}"
            )
        if head.label_names != task.label_names:
            raise EvaluationError(
                f"the head of {task.name!r} predicts {head.label_names}, the task's labels are {task.label_names}"
            )
    return loaded
