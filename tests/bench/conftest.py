"""A tiny random BERT whose word-level vocabulary covers TEXT-8's commonest words (nothing downloaded)."""

from __future__ import annotations

import collections
import inspect
import re
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transfuse.data import load_task_suite  # noqa: E402

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def build_text8_backbone(directory: Path, *, words: int = 2000, seed: int = 0) -> Path:
    """Save a random 1-layer BERT (hidden 32) with a tokenizer over the `words` commonest TEXT-8 words."""
    counts: collections.Counter[str] = collections.Counter()
    for task in load_task_suite("text8"):
        for text in task.texts("train"):
            counts.update(re.findall(r"[a-z]+", text.lower()))
    vocab = SPECIAL + [w for w, _ in counts.most_common(words)]
    directory.mkdir(parents=True, exist_ok=True)
    if "vocab" in inspect.signature(transformers.BertTokenizerFast.__init__).parameters:  # transformers 5
        tokenizer = transformers.BertTokenizerFast(
            vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True
        )
    else:  # transformers 4
        (directory / "vocab.txt").write_text("\n".join(vocab) + "\n")
        tokenizer = transformers.BertTokenizerFast(
            vocab_file=str(directory / "vocab.txt"), do_lower_case=True
        )
    config = transformers.BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    transformers.BertModel(config).save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    return directory


@pytest.fixture(scope="session")
def text8_backbone(tmp_path_factory) -> Path:
    return build_text8_backbone(tmp_path_factory.mktemp("text8_backbone"))
