"""``transfuse moe`` with ``architecture: qwen``: Qwen2-MoE (``Qwen2MoeForCausalLM``) from the tiny dense Llama
experts of tests/test_moe.py (its fixtures and helpers, imported), and from tiny dense Qwen2 models made here.

Checked: the output loads with no missing / unexpected keys in both layouts and generates; experts and the shared
expert land in their slots, attention gets zero q/k/v biases (Llama) or keeps the base's (Qwen2); the MoE's logits
equal an independent composition of the dense models (softmax router over the experts' MLPs plus the sigmoid-gated
shared MLP); the shared gate row equals an independent re-derivation; every tensor equals ``mergekit-moe``'s on the
same recipe (cheap_embed; hidden within MergeKit's bfloat16 rounding); inputs are not modified; every refusal
happens before anything is written.
"""

# ruff: noqa: F811  (the tests take test_moe's imported `models` fixture as an argument)
from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch
import yaml
from test_moe import (  # noqa: F401  (models: the module-scoped fixture of tiny dense Llama experts)
    HIDDEN,
    INTER,
    LAYERS,
    VOCAB,
    _dense,
    _expect_refusal,
    _load,
    _prompt_ids,
    _recipe,
    _rederive_hidden,
    _save,
    _tensors,
    _variant,
    models,
)

from transfuse.errors import (
    ConfigError,
    MissingTensorError,
    NotSameBaseError,
    RecipeError,
    ShapeMismatchError,
)
from transfuse.moe import build_moe

SHARED_PROMPTS = (["hello, how are you?", "good morning"], ["def g(y):"])


def _qwen_recipe(root, gate_mode="cheap_embed", shared="e2", n=2, **extra):
    """experts e0..e{n-1} (test_moe's prompts), shared expert ``shared`` with SHARED_PROMPTS."""
    data = _recipe(root, gate_mode, k=n, n=n)
    data["architecture"] = "qwen"
    data["shared_experts"] = [
        {
            "source_model": str(root / shared),
            "positive_prompts": SHARED_PROMPTS[0],
            "negative_prompts": SHARED_PROMPTS[1],
        }
    ]
    data.update(extra)
    return data


