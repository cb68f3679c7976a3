"""Tiny models built in the test (nothing downloaded), shared by the I/O tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")


def tiny_llama_config(**overrides):
    kwargs = dict(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
        tie_word_embeddings=False,
    )
    kwargs.update(overrides)
    return transformers.LlamaConfig(**kwargs)


def tiny_bert_config(**overrides):
    kwargs = dict(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        num_labels=3,
    )
    kwargs.update(overrides)
    return transformers.BertConfig(**kwargs)


def state_dict_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory) -> Path:
    """A tiny LlamaForCausalLM saved by transformers in several safetensors shards, plus tokenizer files."""
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(tiny_llama_config())
    out = tmp_path_factory.mktemp("llama") / "base"
    model.save_pretrained(out, max_shard_size="12KB")
    (out / "tokenizer.json").write_text('{"version": "1.0"}')
    (out / "tokenizer_config.json").write_text('{"model_max_length": 32}')
    (out / "special_tokens_map.json").write_text("{}")
    return out


@pytest.fixture(scope="session")
def llama_state(llama_dir) -> dict[str, torch.Tensor]:
    return state_dict_of(transformers.LlamaForCausalLM.from_pretrained(llama_dir))


def _assert_same_tensors(
    actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], atol: float = 0.0
):
    assert set(actual) == set(expected)
    for name, tensor in expected.items():
        got = actual[name]
        assert got.shape == tensor.shape, name
        if atol == 0.0:
            assert got.dtype == tensor.dtype, name
            assert torch.equal(got, tensor), name
        else:
            torch.testing.assert_close(got.float(), tensor.float(), atol=atol, rtol=0, msg=name)


# Helpers as fixtures (importing from conftest is fragile when several test dirs have one).
@pytest.fixture(scope="session")
def assert_same_tensors():
    """``assert_same_tensors(actual, expected, atol=0)``: same names, shapes, values (dtypes when exact)."""
    return _assert_same_tensors


@pytest.fixture(scope="session")
def llama_config():
    return tiny_llama_config


@pytest.fixture(scope="session")
def bert_config():
    return tiny_bert_config
