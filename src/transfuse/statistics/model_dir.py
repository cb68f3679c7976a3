"""Statistics of a Hugging Face model dir on some texts: what ``transfuse statistics`` runs.

The model is loaded with transformers (a causal LM with ``AutoModelForCausalLM``, a sequence classifier with
``AutoModelForSequenceClassification``, anything else with ``AutoModel``), the texts are tokenized with its
tokenizer, and the Gram matrices of its linear layers and/or its diagonal Fisher are collected.  For a causal
LM the Fisher's labels are the texts' next tokens (``given``) or tokens sampled from the model (``sampled``);
for a classifier, the data's labels (``given``, JSONL ``label``) or the model's predictions.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from transfuse.statistics.fisher import LABEL_MODES, collect_fisher
from transfuse.statistics.gram import collect_gram
from transfuse.statistics.store import ModelStatistics, StatisticsError

STATISTIC_KINDS = ("gram", "fisher")


@dataclass(frozen=True)
class Example:
    text: str
    label: int | None = None


def read_examples(path: str | Path, limit: int | None = None) -> list[Example]:
    """Examples from a text file (one per non-empty line) or a ``.jsonl`` file (``{"text": ..., "label": N}``,
    label optional)."""
    path = Path(path)
    if not path.is_file():
        raise StatisticsError(f"data file {path} does not exist")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise StatisticsError(f"data file {path} is not UTF-8 text") from None
    examples: list[Example] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            try:
                row = json.loads(line)
            except ValueError as exc:
                raise StatisticsError(f"{path}:{number}: not JSON ({exc})") from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise StatisticsError(f'{path}:{number}: each line must be {{"text": ..., "label": N}}')
            label = row.get("label")
            if label is not None and (isinstance(label, bool) or not isinstance(label, int)):
                raise StatisticsError(f"{path}:{number}: label must be a whole number, got {label!r}")
            examples.append(Example(row["text"], label))
        else:
            examples.append(Example(line))
        if limit is not None and len(examples) >= limit:
            break
    if not examples:
        raise StatisticsError(f"data file {path} holds no examples")
    return examples


def model_dir_statistics(
    model_dir: str | Path,
    examples: Sequence[Example],
    *,
    kinds: Sequence[str] = ("gram",),
    labels: str = "sampled",
    max_length: int = 128,
    batch_size: int = 8,
    device: str = "cpu",
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
) -> ModelStatistics:
    """Collect ``kinds`` (``gram``, ``fisher``) for the model in ``model_dir`` over ``examples``."""
    from transformers import AutoConfig, AutoTokenizer

    bad = [k for k in kinds if k not in STATISTIC_KINDS]
    if bad or not kinds:
        raise StatisticsError(
            f"statistic kinds must be among {', '.join(STATISTIC_KINDS)}, got {list(kinds)}"
        )
    if labels not in LABEL_MODES:
        raise StatisticsError(f"labels must be one of {', '.join(LABEL_MODES)}, got {labels!r}")
    if max_length < 2 or batch_size < 1:
        raise StatisticsError("max_length must be >= 2 and batch_size >= 1")
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise StatisticsError(f"{model_dir} is not a Hugging Face model dir (no config.json)")
    config = AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
    architectures = " ".join(getattr(config, "architectures", None) or [])
    kind = (
        "causal_lm"
        if "CausalLM" in architectures
        else ("classifier" if "SequenceClassification" in architectures else "encoder")
    )
    if "fisher" in kinds and kind == "encoder":
        raise StatisticsError(
            f"{model_dir} ({architectures or config.model_type}) has no output head, so it defines no "
            "likelihood: the Fisher needs a causal LM or a sequence classifier (Gram matrices work for any model)"
        )
    if "fisher" in kinds and labels == "given" and kind == "classifier":
        if any(e.label is None for e in examples):
            raise StatisticsError("labels='given' for a classifier needs a label on every example (JSONL)")
    model = _load_model(model_dir, kind, device)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    batches = list(_batches(tokenizer, examples, max_length, batch_size, device))
    stats = ModelStatistics(source=str(model_dir), info={"model_kind": kind, "max_length": max_length})
    if "gram" in kinds:
        collect_gram(model, batches, forward=_forward, statistics=stats, progress=progress)
    if "fisher" in kinds:
        stats.info["labels"] = labels
        logits, label_fn = _likelihood(kind)
        collect_fisher(
            model,
            batches,
            logits=logits,
            labels=labels,  # type: ignore[arg-type]
            label_fn=label_fn,
            token_mask=_fisher_mask if kind == "causal_lm" else (lambda b: None),
            seed=seed,
            statistics=stats,
            progress=progress,
        )
    return stats


def _load_model(model_dir: Path, kind: str, device: str) -> torch.nn.Module:
    import transformers

    cls = {
        "causal_lm": transformers.AutoModelForCausalLM,
        "classifier": transformers.AutoModelForSequenceClassification,
        "encoder": transformers.AutoModel,
    }[kind]
    model = cls.from_pretrained(str(model_dir), local_files_only=True, dtype=torch.float32)
    return model.to(device).eval()


def _batches(tokenizer: Any, examples: Sequence[Example], max_length: int, batch_size: int, device: str):
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        enc = tokenizer(
            [e.text for e in chunk],
            padding="longest",
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        batch = {"input_ids": enc["input_ids"].to(device), "attention_mask": enc["attention_mask"].to(device)}
        if all(e.label is not None for e in chunk):
            batch["labels"] = torch.tensor([e.label for e in chunk], device=device)
        yield batch


def _forward(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> Any:
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])


def _fisher_mask(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    # Position t predicts token t+1: it counts when both are real tokens.
    mask = batch["attention_mask"]
    return (mask[:, :-1] * mask[:, 1:]).bool()


def _likelihood(kind: str):
    if kind == "causal_lm":

        def lm_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
            return _forward(model, batch).logits[:, :-1]

        return lm_logits, lambda batch: batch["input_ids"][:, 1:]

    def class_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return _forward(model, batch).logits

    return class_logits, lambda batch: batch["labels"]
