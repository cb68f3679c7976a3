"""Task embeddings: the Fisher embedding against central finite differences, TextEmb against a loop, properties
and errors.  Uses the tiny random BERT of tests/eval/conftest.py."""

from __future__ import annotations

import pytest
import torch

from transfuse.models import Encoder
from transfuse.select import SelectionInputError
from transfuse.select.task_embedding import (
    embedding_similarity,
    fisher_embedding,
    fit_linear_head,
    last_layer_parameters,
    text_embedding,
)


@pytest.fixture(scope="module")
def encoder(tmp_path_factory, tiny, one_torch_thread):
    return Encoder.load(tiny.build_tiny_backbone(tmp_path_factory.mktemp("taskemb_backbone")))


@pytest.fixture(scope="module")
def task(tiny):
    examples = tiny.tiny_suite()[0].train[:24]
    return [e.text for e in examples], [e.label for e in examples]


def test_last_layer_parameters_of_a_bert(encoder):
    names = last_layer_parameters(encoder.model)
    assert names and all(".layer.0." in n for n in names)  # the tiny BERT has one layer: layer 0
    assert not any(n.startswith("embeddings.") or n.startswith("pooler.") for n in names)
    assert set(last_layer_parameters(torch.nn.Linear(3, 2))) == {"weight", "bias"}  # no layer numbers: all


def test_fisher_matches_central_finite_differences(encoder, task):
    texts, labels = task
    model = encoder.model.double()
    try:
        name = "encoder.layer.0.output.dense.weight"
        fisher = fisher_embedding(encoder, texts, labels, parameters=[name])
        param = dict(model.named_parameters())[name]
        # the same head the embedding fits (deterministic L-BFGS from zero on the frozen vectors)
        tokens = encoder.tokenize(texts, 48)
        head = fit_linear_head(encoder.embed(tokens).float(), torch.tensor(labels), 2).double()

        def log_likelihoods() -> torch.Tensor:
            with torch.no_grad():
                pooled = encoder(tokens.input_ids, tokens.attention_mask)
                return torch.log_softmax(head(pooled), -1)[torch.arange(len(labels)), torch.tensor(labels)]

        eps = 1e-5
        flat = param.data.view(-1)
        for j in (0, 7, 333, flat.numel() - 1):
            old = float(flat[j])
            flat[j] = old + eps
            up = log_likelihoods()
            flat[j] = old - eps
            down = log_likelihoods()
            flat[j] = old
            expected = (((up - down) / (2 * eps)) ** 2).mean()
            assert float(fisher[j]) == pytest.approx(float(expected), rel=1e-4, abs=1e-12)
    finally:
        model.float()


def test_fisher_is_label_permutation_invariant_and_sees_labels(encoder, task):
    texts, labels = task
    a = fisher_embedding(encoder, texts, labels)
    b = fisher_embedding(encoder, texts, ["b" if y == 0 else "a" for y in labels])  # swapped names
    # the head is fitted in float64, so only the float32 backward pass differs (~1e-6 relative); a float32 fit
    # differed by ~1e-3 here, because where L-BFGS stops on a flat loss depended on the order of the classes
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-12)
    assert embedding_similarity(a, a) == pytest.approx(1.0)
    shuffled = [labels[(i * 7) % len(labels)] for i in range(len(labels))]
    c = fisher_embedding(encoder, texts, shuffled)
    assert not torch.allclose(a, c, rtol=1e-2)
    assert all(p.requires_grad for p in encoder.model.parameters())  # restored


def test_head_fit_does_not_depend_on_the_order_of_the_classes(encoder, task):
    texts, labels = task
    features = encoder.embed(encoder.tokenize(texts, 48)).float()
    index = torch.tensor(labels)
    head = fit_linear_head(features, index, 2)
    swapped = fit_linear_head(features, 1 - index, 2)
    assert head.weight.dtype == torch.float64
    assert torch.allclose(head.weight, swapped.weight.flip(0), rtol=0, atol=1e-10)
    assert torch.allclose(head.bias, swapped.bias.flip(0), rtol=0, atol=1e-10)


def test_text_embedding_is_the_mean_of_single_encodings(encoder, task):
    texts, _ = task
    one_by_one = torch.stack([encoder.encode([t])[0].double() for t in texts]).mean(0)
    assert torch.allclose(text_embedding(encoder, texts), one_by_one, atol=1e-5)


def test_similarity_is_the_cosine():
    a, b = torch.tensor([1.0, 2.0, 2.0]), torch.tensor([2.0, 0.0, 1.0])
    assert embedding_similarity(a, b) == pytest.approx(4.0 / (3.0 * 5**0.5))
    assert embedding_similarity(a, torch.zeros(3)) == 0.0


def test_errors(encoder, task):
    texts, labels = task
    with pytest.raises(SelectionInputError, match="one class"):
        fisher_embedding(encoder, texts, [0] * len(texts))
    with pytest.raises(SelectionInputError, match="labels for"):
        fisher_embedding(encoder, texts, labels[:-1])
    with pytest.raises(SelectionInputError, match="not parameters of the encoder"):
        fisher_embedding(encoder, texts, labels, parameters=["no.such.weight"])
    with pytest.raises(SelectionInputError, match="no texts"):
        text_embedding(encoder, [])
    with pytest.raises(SelectionInputError, match="different sizes"):
        embedding_similarity(torch.ones(3), torch.ones(4))
