"""Layer slices (`slices:`): frankenmerges with passthrough and per-slice merges, against MergeKit 0.1.5 and by hand."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import transfuse
from transfuse.errors import MissingTensorError, RecipeError
from transfuse.recipe import Recipe

mergekit = pytest.importorskip("mergekit")

TOL = 1e-6


@pytest.fixture(scope="module")
def llamas(tmp_path_factory):
    """A 4-layer tiny Llama base and two fine-tunes of it, saved by transformers."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("slice-llamas")
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(root / "base")
    base = load_file(root / "base" / "model.safetensors")
    g = torch.Generator().manual_seed(1)
    for i in range(2):
        model = LlamaForCausalLM(config)
        model.load_state_dict({k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in base.items()})
        model.save_pretrained(root / f"ft{i}")
    return root


def _tensors(folder):
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _absolute(recipe: dict, root) -> dict:
    recipe = json.loads(json.dumps(recipe))
    if "base_model" in recipe:
        recipe["base_model"] = str(root / recipe["base_model"])
    for output in recipe["slices"]:
        for src in output["sources"]:
            src["model"] = str(root / src["model"])
    return recipe


def _run_both(root, recipe: dict, tmp_path):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    recipe = _absolute({"dtype": "float32", **recipe}, root)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    run_merge(
        MergeConfiguration.model_validate(yaml.safe_load(path.read_text())),
        str(tmp_path / "mk"),
        options=MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True),
    )
    transfuse.merge(path, tmp_path / "tf", progress=False)
    return _tensors(tmp_path / "mk"), _tensors(tmp_path / "tf")


def _assert_same(mk, tf):
    assert set(mk) == set(tf), set(mk) ^ set(tf)
    for name in mk:
        assert mk[name].shape == tf[name].shape, name
        assert torch.allclose(mk[name].float(), tf[name].float(), atol=TOL, rtol=0), name


FRANKEN = {
    "merge_method": "passthrough",
    "slices": [
        {"sources": [{"model": "ft0", "layer_range": [0, 3]}]},
        {"sources": [{"model": "ft1", "layer_range": [1, 4]}]},
    ],
}


def test_frankenmerge_stacks_layers_like_mergekit_and_loads_deeper(llamas, tmp_path):
    from transformers import AutoModelForCausalLM

    mk, tf = _run_both(llamas, FRANKEN, tmp_path)
    _assert_same(mk, tf)
    ft0, ft1 = _tensors(llamas / "ft0"), _tensors(llamas / "ft1")
    # By hand: output layers 0-2 are ft0's layers 0-2, 3-5 are ft1's 1-3; embeddings ft0's, head ft1's.
    for out_layer, (model, src_layer) in enumerate(
        [(ft0, 0), (ft0, 1), (ft0, 2), (ft1, 1), (ft1, 2), (ft1, 3)]
    ):
        name = "self_attn.q_proj.weight"
        assert torch.equal(tf[f"model.layers.{out_layer}.{name}"], model[f"model.layers.{src_layer}.{name}"])
    assert torch.equal(tf["model.embed_tokens.weight"], ft0["model.embed_tokens.weight"])
    assert torch.equal(tf["lm_head.weight"], ft1["lm_head.weight"])
    config = json.loads((tmp_path / "tf" / "config.json").read_text())
    assert config["num_hidden_layers"] == 6
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "tf")
    assert len(model.model.layers) == 6
    out = model(torch.tensor([[1, 2, 3]]))
    assert torch.isfinite(out.logits).all()


def test_passthrough_scale_per_filter_matches_mergekit(llamas, tmp_path):
    recipe = {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": "ft0", "layer_range": [0, 2]}]},
            {
                "sources": [
                    {
                        "model": "ft0",
                        "layer_range": [1, 3],
                        "parameters": {"scale": [{"filter": "o_proj", "value": 0.5}, {"value": 1.0}]},
                    }
                ]
            },
        ],
    }
    mk, tf = _run_both(llamas, recipe, tmp_path)
    _assert_same(mk, tf)
    ft0 = _tensors(llamas / "ft0")
    assert torch.equal(
        tf["model.layers.2.self_attn.o_proj.weight"], 0.5 * ft0["model.layers.1.self_attn.o_proj.weight"]
    )


