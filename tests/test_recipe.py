"""Recipe parsing, validation and parameter resolution (filters, layer gradients, precedence)."""

from __future__ import annotations

import pytest

from transfuse.errors import ParameterError, RecipeError, UnknownMethodError
from transfuse.plan import count_layers, layer_position
from transfuse.recipe import Recipe, evaluate_setting


def ties_recipe(**extra):
    data = {
        "merge_method": "ties",
        "base_model": "base",
        "models": [
            {"model": "a", "parameters": {"weight": 1.0, "density": 0.5}},
            {"model": "b", "parameters": {"weight": 0.5}},
        ],
        "parameters": {"density": 0.2},
    }
    data.update(extra)
    return data


def test_round_trip_and_base_listed_among_models_is_not_a_task():
    data = ties_recipe()
    data["models"].append({"model": "base"})  # MergeKit recipes often list the base too
    recipe = Recipe.from_dict(data)
    assert [m.path for m in recipe.task_models] == ["a", "b"]
    again = Recipe.from_dict(__import__("yaml").safe_load(recipe.to_yaml()))
    assert again.to_dict() == recipe.to_dict()


@pytest.mark.parametrize(
    "patch, error, fragment",
    [
        ({"merge_method": "nope"}, UnknownMethodError, "available"),
        ({"bogus_key": 1}, RecipeError, "unknown recipe key 'bogus_key'"),
        ({"modules": {}}, RecipeError, "does not support"),
        ({"slices": []}, RecipeError, "exactly one of"),
        ({"models": []}, RecipeError, "non-empty list"),
        ({"dtype": "int8"}, RecipeError, "`dtype` must be one of"),
        ({"vocab_mismatch": "grow"}, RecipeError, "vocab_mismatch"),
        ({"seed": "x"}, RecipeError, "seed"),
        ({"parameters": {"density": 1.5}}, ParameterError, "<= 1"),
        ({"parameters": {"densty": 0.5}}, ParameterError, "has no parameter 'densty'"),
        ({"parameters": {"normalize": "maybe"}}, ParameterError, "true or false"),
        ({"parameters": {"density": [0.1, "x"]}}, ParameterError, "must be a number"),
        ({"parameters": {"density": [{"filter": "mlp"}]}}, ParameterError, "needs `value`"),
    ],
)
def test_bad_recipes_get_named_errors(patch, error, fragment):
    with pytest.raises(error, match=fragment.replace("(", r"\(").replace("[", r"\[")):
        Recipe.from_dict(ties_recipe(**patch))


def test_global_parameter_set_per_model_is_refused():
    data = ties_recipe()
    data["models"][0]["parameters"]["lambda"] = 0.5
    with pytest.raises(ParameterError, match="is global"):
        Recipe.from_dict(data)


def test_unknown_model_entry_key():
    data = ties_recipe()
    data["models"][0]["weight"] = 1
    with pytest.raises(RecipeError, match="unknown key"):
        Recipe.from_dict(data)


def test_method_arity_checked():
    with pytest.raises(RecipeError, match="needs `base_model`"):
        Recipe.from_dict({"merge_method": "ties", "models": [{"model": "a"}]})
    with pytest.raises(RecipeError, match="at most 1"):
        Recipe.from_dict(
            {"merge_method": "slerp", "base_model": "b", "models": ["x", "y"], "parameters": {"t": 0.5}}
        )


def test_lora_plus_syntax():
    recipe = Recipe.from_dict({"merge_method": "linear", "models": ["base_dir+adapter_dir", "other"]})
    assert recipe.models[0].path == "base_dir" and recipe.models[0].lora == "adapter_dir"


def test_evaluate_setting_scalar_filter_and_gradient():
    assert evaluate_setting(0.3, "x", 0.7) == 0.3
    # Gradient: value at t = i/(L-1), linear between neighbours (computed by hand).
    grad = [0.0, 1.0, 0.5]
    assert evaluate_setting(grad, "x", 0.0) == 0.0
    assert evaluate_setting(grad, "x", 0.25) == pytest.approx(0.5)
    assert evaluate_setting(grad, "x", 0.5) == pytest.approx(1.0)
    assert evaluate_setting(grad, "x", 0.75) == pytest.approx(0.75)
    assert evaluate_setting(grad, "x", 1.0) == pytest.approx(0.5)
    filtered = [{"filter": "mlp", "value": 0.1}, {"filter": "self_attn", "value": [0, 1]}, {"value": 0.9}]
    assert evaluate_setting(filtered, "model.layers.3.mlp.up_proj.weight", 0.5) == 0.1
    assert evaluate_setting(filtered, "model.layers.3.self_attn.q.weight", 0.5) == pytest.approx(0.5)
    assert evaluate_setting(filtered, "model.norm.weight", 0.5) == 0.9
    assert evaluate_setting([{"filter": "mlp", "value": 1}], "attn", 0) is None


def test_layer_positions_follow_mergekit():
    names = [f"model.layers.{i}.mlp.w" for i in range(5)] + ["model.embed_tokens.weight", "lm_head.weight"]
    assert count_layers(names) == 5
    assert [layer_position(n, 5) for n in names[:5]] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert layer_position("model.embed_tokens.weight", 5) == 0.0
    assert layer_position("bert.encoder.layer.1.attention.self.query.weight", 2) == 1.0