@pytest.mark.parametrize("layout", ["per_expert", "fused"])
def test_loads_generates_and_every_mlp_lands_in_its_slot(models, tmp_path, layout):
    out = tmp_path / "moe"
    result = build_moe(_qwen_recipe(models), out, layout=layout)
    assert result.model_class == "Qwen2MoeForCausalLM" and result.num_experts == 2
    assert result.gates.shape == (LAYERS, 2, HIDDEN) and result.shared_gates.shape == (LAYERS, 1, HIDDEN)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Qwen2MoeForCausalLM"] and config["model_type"] == "qwen2_moe"
    want = {
        "num_experts": 2,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": INTER,
        "shared_expert_intermediate_size": INTER,
        "intermediate_size": INTER,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "norm_topk_prob": True,
        "qkv_bias": True,
        "use_sliding_window": False,
        "sliding_window": None,
        "hidden_size": HIDDEN,
        "num_hidden_layers": LAYERS,
        "vocab_size": VOCAB,
    }
    assert {k: config.get(k) for k in want} == want
    model = _load(out)
    assert type(model).__name__ == "Qwen2MoeForCausalLM"
    assert model.generate(torch.tensor([[1, 40, 41, 42]]), max_new_tokens=4, do_sample=False).shape == (1, 8)

    state = model.state_dict()
    base = _dense(models, "base").state_dict()
    dense = [_dense(models, f"e{e}").state_dict() for e in range(3)]
    for layer in range(LAYERS):
        prefix = f"model.layers.{layer}"
        gate_up = state[f"{prefix}.mlp.experts.gate_up_proj"]  # [E, 2I, H] in transformers 5
        down = state[f"{prefix}.mlp.experts.down_proj"]
        for e in range(2):
            assert torch.equal(gate_up[e, :INTER], dense[e][f"{prefix}.mlp.gate_proj.weight"])
            assert torch.equal(gate_up[e, INTER:], dense[e][f"{prefix}.mlp.up_proj.weight"])
            assert torch.equal(down[e], dense[e][f"{prefix}.mlp.down_proj.weight"])
        for proj in ("gate_proj", "up_proj", "down_proj"):  # the shared expert is e2, not among the experts
            key = f"{prefix}.mlp.{proj}.weight"
            assert torch.equal(state[f"{prefix}.mlp.shared_expert.{proj}.weight"], dense[2][key])
        for name in ("self_attn.q_proj.weight", "self_attn.v_proj.weight", "input_layernorm.weight"):
            assert torch.equal(state[f"{prefix}.{name}"], base[f"{prefix}.{name}"])  # not e2's attention
        for proj, rows in (("q_proj", HIDDEN), ("k_proj", HIDDEN // 2), ("v_proj", HIDDEN // 2)):
            bias = state[f"{prefix}.self_attn.{proj}.bias"]
            assert bias.shape == (rows,) and not bias.any()  # Llama has none: zeros compute what it computes
        assert torch.equal(state[f"{prefix}.mlp.gate.weight"], result.gates[layer])
        assert torch.equal(state[f"{prefix}.mlp.shared_expert_gate.weight"], result.shared_gates[layer])
    names = _tensors(out)
    if layout == "per_expert":  # MergeKit's names
        assert "model.layers.1.mlp.experts.1.up_proj.weight" in names
    else:
        assert "model.layers.1.mlp.experts.gate_up_proj" in names
    assert "model.layers.0.mlp.shared_expert.down_proj.weight" in names


def test_logits_equal_the_composition_of_the_dense_models(models, tmp_path):
    """With every expert active (experts_per_token = E, so top-k keeps all and renormalises nothing away) a layer
    computes  Σ_e softmax(R x)_e · MLP_e(x) + σ(g · x) · MLP_shared(x)  on the base's attention: built here from
    the dense base, the dense experts' MLP modules and the written R, g."""
    out = tmp_path / "moe"
    result = build_moe(_qwen_recipe(models, "cheap_embed"), out)
    moe = _load(out)
    reference = _dense(models, "base")
    experts = [_dense(models, f"e{e}") for e in range(2)]
    shared = _dense(models, "e2")

    class Composition(torch.nn.Module):
        def __init__(self, mlps, shared_mlp, router, gate):
            super().__init__()
            self.mlps = torch.nn.ModuleList(mlps)
            self.shared_mlp, self.router, self.gate = shared_mlp, router, gate

        def forward(self, x):
            p = torch.softmax(x @ self.router.T, dim=-1)
            routed = sum(p[..., e : e + 1] * m(x) for e, m in enumerate(self.mlps))
            return routed + torch.sigmoid(x @ self.gate.T) * self.shared_mlp(x)

    for i, layer in enumerate(reference.model.layers):
        layer.mlp = Composition(
            [e.model.layers[i].mlp for e in experts],
            shared.model.layers[i].mlp,
            result.gates[i],
            result.shared_gates[i],
        )
    ids = torch.tensor([[1, 50, 60, 70, 80, 90, 33]])
    with torch.no_grad():
        got, want = moe(ids).logits, reference(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    x = torch.randn(HIDDEN, 16, generator=torch.Generator().manual_seed(0))
    gate = torch.sigmoid(result.shared_gates[0, 0] @ x)
    assert float(gate.min()) < 0.45 and float(gate.max()) > 0.55  # a unit row: the gate really varies


def _shared_row_cheap_embed(models):
    embed = _dense(models, "base").model.embed_tokens.weight.detach()

    def unit_sum(prompts):
        u = sum(embed[ids[0]].sum(dim=0) for ids in _prompt_ids(prompts))
        return u / u.norm()

    v = unit_sum(SHARED_PROMPTS[0]) - unit_sum(SHARED_PROMPTS[1])
    return (v / v.norm()).expand(LAYERS, HIDDEN)


def _shared_row_hidden(models):
    """MergeKit's hidden: each layer's input at the prompt's last token, one unpadded prompt at a time."""
    base = _dense(models, "base")

    def mean_last(prompts):
        rows = []
        for ids in _prompt_ids(prompts):
            with torch.no_grad():
                states = base(ids, output_hidden_states=True).hidden_states
            rows.append(torch.stack([states[i][0, -1] for i in range(LAYERS)]))
        return torch.stack(rows).mean(dim=0)

    v = mean_last(SHARED_PROMPTS[0]) - mean_last(SHARED_PROMPTS[1])
    return v / v.norm(dim=-1, keepdim=True)


def test_gate_rows_equal_an_independent_rederivation(models, tmp_path):
    cheap = build_moe(_qwen_recipe(models, "cheap_embed"), tmp_path / "cheap")
    torch.testing.assert_close(cheap.shared_gates[:, 0], _shared_row_cheap_embed(models))
    hidden = build_moe(_qwen_recipe(models, "hidden"), tmp_path / "hidden")
    torch.testing.assert_close(hidden.shared_gates[:, 0], _shared_row_hidden(models), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hidden.gates, _rederive_hidden(models, "hidden")[:, :2], rtol=1e-5, atol=1e-6)


def test_random_gates_are_seeded_and_need_no_shared_prompts(models, tmp_path):
    recipe = _qwen_recipe(models, "random")
    del recipe["shared_experts"][0]["positive_prompts"], recipe["shared_experts"][0]["negative_prompts"]
    a = build_moe(recipe, tmp_path / "a")
    b = build_moe(recipe, tmp_path / "b")
    c = build_moe(recipe, tmp_path / "c", seed=3)
    assert torch.equal(a.shared_gates, b.shared_gates) and not torch.equal(a.shared_gates, c.shared_gates)
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (
        tmp_path / "b" / "model.safetensors"
    ).read_bytes()
    assert not torch.equal(a.shared_gates[:, 0], a.gates[:, 0])  # its own generator, not a copy of a row
    u = build_moe({**recipe, "gate_mode": "uniform_random"}, tmp_path / "u")
    assert float(u.shared_gates.abs().max()) <= HIDDEN**-0.5
    assert any("mergekit-moe refuses this recipe for gate_mode uniform_random" in n for n in u.notes)


def test_shared_expert_residual_scale_and_noise(models, tmp_path):
    recipe = _qwen_recipe(models, "random")
    recipe["shared_experts"][0] |= {"residual_scale": 0.5, "noise_scale": 0.01}
    build_moe(recipe, tmp_path / "a")
    build_moe(recipe, tmp_path / "b")
    got, again = _tensors(tmp_path / "a"), _tensors(tmp_path / "b")
    e2 = _dense(models, "e2").state_dict()
    prefix = "model.layers.1.mlp"
    down_noise = got[f"{prefix}.shared_expert.down_proj.weight"] - 0.5 * e2[f"{prefix}.down_proj.weight"]
    assert 0.5 * 0.005 < float(down_noise.std()) < 0.5 * 0.015  # noise added first, then scaled
    gate_noise = got[f"{prefix}.shared_expert.gate_proj.weight"] - e2[f"{prefix}.gate_proj.weight"]
    assert 0.005 < float(gate_noise.std()) < 0.015
    assert torch.equal(
        got[f"{prefix}.shared_expert.up_proj.weight"], again[f"{prefix}.shared_expert.up_proj.weight"]
    )
    assert torch.equal(
        got[f"{prefix}.experts.0.up_proj.weight"],
        _dense(models, "e0").state_dict()[f"{prefix}.up_proj.weight"],
    )


def _digest(root):
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_inputs_are_not_modified(models, tmp_path):
    before = _digest(models)
    recipe = _qwen_recipe(models, "hidden", shared="base")
    recipe["experts"][0]["residual_scale"] = 3.0
    build_moe(recipe, tmp_path / "moe", layout="fused")
    assert _digest(models) == before


# ------------------------------------------------------------------------------------------------ parity


def _mergekit(recipe, out):
    pytest.importorskip("mergekit")
    from mergekit.merge import MergeOptions
    from mergekit.moe.config import MoEMergeConfig
    from mergekit.scripts.moe import build

    build(MoEMergeConfig.model_validate(recipe), str(out), MergeOptions(device="cpu"))
    return _tensors(out)


MOE_CONFIG_KEYS = (
    "architectures",
    "model_type",
    "num_experts",
    "num_experts_per_tok",
    "moe_intermediate_size",
    "shared_expert_intermediate_size",
    "decoder_sparse_step",
    "mlp_only_layers",
    "norm_topk_prob",
    "use_sliding_window",
    "sliding_window",
    "qkv_bias",
    "tie_word_embeddings",
    "dtype",
)


@pytest.mark.parametrize("shared", ["base", "e1"])
def test_cheap_embed_output_equals_mergekit(models, tmp_path, shared):
    """MergeKit 0.1.5 opens only the base's and the experts' weights, so its shared expert must be one of those;
    every tensor then equals transfuse's (same names in the per_expert layout), as do the MoE config values."""
    recipe = _qwen_recipe(models, "cheap_embed", shared=shared)
    theirs = _mergekit(recipe, tmp_path / "mergekit")
    build_moe(recipe, tmp_path / "ours")
    ours = _tensors(tmp_path / "ours")
    assert set(ours) == set(theirs)
    for name in ours:
        assert ours[name].dtype == theirs[name].dtype, name
        if name.endswith(("mlp.gate.weight", "shared_expert_gate.weight")):
            # the same formula, summed in another order (MergeKit: one-hot @ embedding over its padded batch)
            torch.testing.assert_close(ours[name], theirs[name], rtol=1e-6, atol=1e-6)
        else:
            assert torch.equal(ours[name], theirs[name]), name
    a = json.loads((tmp_path / "ours" / "config.json").read_text())
    b = json.loads((tmp_path / "mergekit" / "config.json").read_text())
    assert {k: a.get(k) for k in MOE_CONFIG_KEYS} == {k: b.get(k) for k in MOE_CONFIG_KEYS}


def test_hidden_gate_rows_match_mergekit(models, tmp_path):
    """MergeKit's activations in bfloat16 (left-padded batches), transfuse's in float32."""
    recipe = _qwen_recipe(models, "hidden", shared="base")
    theirs = _mergekit(recipe, tmp_path / "mergekit")
    result = build_moe(recipe, tmp_path / "ours")
    routers = torch.stack([theirs[f"model.layers.{i}.mlp.gate.weight"] for i in range(LAYERS)]).float()
    shared = torch.stack([theirs[f"model.layers.{i}.mlp.shared_expert_gate.weight"] for i in range(LAYERS)])
    for ours, want in ((result.gates, routers), (result.shared_gates, shared.float())):
        torch.testing.assert_close(ours, want, rtol=0, atol=1e-2)
        assert bool((torch.nn.functional.cosine_similarity(ours, want, dim=-1) > 0.999).all())
    other = _tensors(tmp_path / "ours")
    for name in other:
        if "gate.weight" not in name and "shared_expert_gate" not in name:
            assert torch.equal(other[name], theirs[name]), name


@pytest.fixture(scope="module")
def qwen2_models(tmp_path_factory):
    """A tiny dense Qwen2 base (tied embeddings, q/k/v biases) and two fine-tunes with perturbed MLPs."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    root = tmp_path_factory.mktemp("qwen2_models")
    config = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INTER,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(4)
    base = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        for layer in base.model.layers:  # transformers initialises biases to zero: make them count
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.1)
    _save(base, root / "base")
    for i in range(3):
        g = torch.Generator().manual_seed(20 + i)
        state = {
            k: v + torch.randn(v.shape, generator=g) * 0.05 if ".mlp." in k else v
            for k, v in base.state_dict().items()
        }
        model = Qwen2ForCausalLM(config)
        model.load_state_dict(state)
        _save(model, root / f"e{i}")
    return root


def test_qwen2_experts_keep_the_base_biases_and_equal_mergekit(qwen2_models, tmp_path):
    recipe = _qwen_recipe(qwen2_models, "cheap_embed", shared="base")
    result = build_moe(recipe, tmp_path / "ours")
    theirs = _mergekit(recipe, tmp_path / "mergekit")
    ours = _tensors(tmp_path / "ours")
    assert set(ours) == set(theirs) and "lm_head.weight" not in ours  # tied, as the base
    for name in ours:
        if name.endswith(("mlp.gate.weight", "shared_expert_gate.weight")):
            torch.testing.assert_close(ours[name], theirs[name], rtol=1e-6, atol=1e-6)
        else:
            assert torch.equal(ours[name], theirs[name]), name
    base = _dense_qwen2(qwen2_models / "base").state_dict()
    bias = "model.layers.1.self_attn.k_proj.bias"
    assert torch.equal(ours[bias], base[bias]) and base[bias].any()
    model = _load(tmp_path / "ours")
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert result.model_class == "Qwen2MoeForCausalLM"
    assert model.generate(torch.tensor([[1, 40, 41]]), max_new_tokens=3, do_sample=False).shape == (1, 6)


def _dense_qwen2(path):
    from transformers import Qwen2ForCausalLM

    return Qwen2ForCausalLM.from_pretrained(str(path)).eval()


def test_mistral_sliding_window_is_dropped_with_a_note(models, tmp_path):
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INTER,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=16,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(5)
    for name in ("base", "e0", "e1", "e2"):
        _save(MistralForCausalLM(config), tmp_path / name)
    recipe = _qwen_recipe(tmp_path, "cheap_embed", dtype="bfloat16")
    result = build_moe(recipe, tmp_path / "moe")
    assert any("sliding_window 16 is dropped" in n for n in result.notes)
    written = json.loads((tmp_path / "moe" / "config.json").read_text())
    assert written["sliding_window"] is None and written["use_sliding_window"] is False
    assert all(t.dtype == torch.bfloat16 for t in _tensors(tmp_path / "moe").values())
    assert type(_load(tmp_path / "moe")).__name__ == "Qwen2MoeForCausalLM"


# ------------------------------------------------------------------------------------------------ refusals


def _no_shared(recipe):
    return {k: v for k, v in recipe.items() if k != "shared_experts"}


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda r: _no_shared(r), r"architecture 'qwen' \(Qwen2-MoE\) needs exactly one shared expert"),
        (
            lambda r: {**r, "shared_experts": r["shared_experts"] * 2},
            "lists 2 shared_experts; a Qwen2-MoE has exactly one",
        ),
        (lambda r: {**r, "architecture": "mixtral"}, "architecture 'mixtral' has no shared expert"),
        (lambda r: {**r, "architecture": "deepseek"}, "for a MoE with shared_experts use architecture: qwen"),
        (
            lambda r: {**_no_shared(r), "architecture": "deepseek"},
            "DeepSeek MoE and Qwen3 MoE outputs are not",
        ),
        (lambda r: {**_no_shared(r), "architecture": "qwen3"}, "DeepSeek MoE and Qwen3 MoE outputs are not"),
        (lambda r: {**r, "architecture": "gpt"}, "matches none of MergeKit's outputs"),
        (lambda r: {**r, "architecture": 7}, "architecture must be a string"),
        (
            lambda r: {
                **{k: v for k, v in r.items() if k != "architecture"},
                "gate_mode": "random",
                "shared_experts": [{"source_model": r["shared_experts"][0]["source_model"]}],
            },
            "mergekit-moe builds a DeepSeek MoE",
        ),
        (
            lambda r: {**r, "shared_experts": [{"source_model": r["shared_experts"][0]["source_model"]}]},
            r"shared_experts\[0\] .* has no positive_prompts",
        ),
        (
            lambda r: {**r, "shared_experts": [{**r["shared_experts"][0], "color": "red"}]},
            r"unknown key 'color' in shared_experts\[0\]",
        ),
        (lambda r: {**r, "shared_experts": {"source_model": "x"}}, "`shared_experts` must be a list"),
    ],
)
def test_recipe_refusals(models, tmp_path, change, match):
    _expect_refusal(change(_qwen_recipe(models)), tmp_path / "out", RecipeError, match)


def test_without_architecture_a_gated_shared_expert_builds_qwen(models, tmp_path):
    """MergeKit's choice: Mixtral takes no shared expert and DeepSeek MoE no gated one, so Qwen MoE."""
    recipe = {k: v for k, v in _qwen_recipe(models, "random").items() if k != "architecture"}
    assert build_moe(recipe, tmp_path / "moe").model_class == "Qwen2MoeForCausalLM"


def test_input_refusals(models, qwen2_models, tmp_path):
    out = tmp_path / "out"
    recipe = _qwen_recipe(models, "random")

    def with_shared(path):
        return {**recipe, "shared_experts": [{"source_model": str(path)}]}

    mistral = _variant(models, tmp_path, "mistral", config={"model_type": "mistral"})
    _expect_refusal(with_shared(mistral), out, NotSameBaseError, r"shared_experts\[0\] .* 'mistral' model")
    lacking = _variant(models, tmp_path, "lacking", drop="model.layers.0.mlp.down_proj.weight")
    _expect_refusal(
        with_shared(lacking), out, MissingTensorError, r"shared_experts\[0\] .* 'model.layers.0.mlp.down_proj"
    )
    wide = _variant(models, tmp_path, "wide", config={"intermediate_size": 64})
    _expect_refusal(
        with_shared(wide), out, ShapeMismatchError, r"shared_experts\[0\] .* intermediate_size=64"
    )
    biased = _variant(models, tmp_path, "biased", config={"attention_bias": True})
    _expect_refusal({**recipe, "base_model": str(biased)}, out, ConfigError, "attention_bias=True")
    gemma = _variant(models, tmp_path, "gemma", config={"model_type": "gemma"})
    _expect_refusal({**recipe, "base_model": str(gemma)}, out, ConfigError, "'gemma' model; a Qwen2-MoE")
    mixtral_of_qwen2 = _recipe(qwen2_models, "random", n=2)  # Mixtral takes Llama / Mistral only
    _expect_refusal(mixtral_of_qwen2, out, ConfigError, "'qwen2' model; a Mixtral MoE .*architecture: qwen")


def test_cli_builds_qwen(models, tmp_path):
    from typer.testing import CliRunner

    from transfuse.cli import app

    path = tmp_path / "moe.yaml"
    path.write_text(yaml.safe_dump(_qwen_recipe(models)))
    result = CliRunner().invoke(app, ["moe", str(path), str(tmp_path / "out"), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "Qwen2MoeForCausalLM" in result.output
    written = yaml.safe_load((tmp_path / "out" / "moe_recipe.yaml").read_text())
    assert written["architecture"] == "qwen" and len(written["shared_experts"]) == 1
    shutil.rmtree(tmp_path / "out")
