"""The text-expert adapter on a tiny random BERT (transfuse's built-in example): forward equals the encoder's own
call + mean pooling + head, task vectors are expert - base, and a short AdaMerging run loads back as an Encoder."""

from __future__ import annotations

import shutil

import pytest
import torch

pytest.importorskip("transformers")

from transfuse.adapt import (  # noqa: E402
    AdaptParameterError,
    EmptyBatchesError,
    TaskVectorMismatchError,
    UnknownTaskError,
    adamerge,
    text_adaptation,
    text_task_vectors,
)
from transfuse.example import EXPERTS, write_example  # noqa: E402
from transfuse.models.backbone import Encoder  # noqa: E402
from transfuse.models.head import TaskHead  # noqa: E402

TEXTS = ["a cat sat", "merging models", "the quick brown fox jumps", "x", "hello world again", "zz top"]


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    folder = tmp_path_factory.mktemp("example")
    write_example(folder, hidden=16, layers=2)
    for name in EXPERTS[:2]:  # expert dirs as train_experts writes them: with the tokenizer
        for file in (folder / "base").iterdir():
            if "token" in file.name or file.name == "vocab.txt":
                shutil.copy(file, folder / name / file.name)
    return folder


def _heads(hidden=16):
    torch.manual_seed(0)
    return {
        "sent": TaskHead(hidden, ["neg", "pos"], "sent"),
        "topic": TaskHead(hidden, ["a", "b", "c"], "topic"),
    }


def test_forward_is_the_encoder_with_mean_pooling_and_the_tasks_head(example):
    encoder = Encoder.load(example / "base")
    tokens = encoder.tokenize(TEXTS, 48)
    heads = _heads()
    adaptation = text_adaptation(
        heads, {"sent": tokens, "topic": tokens}, backbone_dir=example / "base", batch_size=4
    )
    assert [len(b) for b in adaptation.batches["sent"]] == [4, 2]
    batch = adaptation.batches["topic"][0]
    with torch.no_grad():
        got = adaptation.forward(adaptation.base, "topic", batch)
        want = heads["topic"](encoder(batch.input_ids, batch.attention_mask))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert got.shape == (4, 3)
    assert not any(p.requires_grad for h in heads.values() for p in h.parameters())


def test_task_vectors_are_expert_minus_base_and_adamerging_runs(example):
    encoder = Encoder.load(example / "base")
    tokens = encoder.tokenize(TEXTS, 48)
    adaptation = text_adaptation(
        _heads(),
        {"sent": tokens, "topic": tokens},
        backbone_dir=example / "base",
        batch_size=3,
        max_batches=1,
    )
    assert [len(b) for b in adaptation.batches["sent"]] == [3]
    experts = {"sent": example / EXPERTS[0], "topic": example / EXPERTS[1]}
    vectors = text_task_vectors(adaptation.base, experts)
    expert = Encoder.load(experts["sent"]).state_dict()
    name = "encoder.layer.1.attention.self.query.weight"
    torch.testing.assert_close(vectors["sent"][name], expert[name] - adaptation.base[name], rtol=0, atol=0)
    assert set(vectors["topic"]) == {n for n, v in adaptation.base.items() if v.is_floating_point()}

    result = adamerge(
        adaptation.base, vectors, adaptation.forward, adaptation.batches, granularity="block", steps=2
    )
    assert result.layout.names[:3] == ("sent/other", "sent/block 0", "sent/block 1")
    merged = Encoder.from_state_dict(result.merged_state_dict(), example / "base")
    merged.model.eval()  # from_config builds it in train mode (dropout)
    batch = adaptation.batches["sent"][0]
    with torch.no_grad():
        want = adaptation.forward(result.merged_state_dict(), "sent", batch)
        got = _heads()["sent"](merged(batch.input_ids, batch.attention_mask))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_text_adaptation_errors_are_named(example):
    encoder = Encoder.load(example / "base")
    tokens = encoder.tokenize(TEXTS, 48)
    heads = _heads()
    base_dir = example / "base"
    with pytest.raises(UnknownTaskError, match=r"texts are given for tasks without a head \['other'\]"):
        text_adaptation(heads, {"sent": tokens, "topic": tokens, "other": tokens}, backbone_dir=base_dir)
    with pytest.raises(EmptyBatchesError, match=r"no unlabeled texts for tasks \['topic'\]"):
        text_adaptation(heads, {"sent": tokens}, backbone_dir=base_dir)
    with pytest.raises(EmptyBatchesError, match=r"no unlabeled texts for tasks \['topic'\]"):
        text_adaptation(heads, {"sent": tokens, "topic": encoder.tokenize([], 48)}, backbone_dir=base_dir)
    with pytest.raises(AdaptParameterError, match="batch_size must be an integer >= 1"):
        text_adaptation(heads, {"sent": tokens, "topic": tokens}, backbone_dir=base_dir, batch_size=0)
    with pytest.raises(AdaptParameterError, match="max_batches must be an integer >= 1"):
        text_adaptation(heads, {"sent": tokens, "topic": tokens}, backbone_dir=base_dir, max_batches=0)
    with pytest.raises(TaskVectorMismatchError, match="the head of 'wide' takes vectors of size 8"):
        text_adaptation({"wide": TaskHead(8, ["a", "b"], "wide")}, {"wide": tokens}, backbone_dir=base_dir)