@pytest.mark.parametrize(
    "method, parameters",
    [
        ("slerp", {"t": [0.0, 0.5, 1.0]}),
        ("linear", {"weight": 0.5}),
        ("task_arithmetic", {"weight": 0.7}),
        ("ties", {"weight": 1.0, "density": 0.5}),
    ],
)
def test_per_slice_merges_with_gradients_match_mergekit(llamas, tmp_path, method, parameters):
    def sources(lo, hi):
        return [
            {"model": "base", "layer_range": [lo, hi]},
            {"model": "ft0", "layer_range": [lo, hi]},
            *([{"model": "ft1", "layer_range": [lo, hi]}] if method != "slerp" else []),
        ]

    recipe = {
        "merge_method": method,
        "base_model": "base",
        "slices": [
            {"sources": sources(0, 2)},
            {"sources": sources(1, 4), "parameters": {"t": 0.25} if method == "slerp" else {}},
        ],
        "parameters": parameters,
    }
    if method == "linear":
        del recipe["base_model"]
        for output in recipe["slices"]:
            output["sources"] = output["sources"][1:]
    mk, tf = _run_both(llamas, recipe, tmp_path)
    _assert_same(mk, tf)
    assert json.loads((tmp_path / "tf" / "config.json").read_text())["num_hidden_layers"] == 5


def test_slice_gradient_position_is_within_the_slice(llamas, tmp_path):
    """t = i/(n-1) inside each slice: a 3-layer slice's middle layer is half way, whatever the slice's place."""
    recipe = {
        "merge_method": "slerp",
        "base_model": str(llamas / "base"),
        "slices": [
            {
                "sources": [
                    {"model": str(llamas / "base"), "layer_range": [1, 4]},
                    {"model": str(llamas / "ft0"), "layer_range": [1, 4]},
                ]
            }
        ],
        "parameters": {"t": [0.0, 1.0]},
        "dtype": "float32",
    }
    transfuse.merge(recipe, tmp_path / "out", progress=False)
    out = _tensors(tmp_path / "out")
    base, ft0 = _tensors(llamas / "base"), _tensors(llamas / "ft0")
    name = "mlp.up_proj.weight"
    assert torch.equal(out[f"model.layers.0.{name}"], base[f"model.layers.1.{name}"])  # t = 0
    assert torch.allclose(out[f"model.layers.2.{name}"], ft0[f"model.layers.3.{name}"], atol=1e-6)  # t = 1
    assert torch.equal(out["model.embed_tokens.weight"], base["model.embed_tokens.weight"])  # outside: t = 0


def test_slice_errors_are_named_before_any_work(llamas, tmp_path):
    def recipe(**changes):
        data = _absolute(FRANKEN, llamas)
        data.update(changes)
        return data

    bad_length = recipe(merge_method="linear")
    bad_length["slices"][0]["sources"].append({"model": str(llamas / "ft1"), "layer_range": [0, 2]})
    with pytest.raises(RecipeError, match="same number of layers"):
        Recipe.from_dict(bad_length)
    too_far = recipe()
    too_far["slices"][1]["sources"][0]["layer_range"] = [2, 9]
    with pytest.raises(RecipeError, match="layers up to 9.*has 4 layer"):
        transfuse.merge(too_far, tmp_path / "out", progress=False)
    for layer_range in ([3, 3], [-1, 2], [0], "0-2"):
        broken = recipe()
        broken["slices"][0]["sources"][0]["layer_range"] = layer_range
        with pytest.raises(RecipeError, match="layer_range"):
            Recipe.from_dict(broken)
    two = recipe()
    two["slices"][0]["sources"].append({"model": str(llamas / "ft1"), "layer_range": [0, 3]})
    with pytest.raises(RecipeError, match="at most 1 model"):
        Recipe.from_dict(two)
    no_base_source = {
        "merge_method": "ties",
        "base_model": str(llamas / "base"),
        "slices": [{"sources": [{"model": str(llamas / "ft0"), "layer_range": [0, 2]}]}],
    }
    with pytest.raises(RecipeError, match="must be one of the slice's sources"):
        Recipe.from_dict(no_base_source)
    both = recipe(models=[{"model": str(llamas / "ft0")}])
    with pytest.raises(RecipeError, match="exactly one of"):
        Recipe.from_dict(both)
    assert not (tmp_path / "out").exists()


