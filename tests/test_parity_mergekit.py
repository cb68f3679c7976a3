"""End-to-end parity with MergeKit 0.1.5: the same YAML recipe through both tools gives the same tensors.

This exercises the whole pipeline (recipe parsing, per-model/global precedence, filters, layer gradients, the
method, dtype handling) on tiny float32 Llama checkpoints made here.  Deterministic methods must agree to 1e-6.
"""

from __future__ import annotations

import pytest
import torch
import yaml
from safetensors.torch import load_file

mergekit = pytest.importorskip("mergekit")

from transfuse import merge  # noqa: E402

TOL = 1e-6


@pytest.fixture(scope="module")
def llama_models(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("llamas")
    config = LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    base = LlamaForCausalLM(config)
    base.save_pretrained(root / "base")
    g = torch.Generator().manual_seed(1)
    for i in range(3):
        model = LlamaForCausalLM(config)
        state = {k: v + 0.02 * torch.randn(v.shape, generator=g) for k, v in base.state_dict().items()}
        # Some entries move a lot, and some sign conflicts between models, so TIES has work to do.
        for v in state.values():
            v.add_(
                (torch.rand(v.shape, generator=g) < 0.1) * torch.randn(v.shape, generator=g) * (i + 1) * 0.05
            )
        model.load_state_dict(state)
        model.save_pretrained(root / f"ft{i}")
    return root


def _tensors(folder):
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _run_both(root, recipe: dict, tmp_path):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    recipe = {**recipe, "base_model": str(root / "base")} if "base_model" in recipe else dict(recipe)
    recipe["models"] = [{**m, "model": str(root / m["model"])} for m in recipe["models"]]
    recipe.setdefault("dtype", "float32")
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    run_merge(
        MergeConfiguration.model_validate(yaml.safe_load(path.read_text())),
        str(tmp_path / "mk"),
        options=MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True),
    )
    merge(path, tmp_path / "tf", progress=False)
    return _tensors(tmp_path / "mk"), _tensors(tmp_path / "tf")


def _models(params_list):
    return [{"model": f"ft{i}", "parameters": p} for i, p in enumerate(params_list)]


CASES = {
    "linear": {
        "merge_method": "linear",
        "models": _models([{"weight": 0.5}, {"weight": 0.3}, {"weight": 0.2}]),
    },
    "linear_unnormalized": {
        "merge_method": "linear",
        "models": _models([{"weight": 0.7}, {"weight": 0.6}]),
        "parameters": {"normalize": False},
    },
    "task_arithmetic": {
        "merge_method": "task_arithmetic",
        "base_model": "base",
        "models": _models([{"weight": 0.6}, {"weight": -0.3}, {"weight": 0.4}]),
        "parameters": {"lambda": 0.8},
    },
    "ties_filters_gradients": {
        "merge_method": "ties",
        "base_model": "base",
        "models": _models(
            [
                {"weight": 1.0, "density": [0.2, 0.8]},
                {"weight": [{"filter": "mlp", "value": 0.3}, {"value": 0.7}], "density": 0.5},
                {"weight": 0.5},
            ]
        ),
        "parameters": {"density": 0.4, "normalize": True},
    },
    "ties_unnormalized": {
        "merge_method": "ties",
        "base_model": "base",
        "models": _models([{"weight": 0.5, "density": 0.3}, {"weight": 0.5, "density": 0.6}]),
        "parameters": {"normalize": False, "lambda": 1.5},
    },
    "breadcrumbs": {
        "merge_method": "breadcrumbs",
        "base_model": "base",
        "models": _models([{"weight": 0.5, "density": 0.7, "gamma": 0.05}, {"weight": 0.5, "density": 0.8}]),
    },
    "breadcrumbs_ties": {
        "merge_method": "breadcrumbs_ties",
        "base_model": "base",
        "models": _models(
            [{"weight": 0.6, "density": 0.7}, {"weight": 0.4, "density": 0.6}, {"weight": 0.3}]
        ),
        "parameters": {"gamma": 0.02, "density": 0.5},
    },
    "model_stock": {"merge_method": "model_stock", "base_model": "base", "models": _models([{}, {}, {}])},
    "slerp": {
        "merge_method": "slerp",
        "base_model": "base",
        "models": _models([{}]),
        "parameters": {"t": [{"filter": "self_attn", "value": [0.0, 0.5, 1.0]}, {"value": 0.3}]},
    },
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_same_tensors_as_mergekit(case, llama_models, tmp_path):
    mk, tf = _run_both(llama_models, CASES[case], tmp_path)
    assert set(mk) == set(tf)
    worst = max((mk[k].float() - tf[k].float()).abs().max().item() for k in mk)
    assert worst <= TOL, f"{case}: max abs difference {worst:.3g}"
    # The merge changed something (a vacuous parity would also pass).
    base = _tensors(llama_models / "base")
    assert any(not torch.equal(base[k], tf[k]) for k in tf)


@pytest.mark.parametrize("method", ["dare_ties", "dare_linear", "della", "della_linear"])
def test_random_methods_match_mergekit_in_distribution(method, llama_models, tmp_path):
    """Random masks differ, but the kept share and the rescaled mass must agree."""
    params = {"density": 0.6} | ({"epsilon": 0.1} if method.startswith("della") else {})
    recipe = {
        "merge_method": method,
        "base_model": "base",
        "models": _models([{"weight": 0.5, **params}, {"weight": 0.5, **params}]),
    }
    mk, tf = _run_both(llama_models, recipe, tmp_path)
    base = _tensors(llama_models / "base")
    name = "model.layers.0.mlp.up_proj.weight"
    d_mk, d_tf = mk[name] - base[name], tf[name] - base[name]
    # Mean |delta| of the merged update agrees (same expected value of the rescaled sparse sum).
    assert d_tf.abs().mean().item() == pytest.approx(d_mk.abs().mean().item(), rel=0.08)
    assert (d_tf != 0).float().mean().item() == pytest.approx((d_mk != 0).float().mean().item(), abs=0.05)
