"""A tiny random BERT backbone with a word-level tokenizer and two tiny tasks, built in the test (nothing
downloaded).  Shared with tests/train through its conftest."""

from __future__ import annotations

import inspect
import random
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transfuse.data.task import Example, Task, TaskSuite  # noqa: E402

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WARM, COOL = ["red", "yellow", "orange"], ["blue", "green", "teal"]
PETS, WILD = ["cat", "dog", "hamster"], ["wolf", "bear", "tiger"]
FILLER = ["the", "a", "big", "small", "very", "and", "is", "it"]
WORDS = WARM + COOL + PETS + WILD + FILLER


def build_tiny_backbone(directory: Path, *, seed: int = 0) -> Path:
    """Save a random 1-layer BERT (hidden 32) and a BertTokenizerFast over :data:`WORDS` to `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    vocab = directory / "vocab.txt"
    vocab.write_text("\n".join(SPECIAL + WORDS) + "\n")
    if "vocab" in inspect.signature(transformers.BertTokenizerFast.__init__).parameters:  # transformers 5
        ids = {token: i for i, token in enumerate(SPECIAL + WORDS)}
        tokenizer = transformers.BertTokenizerFast(vocab=ids, do_lower_case=True)
    else:  # transformers 4
        tokenizer = transformers.BertTokenizerFast(vocab_file=str(vocab), do_lower_case=True)
    config = transformers.BertConfig(
        vocab_size=len(SPECIAL) + len(WORDS),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    model = transformers.BertModel(config)
    model.save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    return directory


def _texts(rng: random.Random, n: int, positive: list[str], negative: list[str]) -> list[Example]:
    out = []
    for _ in range(n):
        label = rng.randrange(2)
        key = rng.choice(positive if label == 0 else negative)
        words = rng.sample(FILLER, rng.randint(1, 5)) + [key]
        rng.shuffle(words)
        out.append(Example(" ".join(words), label))
    return out


def tiny_task(name: str, positive: list[str], negative: list[str], seed: int, labels: list[str]) -> Task:
    rng = random.Random(seed)
    return Task(
        name=name,
        label_names=labels,
        train=_texts(rng, 64, positive, negative),
        validation=_texts(rng, 24, positive, negative),
        test=_texts(rng, 30, positive, negative),
    )


def tiny_suite() -> TaskSuite:
    return TaskSuite(
        "tiny",
        (
            tiny_task("colour", WARM, COOL, 1, ["warm", "cool"]),
            tiny_task("animal", PETS, WILD, 2, ["pet", "wild"]),
        ),
    )


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models run faster on one thread (and leave the other core to whatever else runs)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_backbone(tmp_path_factory) -> Path:
    return build_tiny_backbone(tmp_path_factory.mktemp("tiny_backbone"))


@pytest.fixture(scope="session")
def suite() -> TaskSuite:
    return tiny_suite()
