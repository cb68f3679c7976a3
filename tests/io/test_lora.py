"""PEFT LoRA adapters read as full models, checked against peft's own merge_and_unload()."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from transfuse.errors import LoraAdapterError
from transfuse.io import LoraCheckpoint, is_lora_adapter, open_checkpoint

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def make_adapter(base_dir: Path, out_dir: Path, model_cls, config, *, seed: int = 0) -> Path:
    """Wrap the saved base with ``config``, randomise LoRA factors and modules_to_save copies, save."""
    torch.manual_seed(seed)
    model = model_cls.from_pretrained(base_dir)
    peft_model = peft.get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name or "lora_embedding" in name:
                # peft initialises one factor to zero (B; A for embeddings): the delta would be zero
                param.normal_(0.0, 0.5)
            elif "modules_to_save" in name:
                param.add_(torch.randn_like(param))
    peft_model.save_pretrained(out_dir)
    return out_dir


def peft_reference(base_dir: Path, adapter_dir: Path, model_cls) -> dict[str, torch.Tensor]:
    """What peft itself makes of the saved adapter: load it onto a fresh base and merge."""
    model = peft.PeftModel.from_pretrained(model_cls.from_pretrained(base_dir), adapter_dir)
    return {k: v.detach() for k, v in model.merge_and_unload().state_dict().items()}


def read_all(ckpt) -> dict[str, torch.Tensor]:
    return {name: ckpt.tensor(name) for name in ckpt.names()}


LLAMA_CASES = {
    "plain": dict(target_modules=["q_proj", "v_proj"]),
    "rslora": dict(target_modules=["q_proj", "v_proj", "down_proj"], use_rslora=True),
    "modules_to_save": dict(target_modules=["q_proj", "o_proj"], modules_to_save=["lm_head"]),
    "patterns": dict(
        target_modules=["q_proj", "k_proj", "v_proj", "gate_proj"],
        rank_pattern={"k_proj": 2, "model.layers.1.self_attn.q_proj": 8},
        alpha_pattern={"gate_proj": 3, "v_proj": 32},
    ),
    "embedding": dict(target_modules=["embed_tokens", "up_proj"]),
}


@pytest.mark.parametrize("case", list(LLAMA_CASES))
def test_llama_adapter_matches_peft_merge(case, llama_dir, tmp_path, assert_same_tensors):
    config = peft.LoraConfig(r=4, lora_alpha=8, **LLAMA_CASES[case])
    adapter = make_adapter(llama_dir, tmp_path / "adapter", transformers.LlamaForCausalLM, config)
    assert is_lora_adapter(adapter)
    expected = peft_reference(llama_dir, adapter, transformers.LlamaForCausalLM)

    ckpt = open_checkpoint(adapter, lora_base=llama_dir)
    assert isinstance(ckpt, LoraCheckpoint)
    assert ckpt.source == str(adapter)
    assert ckpt.config_dir == llama_dir
    assert ckpt.names() == open_checkpoint(llama_dir).names()
    got = read_all(ckpt)
    assert_same_tensors(got, expected, atol=1e-5)

    base = open_checkpoint(llama_dir)
    adapted = [n for n in ckpt.names() if ckpt.lora_delta(n) is not None]
    assert adapted, "the adapter must change something"
    for name in ckpt.names():
        assert ckpt.info(name).shape == got[name].shape
        assert ckpt.info(name).dtype == got[name].dtype
        if name in adapted:
            assert got[name].dtype == torch.float32
            torch.testing.assert_close(got[name], base.tensor(name) + ckpt.lora_delta(name))
            assert not torch.allclose(got[name], base.tensor(name))
        elif case != "modules_to_save" or name != "lm_head.weight":
            assert torch.equal(got[name], base.tensor(name)), name
    if case == "modules_to_save":
        assert not torch.equal(got["lm_head.weight"], base.tensor("lm_head.weight"))
        assert ckpt.lora_delta("lm_head.weight") is None
    ckpt.close()


def test_base_from_adapter_config_and_bin_adapter(llama_dir, tmp_path, assert_same_tensors):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"])
    adapter = make_adapter(llama_dir, tmp_path / "adapter", transformers.LlamaForCausalLM, config)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(llama_dir)  # from_pretrained(llama_dir) recorded it
    expected = read_all(open_checkpoint(adapter, lora_base=llama_dir))

    # no lora_base: the config's local base path is used
    assert_same_tensors(read_all(open_checkpoint(adapter)), expected)

    # adapter_model.bin instead of safetensors
    from safetensors.torch import load_file

    tensors = load_file(adapter / "adapter_model.safetensors")
    (adapter / "adapter_model.safetensors").unlink()
    torch.save(tensors, adapter / "adapter_model.bin")
    assert_same_tensors(read_all(open_checkpoint(adapter)), expected)

    # the base given as an open checkpoint: used, and left open for its owner
    base = open_checkpoint(llama_dir)
    ckpt = open_checkpoint(adapter, lora_base=base)
    assert_same_tensors(read_all(ckpt), expected)
    ckpt.close()
    base.tensor(base.names()[0])  # still open

    # a Hub id (not a local path) and no lora_base: ask for the base explicitly
    cfg["base_model_name_or_path"] = "meta-llama/Llama-2-7b-hf"
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        LoraAdapterError, match=r"meta-llama/Llama-2-7b-hf.*pass the base model dir explicitly"
    ):
        open_checkpoint(adapter)


def test_fan_in_fan_out_and_lora_bias(tmp_path, assert_same_tensors):
    # GPT-2 stores its projections as Conv1D (in, out): peft needs fan_in_fan_out and transposes the delta
    config = transformers.GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=2, n_head=2)
    torch.manual_seed(0)
    base_dir = tmp_path / "gpt2"
    transformers.GPT2LMHeadModel(config).save_pretrained(base_dir)
    lora = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, lora_bias=True
    )
    adapter = make_adapter(base_dir, tmp_path / "adapter", transformers.GPT2LMHeadModel, lora)
    expected = peft_reference(base_dir, adapter, transformers.GPT2LMHeadModel)
    ckpt = open_checkpoint(adapter, lora_base=base_dir)
    got = read_all(ckpt)
    # transformers 5 may drop the tied lm_head from the state dict; compare what both have
    assert set(got) <= set(expected)
    assert_same_tensors(got, {k: expected[k] for k in got}, atol=1e-5)
    assert ckpt.lora_delta("transformer.h.0.attn.c_attn.bias") is not None
    assert ckpt.info("transformer.h.0.attn.c_attn.weight").shape == (16, 48)


@pytest.mark.parametrize("direction", ["adapter_has_prefix", "base_has_prefix"])
def test_top_level_prefix_is_mapped(direction, bert_config, tmp_path, assert_same_tensors):
    # BertModel saves "encoder.layer...", BertForSequenceClassification "bert.encoder.layer..."
    torch.manual_seed(0)
    bare_dir, head_dir = tmp_path / "bert", tmp_path / "bert_cls"
    transformers.BertForSequenceClassification(bert_config()).save_pretrained(head_dir)
    transformers.BertModel.from_pretrained(head_dir).save_pretrained(bare_dir)
    lora = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["query", "value"])
    if direction == "adapter_has_prefix":
        cls, train_dir, base_dir = transformers.BertForSequenceClassification, head_dir, bare_dir
    else:
        cls, train_dir, base_dir = transformers.BertModel, bare_dir, head_dir
    adapter = make_adapter(train_dir, tmp_path / "adapter", cls, lora)
    trained = peft_reference(train_dir, adapter, cls)
    ckpt = open_checkpoint(adapter, lora_base=base_dir)
    got = read_all(ckpt)
    base_names = set(open_checkpoint(base_dir).names())
    assert set(got) == base_names
    q = "encoder.layer.0.attention.self.query.weight"
    compared = 0
    for name, tensor in got.items():
        plain = name.removeprefix("bert.")
        key = f"bert.{plain}" if direction == "adapter_has_prefix" else plain
        if key in trained:
            torch.testing.assert_close(tensor.float(), trained[key].float(), atol=1e-5, rtol=0, msg=name)
            compared += 1
    assert compared >= len(base_names) - 2  # all but the pooler/classifier-only names
    assert ckpt.lora_delta(q if direction == "adapter_has_prefix" else f"bert.{q}") is not None


# ---------------------------------------------------------------------------------------------- errors


@pytest.fixture
def plain_adapter(llama_dir, tmp_path) -> Path:
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    return make_adapter(llama_dir, tmp_path / "adapter", transformers.LlamaForCausalLM, config)


def edit_config(adapter: Path, **changes) -> None:
    path = adapter / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


def test_dora_is_refused(llama_dir, tmp_path):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], use_dora=True)
    adapter = make_adapter(llama_dir, tmp_path / "dora", transformers.LlamaForCausalLM, config)
    with pytest.raises(LoraAdapterError, match=r"DoRA.*merge_and_unload"):
        open_checkpoint(adapter, lora_base=llama_dir)


def test_other_peft_types_are_refused(llama_dir, tmp_path):
    config = peft.IA3Config(target_modules=["q_proj", "down_proj"], feedforward_modules=["down_proj"])
    adapter = make_adapter(llama_dir, tmp_path / "ia3", transformers.LlamaForCausalLM, config)
    assert is_lora_adapter(adapter)  # a PEFT adapter dir, refused on opening
    with pytest.raises(LoraAdapterError, match=r"IA3 adapter.*only LoRA"):
        open_checkpoint(adapter, lora_base=llama_dir)


def test_wrong_base_shape(plain_adapter, llama_config, tmp_path):
    other = tmp_path / "wider"
    transformers.LlamaForCausalLM(llama_config(hidden_size=32, intermediate_size=64)).save_pretrained(other)
    with pytest.raises(LoraAdapterError, match=r"q_proj.*shape.*different model"):
        open_checkpoint(plain_adapter, lora_base=other)


def test_adapter_key_without_base_tensor(plain_adapter, llama_config, tmp_path):
    other = tmp_path / "shallow"
    transformers.LlamaForCausalLM(llama_config(num_hidden_layers=1)).save_pretrained(other)
    with pytest.raises(LoraAdapterError, match=r"match no tensor of the base.*layers\.1"):
        open_checkpoint(plain_adapter, lora_base=other)


def test_config_and_weight_inconsistencies(plain_adapter, llama_dir):
    edit_config(plain_adapter, r=8)
    with pytest.raises(LoraAdapterError, match="r=8"):
        open_checkpoint(plain_adapter, lora_base=llama_dir)
    edit_config(plain_adapter, r=4, init_lora_weights="pissa")
    with pytest.raises(LoraAdapterError, match="path_initial_model_for_weight_conversion"):
        open_checkpoint(plain_adapter, lora_base=llama_dir)
    edit_config(plain_adapter, init_lora_weights=True, layer_replication=[[0, 2]])
    with pytest.raises(LoraAdapterError, match="layer_replication"):
        open_checkpoint(plain_adapter, lora_base=llama_dir)
    edit_config(plain_adapter, layer_replication=None, base_model_name_or_path=None)
    with pytest.raises(LoraAdapterError, match="does not name its base model"):
        open_checkpoint(plain_adapter)
    (plain_adapter / "adapter_model.safetensors").unlink()
    with pytest.raises(LoraAdapterError, match="no adapter_model.safetensors"):
        open_checkpoint(plain_adapter, lora_base=llama_dir)


def test_lora_adapters_in_a_recipe(llama_dir, llama_state, tmp_path):
    """A PEFT LoRA adapter used as a recipe model, merged end to end, against peft's own merge."""
    import yaml
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM

    import transfuse

    a = make_adapter(
        llama_dir,
        tmp_path / "a",
        LlamaForCausalLM,
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        seed=1,
    )
    b = make_adapter(
        llama_dir,
        tmp_path / "b",
        LlamaForCausalLM,
        peft.LoraConfig(r=2, lora_alpha=4, target_modules=["o_proj"]),
        seed=2,
    )
    recipe = {
        "merge_method": "task_arithmetic",
        "base_model": str(llama_dir),
        "models": [
            {"model": str(a), "parameters": {"weight": 0.7}},
            {"model": f"{llama_dir}+{b}", "parameters": {"weight": -0.5}},  # MergeKit's model+lora syntax
        ],
        "dtype": "float32",
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = transfuse.merge(path, tmp_path / "out", progress=False).out_dir
    got = load_file(out / "model.safetensors")
    base = {k: v.float() for k, v in llama_state.items()}
    ref_a = peft_reference(
        llama_dir, a, LlamaForCausalLM
    )  # peft's merge_and_unload: an independent reference
    ref_b = peft_reference(llama_dir, b, LlamaForCausalLM)
    changed = 0
    for name, value in got.items():
        expected = (
            base[name] + 0.7 * (ref_a[name].float() - base[name]) - 0.5 * (ref_b[name].float() - base[name])
        )
        torch.testing.assert_close(value.float(), expected, rtol=0, atol=1e-5)
        changed += not torch.equal(value.float(), base[name])
    assert changed >= 3  # q, v and o projections moved