def test_sources_of_another_architecture_are_refused(llamas, tmp_path):
    from safetensors.torch import save_file

    odd = tmp_path / "odd"
    odd.mkdir()
    tensors = _tensors(llamas / "ft1")
    del tensors["model.layers.2.mlp.up_proj.weight"]
    save_file(tensors, odd / "model.safetensors")
    (odd / "config.json").write_text((llamas / "ft1" / "config.json").read_text())
    recipe = {
        "merge_method": "linear",
        "slices": [
            {
                "sources": [
                    {"model": str(llamas / "ft0"), "layer_range": [0, 4]},
                    {"model": str(odd), "layer_range": [0, 4]},
                ]
            }
        ],
    }
    with pytest.raises(MissingTensorError, match=r"odd\[0:4\] has no tensor 'model\.layers\.2\.mlp\.up_proj"):
        transfuse.merge(recipe, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_slice_recipe_round_trips_and_replays(llamas, tmp_path):
    recipe = Recipe.from_dict(_absolute(FRANKEN, llamas))
    again = Recipe.from_dict(yaml.safe_load(recipe.to_yaml()))
    assert again.to_dict() == recipe.to_dict()
    transfuse.merge(recipe, tmp_path / "a", progress=False)
    transfuse.merge(tmp_path / "a" / "recipe.yaml", tmp_path / "b", progress=False)
    a, b = _tensors(tmp_path / "a"), _tensors(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_unscaled_passthrough_tensors_are_byte_copies_read_once(llamas, tmp_path):
    from transfuse.api import plan_merge
    from transfuse.errors import NonFiniteTensorError

    recipe = _absolute(
        {
            "merge_method": "passthrough",
            "slices": [
                {"sources": [{"model": "ft0", "layer_range": [0, 2]}]},
                {"sources": [{"model": "ft1", "layer_range": [1, 4],
                              "parameters": {"scale": [{"filter": "o_proj", "value": 0.5}, {"value": 1.0}]}}]},
            ],
        },
        llamas,
    )  # fmt: skip
    with plan_merge(recipe) as plan:
        copied = {j.name for j in plan.jobs if not j.merge}
        merged = {j.name for j in plan.jobs if j.merge}
    assert merged and all("o_proj" in n and int(n.split(".")[2]) >= 2 for n in merged)  # the scaled ones only
    assert "model.layers.0.self_attn.q_proj.weight" in copied and "lm_head.weight" in copied
    with plan_merge({**recipe, "dtype": "bfloat16"}) as plan:  # a cast is not a copy
        assert all(j.merge for j in plan.jobs)
    transfuse.merge(recipe, tmp_path / "out", progress=False)
    out, ft1 = _tensors(tmp_path / "out"), _tensors(llamas / "ft1")
    assert torch.equal(out["model.layers.2.mlp.up_proj.weight"], ft1["model.layers.1.mlp.up_proj.weight"])
    torch.testing.assert_close(
        out["model.layers.2.self_attn.o_proj.weight"], 0.5 * ft1["model.layers.1.self_attn.o_proj.weight"]
    )
    # A copied tensor is scanned as merged inputs are: a NaN in it is refused, nothing is written.
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in (llamas / "ft0").iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    tensors = load_file(broken / "model.safetensors")
    tensors["model.layers.1.mlp.down_proj.weight"][0, 0] = float("nan")
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    recipe["slices"][0]["sources"][0]["model"] = str(broken)
    with pytest.raises(NonFiniteTensorError, match=r"down_proj.*NaN/Inf"):
        transfuse.merge(recipe, tmp_path / "out2", progress=False)
    assert not (tmp_path / "out2").exists()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("value", [float("inf"), -float("inf"), -float("nan")])
def test_copied_tensor_with_inf_or_nan_anywhere_is_refused(llamas, tmp_path, dtype, value):
    """The copy path's check (min/max in the tensor's own dtype) sees +inf, -inf and a negative-signed NaN
    wherever they are, in float32 and bfloat16 checkpoints."""
    from transfuse.errors import NonFiniteTensorError

    broken = tmp_path / "broken"
    broken.mkdir()
    for f in (llamas / "ft0").iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    tensors = {k: v.to(dtype) for k, v in load_file(broken / "model.safetensors").items()}
    target = tensors["model.layers.1.mlp.down_proj.weight"]
    target.view(-1)[target.numel() - 1] = value  # the last entry: the tail of any vectorised reduction
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    recipe = {
        "merge_method": "passthrough",
        "slices": [{"sources": [{"model": str(broken), "layer_range": [0, 2]}]}],
    }
    with plan_merge_copies(recipe) as copied:
        assert "model.layers.1.mlp.down_proj.weight" in copied
    with pytest.raises(NonFiniteTensorError, match=r"down_proj.*NaN/Inf"):
        transfuse.merge(recipe, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


@contextlib.contextmanager
def plan_merge_copies(recipe):
    from transfuse.api import plan_merge

    with plan_merge(recipe) as plan:
        yield {j.name for j in plan.jobs if not j.merge}
