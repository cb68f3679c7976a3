"""``transfuse moe``: Mixtral MoEs from tiny dense Llama experts made here (a base + 3 experts that are the base with
perturbed MLPs and, for one, perturbed attention too).

Checked: the output loads as ``MixtralForCausalLM`` with no missing / unexpected keys in both layouts and generates;
each expert's MLP lands in its slot; with every expert active and a uniform router the MoE equals an independent
average of the experts' MLPs; router rows equal an independent re-derivation for every prompt gate mode; random
gates are deterministic per seed; batched (padded) hidden gates equal the one-prompt-at-a-time computation;
cheap_embed / hidden / hidden_avg agree with ``mergekit-moe`` (when installed); every documented refusal happens
before anything is written.  Qwen2-MoE output (``architecture: qwen``): tests/test_moe_qwen.py, on these fixtures.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml
from safetensors import safe_open

from transfuse.errors import (
    ConfigError,
    InvalidOptionError,
    MissingTensorError,
    NotSameBaseError,
    OutputExistsError,
    OutputOverlapsInputError,
    RecipeError,
    ShapeMismatchError,
)
from transfuse.moe import build_moe
from transfuse.moe.gates import normalize_rows

HIDDEN, INTER, LAYERS, VOCAB = 32, 48, 2, 128
PROMPTS = [
    (["add two numbers", "math is fun"], []),
    (["write a short poem"], ["numbers"]),
    (["def f(x): return x"], []),
]


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    special = ["<unk>", "<s>", "</s>"]
    vocab = {w: i for i, w in enumerate(special + [chr(c) for c in range(32, 127)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")  # one token per character
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def _config(**overrides):
    from transformers import LlamaConfig

    values = dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INTER,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    values.update(overrides)
    return LlamaConfig(**values)


def _save(model, path, tokenizer=True):
    model.save_pretrained(path)
    if tokenizer:
        _tokenizer().save_pretrained(path)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from transformers import LlamaForCausalLM

    root = tmp_path_factory.mktemp("moe_models")
    torch.manual_seed(0)
    base = LlamaForCausalLM(_config()).eval()
    _save(base, root / "base")
    for i in range(3):
        state = {k: v.clone() for k, v in base.state_dict().items()}
        g = torch.Generator().manual_seed(10 + i)
        for k, v in state.items():
            if ".mlp." in k or (i == 2 and "self_attn" in k):  # expert 2 also changed its attention
                v.add_(torch.randn(v.shape, generator=g) * 0.05)
        model = LlamaForCausalLM(_config())
        model.load_state_dict(state)
        _save(model, root / f"e{i}")
    return root


def _recipe(root, gate_mode="hidden", k=2, n=3, **extra):
    data = {
        "base_model": str(root / "base"),
        "gate_mode": gate_mode,
        "dtype": "float32",
        "experts_per_token": k,
        "experts": [
            {"source_model": str(root / f"e{i}"), "positive_prompts": PROMPTS[i][0]}
            | ({"negative_prompts": PROMPTS[i][1]} if PROMPTS[i][1] else {})
            for i in range(n)
        ],
    }
    data.update(extra)
    return data


def _tensors(out):
    result = {}
    for f in sorted(out.glob("*.safetensors")):
        with safe_open(f, "pt") as fh:
            result.update({k: fh.get_tensor(k) for k in fh.keys()})
    return result


def _load(out):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(str(out), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


def _dense(root, name):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(str(root / name)).eval()


@pytest.mark.parametrize("layout", ["per_expert", "fused"])
def test_loads_generates_and_experts_land_in_their_slots(models, tmp_path, layout):
    out = tmp_path / "moe"
    result = build_moe(_recipe(models, "cheap_embed"), out, layout=layout)
    assert result.out_dir == out and result.num_experts == 3 and result.tensors_written == len(_tensors(out))
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["MixtralForCausalLM"] and config["model_type"] == "mixtral"
    assert config["num_local_experts"] == 3 and config["num_experts_per_tok"] == 2
    assert (out / "tokenizer.json").is_file() and (out / "moe_recipe.yaml").is_file()
    model = _load(out)
    assert type(model).__name__ == "MixtralForCausalLM"
    generated = model.generate(torch.tensor([[1, 40, 41, 42]]), max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, 8)

    state = model.state_dict()
    base = _dense(models, "base").state_dict()
    for layer in range(LAYERS):
        experts = state[f"model.layers.{layer}.mlp.experts.gate_up_proj"]  # [E, 2I, H] in transformers 5
        down = state[f"model.layers.{layer}.mlp.experts.down_proj"]
        for e in range(3):
            dense = _dense(models, f"e{e}").state_dict()
            prefix = f"model.layers.{layer}.mlp"
            assert torch.equal(experts[e, :INTER], dense[f"{prefix}.gate_proj.weight"])
            assert torch.equal(experts[e, INTER:], dense[f"{prefix}.up_proj.weight"])
            assert torch.equal(down[e], dense[f"{prefix}.down_proj.weight"])
        for name in ("self_attn.q_proj.weight", "self_attn.o_proj.weight", "post_attention_layernorm.weight"):
            key = f"model.layers.{layer}.{name}"
            assert torch.equal(state[key], base[key])  # attention from the base, not from expert 2
        assert torch.allclose(state[f"model.layers.{layer}.mlp.gate.weight"], result.gates[layer])
    assert torch.equal(state["model.embed_tokens.weight"], base["model.embed_tokens.weight"])
    assert torch.equal(state["lm_head.weight"], base["lm_head.weight"])
    names = _tensors(out)
    if layout == "per_expert":
        assert "model.layers.0.block_sparse_moe.experts.2.w3.weight" in names
    else:
        assert "model.layers.0.mlp.experts.gate_up_proj" in names


def test_uniform_router_with_every_expert_equals_the_average_of_expert_mlps(models, tmp_path):
    """experts_per_token = E and a zero router (softmax uniform): each MoE layer is the mean of the experts'
    MLPs on the base's attention; computed here with the base model and the dense experts' MLP modules."""
    out = tmp_path / "moe"
    build_moe(_recipe(models, "random", k=3), out)
    moe = _load(out)
    with torch.no_grad():
        for layer in moe.model.layers:
            layer.mlp.gate.weight.zero_()

    reference = _dense(models, "base")
    experts = [_dense(models, f"e{i}") for i in range(3)]

    class MeanOfExperts(torch.nn.Module):
        def __init__(self, mlps):
            super().__init__()
            self.mlps = torch.nn.ModuleList(mlps)

        def forward(self, x):
            return sum(m(x) for m in self.mlps) / len(self.mlps)

    for i, layer in enumerate(reference.model.layers):
        layer.mlp = MeanOfExperts([e.model.layers[i].mlp for e in experts])
    ids = torch.tensor([[1, 50, 60, 70, 80, 90]])
    with torch.no_grad():
        got, want = moe(ids).logits, reference(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _prompt_ids(prompts):
    tok = _tokenizer()
    return [torch.tensor([tok(tok.bos_token + p, add_special_tokens=False)["input_ids"]]) for p in prompts]


def _rederive_hidden(models, mode):
    """The documented formula, one prompt at a time (no padding anywhere), from output_hidden_states (hidden,
    hidden_last, hidden_avg) or a hook on post_attention_layernorm (hidden_mlp)."""
    base = _dense(models, "base")
    captured = {}
    for i, layer in enumerate(base.model.layers):
        layer.post_attention_layernorm.register_forward_hook(
            lambda mod, args, output, i=i: captured.__setitem__(i, output[0])
        )

    def summary(ids):
        with torch.no_grad():
            hs = base(ids, output_hidden_states=True).hidden_states
        if mode == "hidden_mlp":
            return torch.stack([captured[i].mean(dim=0) for i in range(LAYERS)])
        layer_inputs = torch.stack([hs[i][0] for i in range(LAYERS)])
        return layer_inputs[:, -1] if mode in ("hidden", "hidden_last") else layer_inputs.mean(dim=1)

    rows = []
    for positive, negative in PROMPTS:
        v = torch.stack([summary(ids) for ids in _prompt_ids(positive)]).mean(dim=0)
        if negative:
            v = v - torch.stack([summary(ids) for ids in _prompt_ids(negative)]).mean(dim=0)
        rows.append(v / v.norm(dim=-1, keepdim=True).clamp(min=1e-8))
    return torch.stack(rows, dim=1)


@pytest.mark.parametrize("mode", ["hidden", "hidden_last", "hidden_avg", "hidden_mlp"])
def test_hidden_gate_rows_equal_an_independent_rederivation(models, tmp_path, mode):
    """transfuse batches the prompts (right-padded, lengths 12-19 here); the reference runs each alone."""
    out = tmp_path / "moe"
    result = build_moe(_recipe(models, mode), out)
    want = _rederive_hidden(models, mode)
    torch.testing.assert_close(result.gates, want, rtol=1e-5, atol=1e-6)
    written = _tensors(out)
    for layer in range(LAYERS):
        torch.testing.assert_close(written[f"model.layers.{layer}.block_sparse_moe.gate.weight"], want[layer])
    assert torch.allclose(result.gates.norm(dim=-1), torch.ones(LAYERS, 3))
    assert any("mergekit-moe does not accept" in n for n in result.notes) == (mode == "hidden_mlp")
    # experts[0]'s two prompts differ in length: MergeKit's hidden_avg would count its padding
    assert any("hidden_avg: the prompts of experts[0] differ" in n for n in result.notes) == (
        mode == "hidden_avg"
    )


@pytest.mark.parametrize("mode", ["hidden", "hidden_avg", "hidden_mlp"])
def test_batched_hidden_gates_equal_one_prompt_at_a_time(models, mode):
    """The padded batches (one, or several under a small token budget) give the rows of the unbatched run, and
    each prompt's summary equals its own unpadded forward pass."""
    from transfuse.moe import gates as gate_lib

    tok = _tokenizer()
    tokenized = [
        (gate_lib.tokenize_prompts(tok, pos, VOCAB), gate_lib.tokenize_prompts(tok, neg, VOCAB))
        for pos, neg in PROMPTS
    ]
    site, reduce = gate_lib.HIDDEN_MODES[mode]
    probe = gate_lib.HiddenStateProbe(models / "base", torch.float32, site)
    try:
        alone = gate_lib.hidden_gates(probe, mode, tokenized, max_prompts=1)
        batched = gate_lib.hidden_gates(probe, mode, tokenized)
        chunked = gate_lib.hidden_gates(probe, mode, tokenized, max_tokens=40)
        torch.testing.assert_close(batched, alone, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(chunked, alone, rtol=1e-5, atol=1e-6)
        prompts = [ids for pos, neg in tokenized for ids in (*pos, *neg)]
        assert len({len(ids) for ids in prompts}) > 3  # padding really happens
        together = probe.summaries(prompts, reduce)
        for row, ids in enumerate(prompts):
            torch.testing.assert_close(together[row], probe.summaries([ids], reduce)[0], rtol=1e-5, atol=1e-6)
    finally:
        probe.close()


def test_prompt_batches_are_longest_first_within_the_budget():
    from transfuse.moe.gates import prompt_batches

    prompts = [torch.zeros(n, dtype=torch.long) for n in (3, 10, 5, 10, 2, 30)]
    assert prompt_batches(prompts) == [[5, 1, 3, 2, 0, 4]]
    assert prompt_batches(prompts, max_tokens=20) == [[5], [1, 3], [2, 0, 4]]
    assert prompt_batches(prompts, max_prompts=2) == [[5, 1], [3, 2], [0, 4]]
    assert prompt_batches(prompts, max_prompts=1) == [[i] for i in (5, 1, 3, 2, 0, 4)]


def test_bfloat16_gate_dtype_is_close_to_float32(models, tmp_path):
    recipe = _recipe(models, "hidden")
    f32 = build_moe(recipe, tmp_path / "a").gates
    bf16 = build_moe(recipe, tmp_path / "b", gate_dtype="bfloat16").gates
    assert not torch.equal(f32, bf16)
    assert bool((torch.nn.functional.cosine_similarity(f32, bf16, dim=-1) > 0.99).all())


def test_cheap_embed_rows_equal_an_independent_rederivation(models, tmp_path):
    result = build_moe(_recipe(models, "cheap_embed"), tmp_path / "moe")
    embed = _dense(models, "base").model.embed_tokens.weight.detach()
    rows = []
    for positive, negative in PROMPTS:
        v = normalize_rows(sum(embed[ids[0]].sum(dim=0) for ids in _prompt_ids(positive)))
        if negative:
            v = v - normalize_rows(sum(embed[ids[0]].sum(dim=0) for ids in _prompt_ids(negative)))
        rows.append(normalize_rows(v))
    want = torch.stack(rows).unsqueeze(0).expand(LAYERS, -1, -1)
    torch.testing.assert_close(result.gates, want)


def test_random_gates_are_deterministic_per_seed(models, tmp_path):
    recipe = _recipe(models, "random")
    a = build_moe(recipe, tmp_path / "a").gates
    b = build_moe(recipe, tmp_path / "b").gates
    c = build_moe(recipe, tmp_path / "c", seed=7).gates
    d = build_moe({**recipe, "seed": 7}, tmp_path / "d").gates
    assert torch.equal(a, b) and torch.equal(c, d) and not torch.equal(a, c)
    assert a.shape == (LAYERS, 3, HIDDEN)
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (
        tmp_path / "b" / "model.safetensors"
    ).read_bytes()
    u = build_moe(_recipe(models, "uniform_random"), tmp_path / "u").gates
    assert u.abs().max() <= HIDDEN**-0.5


def test_residual_scale_and_seeded_noise(models, tmp_path):
    recipe = _recipe(models, "random")
    recipe["experts"][0]["residual_scale"] = 2.0
    recipe["experts"][1]["noise_scale"] = 0.01
    build_moe(recipe, tmp_path / "a")
    build_moe(recipe, tmp_path / "b")
    got = _tensors(tmp_path / "a")
    e0, e1 = _dense(models, "e0").state_dict(), _dense(models, "e1").state_dict()
    prefix = "model.layers.1.block_sparse_moe.experts"
    torch.testing.assert_close(got[f"{prefix}.0.w2.weight"], 2 * e0["model.layers.1.mlp.down_proj.weight"])
    assert torch.equal(got[f"{prefix}.0.w1.weight"], e0["model.layers.1.mlp.gate_proj.weight"])
    noise = got[f"{prefix}.1.w1.weight"] - e1["model.layers.1.mlp.gate_proj.weight"]
    assert 0.005 < float(noise.std()) < 0.015
    assert torch.equal(got[f"{prefix}.1.w1.weight"], _tensors(tmp_path / "b")[f"{prefix}.1.w1.weight"])


def test_bfloat16_output_and_mistral_tied_base(tmp_path):
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INTER,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=16,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(1)
    base = MistralForCausalLM(config)
    _save(base, tmp_path / "base")
    for i in range(2):
        state = {
            k: v + 0.01 * (i + 1) * torch.ones_like(v) if ".mlp." in k else v
            for k, v in base.state_dict().items()
        }
        model = MistralForCausalLM(config)
        model.load_state_dict(state)
        _save(model, tmp_path / f"e{i}")
    recipe = _recipe(tmp_path, "cheap_embed", n=2)
    recipe["dtype"] = "bfloat16"
    result = build_moe(recipe, tmp_path / "moe")
    assert result.out_dtype == "bfloat16" and any("sliding_window 16" in n for n in result.notes)
    config = json.loads((tmp_path / "moe" / "config.json").read_text())
    assert config["sliding_window"] == 16 and config["tie_word_embeddings"] is True
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"
    written = _tensors(tmp_path / "moe")
    assert "lm_head.weight" not in written and all(t.dtype == torch.bfloat16 for t in written.values())
    model = _load(tmp_path / "moe")
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


# ------------------------------------------------------------------------------------------------ parity


def _mergekit_gates(models, recipe, tmp_path):
    pytest.importorskip("mergekit")
    from mergekit.merge import MergeOptions
    from mergekit.moe.config import MoEMergeConfig
    from mergekit.scripts.moe import build

    out = tmp_path / "mergekit"
    config = MoEMergeConfig.model_validate(recipe)
    build(config, str(out), MergeOptions(device="cpu"))
    written = _tensors(out)
    return torch.stack([written[f"model.layers.{i}.mlp.gate.weight"] for i in range(LAYERS)]).float()


def test_cheap_embed_router_rows_match_mergekit(models, tmp_path):
    recipe = _recipe(models, "cheap_embed")
    ours = build_moe(recipe, tmp_path / "ours", layout="fused")
    theirs = _mergekit_gates(models, recipe, tmp_path)
    torch.testing.assert_close(ours.gates, theirs, rtol=1e-6, atol=1e-6)
    a, b = _tensors(tmp_path / "ours"), _tensors(tmp_path / "mergekit")
    assert set(a) == set(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_hidden_router_rows_match_mergekit_hidden(models, tmp_path):
    """The same recipe (gate_mode: hidden) in both tools: MergeKit's activations in bfloat16 (its left-padded
    batches), transfuse's in float32 (right-padded batches)."""
    recipe = _recipe(models, "hidden")
    theirs = _mergekit_gates(models, recipe, tmp_path)
    ours = build_moe(recipe, tmp_path / "ours").gates
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-2)  # bf16 rounding of MergeKit's activations
    cosine = torch.nn.functional.cosine_similarity(ours, theirs, dim=-1)
    assert bool((cosine > 0.999).all()), cosine


def test_hidden_avg_router_rows_match_mergekit_when_prompt_lengths_agree(models, tmp_path):
    """MergeKit's hidden_avg divides by the padded length and counts its left padding: the rows agree where every
    prompt list has one token count, and differ (experts[0] here) where they do not, as docs/moe.md says."""
    recipe = _recipe(models, "hidden_avg")
    recipe["experts"][0]["positive_prompts"] = ["add two numbers", "math is lovely!"]  # 15 characters each
    theirs = _mergekit_gates(models, recipe, tmp_path)
    result = build_moe(recipe, tmp_path / "ours")
    assert not any("hidden_avg: the prompts" in n for n in result.notes)
    torch.testing.assert_close(result.gates, theirs, rtol=0, atol=1e-2)
    assert bool((torch.nn.functional.cosine_similarity(result.gates, theirs, dim=-1) > 0.999).all())

    uneven = _recipe(models, "hidden_avg")  # experts[0]: 15 and 11 characters
    theirs = _mergekit_gates(models, uneven, tmp_path / "uneven")
    ours = build_moe(uneven, tmp_path / "ours-uneven").gates
    torch.testing.assert_close(ours[:, 1:], theirs[:, 1:], rtol=0, atol=1e-2)
    assert float((ours[:, 0] - theirs[:, 0]).abs().max()) > 0.05


# ------------------------------------------------------------------------------------------------ refusals


def _expect_refusal(recipe, out, error, match, **kwargs):
    with pytest.raises(error, match=match):
        build_moe(recipe, out, **kwargs)
    assert not out.exists()
    assert not any(p.name.startswith(f".{out.name}.") for p in out.parent.iterdir())


@pytest.mark.parametrize(
    "change, error, match",
    [
        ({"merge_method": "ties"}, RecipeError, "unknown MoE recipe key 'merge_method'"),
        ({"shared_experts": [{"source_model": "x"}]}, RecipeError, "mergekit-moe builds a DeepSeek MoE"),
        ({"gate_mode": "learned"}, RecipeError, "gate_mode 'learned' is not supported"),
        ({"architecture": "qwen"}, RecipeError, "architecture 'qwen' .* needs exactly one shared expert"),
        ({"architecture": "qwen3"}, RecipeError, "Qwen3 MoE outputs are not built"),
        ({"experts_per_token": 4}, RecipeError, "experts_per_token is 4 but the recipe lists only 3"),
        ({"experts_per_token": 0}, RecipeError, "experts_per_token must be a whole number >= 1"),
        ({"dtype": "int8"}, RecipeError, "dtype must be one of"),
        ({"tokenizer_source": "union"}, RecipeError, "only `tokenizer_source: base`"),
        ({"seed": -1}, RecipeError, "seed must be"),
        ({"experts": []}, RecipeError, "`experts` must be a non-empty list"),
    ],
)
def test_recipe_refusals(models, tmp_path, change, error, match):
    _expect_refusal({**_recipe(models), **change}, tmp_path / "out", error, match)


def test_expert_refusals(models, tmp_path):
    out = tmp_path / "out"
    recipe = _recipe(models, "hidden")
    del recipe["experts"][1]["positive_prompts"]
    _expect_refusal(recipe, out, RecipeError, r"experts\[1\] .* has no positive_prompts")
    recipe = _recipe(models, "cheap_embed")
    for e in recipe["experts"]:
        e.pop("negative_prompts", None)
        e["positive_prompts"] = ["same"]
    _expect_refusal(recipe, out, RecipeError, "same positive and negative prompts")
    recipe = _recipe(models, "random")
    recipe["experts"][0]["color"] = "red"
    _expect_refusal(recipe, out, RecipeError, r"unknown key 'color' in experts\[0\]")
    recipe = _recipe(models, "random")
    recipe["experts"][0]["noise_scale"] = -1
    _expect_refusal(recipe, out, RecipeError, "noise_scale must be >= 0")
    recipe = _recipe(models, "random")
    for e in recipe["experts"]:
        e["source_model"] = str(models / "e0")
    _expect_refusal(recipe, out, RecipeError, "every expert is the same model")
    assert build_moe(recipe, out, allow_all_same=True).num_experts == 3  # MergeKit's override flag


def _variant(models, tmp_path, name, config=None, drop=None, tokenizer=True):
    """A copy of expert 0 with another config or without a tensor."""
    from safetensors.torch import load_file, save_file

    target = tmp_path / name
    shutil.copytree(models / "e0", target)
    if config:
        data = json.loads((target / "config.json").read_text()) | config
        (target / "config.json").write_text(json.dumps(data))
    if drop:
        state = load_file(target / "model.safetensors")
        state.pop(drop)
        save_file(state, target / "model.safetensors", metadata={"format": "pt"})
    if not tokenizer:
        for f in target.glob("tokenizer*"):
            f.unlink()
    return target


def test_input_refusals(models, tmp_path):
    from transformers import LlamaForCausalLM

    out = tmp_path / "out"
    recipe = _recipe(models, "random")

    other = _variant(models, tmp_path, "mistral", config={"model_type": "mistral"})
    _expect_refusal(
        {**recipe, "experts": [*recipe["experts"][:2], {"source_model": str(other)}]},
        out,
        NotSameBaseError,
        "every expert must have the base's architecture",
    )
    torch.manual_seed(3)
    wide = tmp_path / "wide"
    _save(LlamaForCausalLM(_config(intermediate_size=64)), wide)
    _expect_refusal(
        {**recipe, "experts": [*recipe["experts"][:2], {"source_model": str(wide)}]},
        out,
        ShapeMismatchError,
        "intermediate_size=64",
    )
    lacking = _variant(models, tmp_path, "lacking", drop="model.layers.1.mlp.up_proj.weight")
    _expect_refusal(
        {**recipe, "experts": [*recipe["experts"][:2], {"source_model": str(lacking)}]},
        out,
        MissingTensorError,
        r"has no 'model.layers.1.mlp.up_proj.weight'",
    )
    qwen = _variant(models, tmp_path, "qwen", config={"model_type": "qwen2"})
    _expect_refusal({**recipe, "base_model": str(qwen)}, out, ConfigError, "'qwen2' model")
    biased = _variant(models, tmp_path, "biased", config={"attention_bias": True})
    _expect_refusal({**recipe, "base_model": str(biased)}, out, ConfigError, "attention_bias=True")
    mute = _variant(models, tmp_path, "mute", tokenizer=False)
    _expect_refusal(
        {**_recipe(models, "cheap_embed"), "base_model": str(mute)}, out, ConfigError, "no tokenizer files"
    )
    _expect_refusal(recipe, out, InvalidOptionError, "layout must be one of", layout="stacked")
    _expect_refusal(recipe, out, InvalidOptionError, "gate_dtype must be one of", gate_dtype="int4")


def test_output_location_refusals(models, tmp_path):
    recipe = _recipe(models, "random")
    with pytest.raises(OutputOverlapsInputError):
        build_moe(recipe, models / "e1" / "moe")
    assert not (models / "e1" / "moe").exists()
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    with pytest.raises(OutputExistsError):
        build_moe(recipe, busy)
    assert [p.name for p in busy.iterdir()] == ["keep.txt"]
    build_moe(recipe, busy, overwrite=True)
    assert not (busy / "keep.txt").exists() and (busy / "model.safetensors").is_file()


def test_cli_builds_and_refuses(models, tmp_path):
    from typer.testing import CliRunner

    from transfuse.cli import app

    path = tmp_path / "moe.yaml"
    path.write_text(yaml.safe_dump(_recipe(models, "cheap_embed")))
    runner = CliRunner()
    result = runner.invoke(app, ["moe", str(path), str(tmp_path / "out"), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "MixtralForCausalLM" in result.output and (tmp_path / "out" / "config.json").is_file()
    path.write_text(yaml.safe_dump({**_recipe(models, "cheap_embed"), "experts_per_token": 9}))
    result = runner.invoke(app, ["moe", str(path), str(tmp_path / "out2")])
    assert result.exit_code == 2 and "experts_per_token is 9" in result.output
