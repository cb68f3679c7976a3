"""LoRA extraction: adapters that PEFT loads and merges back into the fine-tune, errors checked independently."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from transfuse.cli import app
from transfuse.errors import (
    InvalidOptionError,
    MissingTensorError,
    NotSameBaseError,
    OutputExistsError,
    OutputOverlapsInputError,
    ShapeMismatchError,
)
from transfuse.lora_extract import extract_lora
from transfuse.lora_factor import low_rank_factors, rank_for_energy

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

TRUE_RANK = 3


def tiny_llama(**overrides):
    shape = dict(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4
    )
    config = transformers.LlamaConfig(**(shape | overrides), num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config)


def tiny_bert():
    config = transformers.BertConfig(
        vocab_size=60, hidden_size=24, num_hidden_layers=2, num_attention_heads=2, intermediate_size=40
    )
    torch.manual_seed(0)
    return transformers.BertModel(config)


def low_rank(shape, rank, gen, scale=0.05):
    return scale * torch.randn(shape[0], rank, generator=gen) @ torch.randn(rank, shape[1], generator=gen)


def fine_tune(model, *, rank=TRUE_RANK, noise=0.0, norms=True, biases=True, embeddings=True, seed=1):
    """A copy of `model` whose every Linear weight changes by a rank-`rank` delta (+ `noise`·randn), and whose
    norms, biases and embeddings change too when asked; returns the new state dict."""
    gen = torch.Generator().manual_seed(seed)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    embeds = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Embedding)}
    for name, t in sd.items():
        module = name.rpartition(".")[0]
        if module in linears and t.ndim == 2 and (embeddings or not name.startswith("lm_head")):
            t += low_rank(t.shape, rank, gen) + noise * torch.randn(t.shape, generator=gen)
        elif module in embeds and embeddings:
            t += low_rank(t.shape, rank, gen)
        elif t.ndim == 1 and module in linears and biases:
            t += 0.01 * torch.randn(t.shape, generator=gen)
        elif t.ndim == 1 and module not in linears and norms and t.is_floating_point():
            t += 0.01 * torch.randn(t.shape, generator=gen)
    return sd


def save(model, sd, path: Path) -> Path:
    model.load_state_dict(sd)
    model.save_pretrained(path)
    return path


@pytest.fixture
def llama_pair(tmp_path):
    model = tiny_llama()
    base = save(model, model.state_dict(), tmp_path / "base")
    ft_sd = fine_tune(model)
    ft = save(model, ft_sd, tmp_path / "ft")
    return base, ft, ft_sd


def peft_merged(base_dir: Path, adapter: Path, cls) -> dict[str, torch.Tensor]:
    model = peft.PeftModel.from_pretrained(cls.from_pretrained(base_dir), adapter)
    return {k: v.detach() for k, v in model.merge_and_unload().state_dict().items()}


def assert_reproduces(merged, ft_sd, atol=2e-6):
    for name, t in ft_sd.items():
        if name in merged:
            torch.testing.assert_close(merged[name], t, atol=atol, rtol=1e-5, msg=name)


@pytest.mark.parametrize("embed_lora", [False, True])
def test_llama_adapter_applied_by_peft_reproduces_the_fine_tune(llama_pair, tmp_path, embed_lora):
    base, ft, ft_sd = llama_pair
    out = tmp_path / "adapter"
    result = extract_lora(ft, base, out, rank=TRUE_RANK, embed_lora=embed_lora)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base)
    assert config["r"] == config["lora_alpha"] == TRUE_RANK
    expected = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert set(config["target_modules"]) == expected | ({"embed_tokens", "lm_head"} if embed_lora else set())
    full = set(config["modules_to_save"])
    assert {"model.norm", "model.layers.0.input_layernorm"} <= full
    assert ({"model.embed_tokens", "lm_head"} <= full) != embed_lora
    assert result.overall_relative_error < 1e-5
    assert_reproduces(peft_merged(base, out, transformers.LlamaForCausalLM), ft_sd)
    report = json.loads((out / "extraction.json").read_text())
    assert report["overall_relative_error"] == pytest.approx(result.overall_relative_error)
    assert len(report["matrices"]) == 14 + (2 if embed_lora else 0)


def test_bert_biases_go_into_lora_bias_and_norms_into_modules_to_save(tmp_path):
    model = tiny_bert()
    base = save(model, model.state_dict(), tmp_path / "base")
    ft_sd = fine_tune(model, embeddings=False)
    ft = save(model, ft_sd, tmp_path / "ft")
    out = tmp_path / "adapter"
    extract_lora(ft, base, out, rank=TRUE_RANK, svd="exact")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["lora_bias"] is True
    assert set(config["target_modules"]) == {"query", "key", "value", "dense"}
    assert "encoder.layer.0.attention.output.LayerNorm" in config["modules_to_save"]
    assert_reproduces(peft_merged(base, out, transformers.BertModel), ft_sd)


def test_mixed_biases_fall_back_to_whole_modules(tmp_path):
    """Qwen2 has biases on q/k/v but not o_proj: lora_bias cannot apply, the biased layers are saved whole."""
    config = transformers.Qwen2Config(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(config)
    base = save(model, model.state_dict(), tmp_path / "base")
    ft_sd = fine_tune(model)
    ft = save(model, ft_sd, tmp_path / "ft")
    out = tmp_path / "adapter"
    result = extract_lora(ft, base, out, rank=TRUE_RANK)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["lora_bias"] is False
    assert "model.layers.0.self_attn.q_proj" in cfg["modules_to_save"]
    assert "q_proj" not in cfg["target_modules"] and "o_proj" in cfg["target_modules"]
    assert any("lora_bias" in note for note in result.notes)
    assert_reproduces(peft_merged(base, out, transformers.Qwen2ForCausalLM), ft_sd)


def test_reported_error_is_the_eckart_young_tail(tmp_path):
    model = tiny_llama()
    base = save(model, model.state_dict(), tmp_path / "base")
    ft_sd = fine_tune(model, rank=8, noise=0.01, norms=False, embeddings=False)
    ft = save(model, ft_sd, tmp_path / "ft")
    result = extract_lora(ft, base, tmp_path / "a", rank=2, svd="exact")
    base_sd = model.__class__.from_pretrained(base).state_dict()
    tails, totals = [], []
    for m in result.matrices:
        delta = (ft_sd[m.name] - base_sd[m.name]).double().numpy()
        s = np.linalg.svd(delta, compute_uv=False)
        tail, total = float(np.sum(s[2:] ** 2)), float(np.sum(s**2))
        assert m.relative_error == pytest.approx(np.sqrt(tail / total), rel=1e-4)
        tails.append(tail)
        totals.append(total)
    assert result.overall_relative_error == pytest.approx(np.sqrt(sum(tails) / sum(totals)), rel=1e-4)


def test_energy_threshold_picks_the_rank_of_a_known_spectrum():
    # singular values 4, 2, 1, 0.5, ...: energies 16, 4, 1, 0.25 -> 16/21.25 = 0.753, 20/21.25 = 0.941
    gen = torch.Generator().manual_seed(0)
    q1 = torch.linalg.qr(torch.randn(40, 4, generator=gen)).Q
    q2 = torch.linalg.qr(torch.randn(30, 4, generator=gen)).Q
    delta = q1 @ torch.diag(torch.tensor([4.0, 2.0, 1.0, 0.5])) @ q2.T
    for svd in ("exact", "randomized"):
        assert low_rank_factors(delta, rank=30, energy=0.75, svd=svd).rank == 1
        assert low_rank_factors(delta, rank=30, energy=0.76, svd=svd).rank == 2
        assert low_rank_factors(delta, rank=30, energy=0.94, svd=svd).rank == 2
        assert low_rank_factors(delta, rank=30, energy=0.95, svd=svd).rank == 3
        assert low_rank_factors(delta, rank=2, energy=0.99, svd=svd).rank == 2  # the cap
        assert low_rank_factors(delta, rank=30, energy=1.0, svd=svd).rank == 4
    assert rank_for_energy(torch.tensor([4.0, 2.0]), 21.25, 0.99) is None


def test_energy_gives_per_module_ranks_that_peft_applies(tmp_path):
    model = tiny_llama()
    base = save(model, model.state_dict(), tmp_path / "base")
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(3)
    sd["model.layers.0.self_attn.q_proj.weight"] += low_rank((32, 32), 2, gen)
    sd["model.layers.1.mlp.up_proj.weight"] += low_rank((48, 32), 5, gen)
    ft = save(model, sd, tmp_path / "ft")
    out = tmp_path / "adapter"
    result = extract_lora(ft, base, out, rank=16, energy=1.0)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 5
    assert config["rank_pattern"] == {"model.layers.0.self_attn.q_proj": 2}
    assert config["alpha_pattern"] == {"model.layers.0.self_attn.q_proj": 2}
    assert [m.rank for m in result.matrices] == [2, 5]
    assert_reproduces(peft_merged(base, out, transformers.LlamaForCausalLM), sd)


def test_randomized_and_exact_agree_on_a_low_rank_delta():
    gen = torch.Generator().manual_seed(0)
    delta = low_rank((200, 150), 6, gen) + 1e-4 * torch.randn(200, 150, generator=gen)
    exact = low_rank_factors(delta, rank=6, svd="exact")
    randomized = low_rank_factors(delta, rank=6, svd="randomized")
    assert randomized.relative_error == pytest.approx(exact.relative_error, rel=1e-2)
    for split in ("sqrt", "b"):
        f = low_rank_factors(delta, rank=6, svd="exact", split=split)
        assert torch.dist(f.b @ f.a, exact.b @ exact.a) < 1e-4


def test_cli_end_to_end(llama_pair, tmp_path):
    base, ft, ft_sd = llama_pair
    out = tmp_path / "cli-adapter"
    args = ["lora", "extract", "--model", str(ft), "--base", str(base), "--rank", str(TRUE_RANK), str(out)]
    result = CliRunner().invoke(app, [*args, "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "overall relative error 0.0000" in " ".join(result.output.split())
    assert (out / "adapter_model.safetensors").is_file() and (out / "extraction.json").is_file()
    assert_reproduces(peft_merged(base, out, transformers.LlamaForCausalLM), ft_sd)
    again = CliRunner().invoke(app, [*args, "--no-progress"])
    assert again.exit_code == 2 and "OutputExistsError" in again.output
    bad = CliRunner().invoke(app, [*args[:-2], "0", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "rank must be" in " ".join(bad.output.split())


def test_documented_errors(llama_pair, tmp_path):
    base, ft, _ = llama_pair
    out = tmp_path / "out"
    with pytest.raises(InvalidOptionError, match="rank"):
        extract_lora(ft, base, out, rank=0)
    for energy in (0.0, 1.5, -0.1):
        with pytest.raises(InvalidOptionError, match="energy"):
            extract_lora(ft, base, out, energy=energy)
    with pytest.raises(InvalidOptionError, match="svd"):
        extract_lora(ft, base, out, svd="qr")
    with pytest.raises(InvalidOptionError, match="device"):
        extract_lora(ft, base, out, device="tpu")
    with pytest.raises(OutputOverlapsInputError):
        extract_lora(ft, base, ft / "adapter")
    with pytest.raises(OutputOverlapsInputError):
        extract_lora(ft, base, tmp_path)
    (out / "x").parent.mkdir()
    (out / "x").write_text("busy")
    with pytest.raises(OutputExistsError):
        extract_lora(ft, base, out)
    other = tiny_llama(hidden_size=16, intermediate_size=24)
    other_dir = save(other, other.state_dict(), tmp_path / "other")
    with pytest.raises(ShapeMismatchError):
        extract_lora(other_dir, base, tmp_path / "o1")
    bert = tiny_bert()
    bert_dir = save(bert, bert.state_dict(), tmp_path / "bert")
    with pytest.raises(NotSameBaseError):
        extract_lora(bert_dir, base, tmp_path / "o2")
    from safetensors.torch import load_file, save_file

    partial = load_file(ft / "model.safetensors")
    partial.pop("model.norm.weight")
    (tmp_path / "partial").mkdir()
    save_file(partial, tmp_path / "partial" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(MissingTensorError):
        extract_lora(tmp_path / "partial", base, tmp_path / "o3")
    assert not any(p.name.startswith(".o") for p in tmp_path.iterdir())  # no temp dirs left
    assert sorted(p.name for p in ft.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
    ]


@pytest.mark.parametrize(
    "config_cls", ["LlamaConfig", "MistralConfig", "Qwen2Config", "Gemma2Config", "Phi3Config"]
)
def test_layer_kinds_read_from_names_match_the_model_classes(tmp_path, config_cls):
    """The families whose kinds are read from the names (no model import) give what the model class says."""
    from transfuse.lora_targets import NAMED_BY_CONVENTION, kinds_from_model_class, module_kinds

    config = getattr(transformers, config_cls)(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, tie_word_embeddings=False, pad_token_id=0,
    )  # fmt: skip
    assert config.model_type in NAMED_BY_CONVENTION
    config.architectures = [config_cls.replace("Config", "ForCausalLM")]
    config.save_pretrained(tmp_path)
    with torch.device("meta"):
        model = getattr(transformers, config.architectures[0])(config)
    shapes = {n: tuple(p.shape) for n, p in model.state_dict().items()}
    by_names, note = module_kinds(tmp_path, shapes)
    assert note is None
    from_model, _ = kinds_from_model_class(tmp_path)
    assert by_names == {m: from_model[m] for m in by_names}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_gives_the_cpu_adapter(llama_pair, tmp_path):
    base, ft, _ = llama_pair
    cpu = extract_lora(ft, base, tmp_path / "cpu", rank=2, svd="randomized")
    gpu = extract_lora(ft, base, tmp_path / "gpu", rank=2, svd="randomized", device="cuda")
    for a, b in zip(cpu.matrices, gpu.matrices, strict=True):
        assert a.name == b.name and a.relative_error == pytest.approx(b.relative_error, rel=1e-4, abs=1e-6)


def test_layers_peft_cannot_adapt_are_skipped_with_a_note(tmp_path):
    """GPT-2's Conv1D layers are skipped (named in the notes and extraction.json); the embedding is factored."""
    config = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=1, n_head=2)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    base = save(model, model.state_dict(), tmp_path / "base")
    gen = torch.Generator().manual_seed(0)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd["transformer.wte.weight"] += low_rank((64, 32), 2, gen)
    sd["lm_head.weight"] = sd["transformer.wte.weight"]  # tied: loading the old copy would undo the change
    sd["transformer.h.0.attn.c_attn.weight"] += low_rank((32, 96), 2, gen)
    ft = save(model, sd, tmp_path / "ft")
    result = extract_lora(ft, base, tmp_path / "adapter", rank=2, embed_lora=True)
    assert result.skipped == ["transformer.h.0.attn.c_attn.weight"]
    assert any("c_attn" in note and "does not adapt" in note for note in result.notes)
    assert [m.name for m in result.matrices] == ["transformer.wte.weight"]
    report = json.loads((tmp_path / "adapter" / "extraction.json").read_text())
    assert report["skipped"] == result.skipped
    merged = peft_merged(base, tmp_path / "adapter", transformers.GPT2LMHeadModel)
    torch.testing.assert_close(
        merged["transformer.wte.weight"], sd["transformer.wte.weight"], atol=2e-6, rtol=1e-5
    )
