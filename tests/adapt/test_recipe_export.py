"""Learned coefficients exported as a recipe: `transfuse merge` on the written model files gives the library's
merged tensors exactly (AdaMerging as task arithmetic, AdaMerging++ as TIES)."""

from __future__ import annotations

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import transfuse
from transfuse.adapt import (
    RecipeExportError,
    UnknownTaskError,
    adamerge,
    adamerging_recipe,
    adamerging_recipe_yaml,
    weight_filters,
    write_adamerging_recipe,
)
from transfuse.recipe import evaluate_setting

# Names that trap substring filters: "w" is in every name, "a.w" in "xa.w", "layers.1.w" looks like a prefix
# of "layers.10.w" (it is not a substring of it, but "layers.1" is).
SHAPES = {
    "w": (4, 3),
    "a.w": (3,),
    "xa.w": (3,),
    "layers.1.w": (3, 3),
    "layers.10.w": (3, 3),
    "partial.w": (3,),
    "frozen.w": (3,),
}


def _write_models(tmp_path):
    """A base and two experts as .safetensors files, and the task vectors as transfuse will read them.

    ``frozen.w`` changes in both experts but is in no task vector (the merge must keep the base's);
    ``partial.w`` is only in task a's vector (expert b leaves it as the base has it)."""
    g = torch.Generator().manual_seed(0)
    base = {n: torch.randn(s, generator=g) for n, s in SHAPES.items()}
    base["ids"] = torch.arange(5)  # an integer buffer: copied from the base
    paths = {"base": tmp_path / "base.safetensors"}
    save_file(base, paths["base"])
    vectors = {}
    for task in ("a", "b"):
        expert = {n: v.clone() for n, v in base.items()}
        for n in SHAPES:
            if not (task == "b" and n == "partial.w"):
                expert[n] = base[n] + 0.3 * torch.randn(SHAPES[n], generator=g)
        paths[task] = tmp_path / f"expert_{task}.safetensors"
        save_file(expert, paths[task])
        # transfuse subtracts in float32 what it reads: the same bits as these differences
        stored = load_file(paths[task])
        names = [n for n in SHAPES if n != "frozen.w" and not (task == "b" and n == "partial.w")]
        vectors[task] = {n: stored[n] - base[n] for n in names}
    return base, vectors, paths


def _forward(params, task, x):
    h = torch.tanh(
        x @ params["w"] + params["a.w"] - params["xa.w"] + params["partial.w"] + params["frozen.w"]
    )
    h = torch.tanh(h @ params["layers.1.w"]) @ params["layers.10.w"]
    return h * (1.0 if task == "a" else -1.0)


def _adapt(base, vectors, **kw):
    g = torch.Generator().manual_seed(1)
    batches = {t: [torch.randn(8, 4, generator=g)] for t in vectors}
    return adamerge(base, vectors, _forward, batches, steps=5, lr=0.05, **kw)


def _read_merged(out_dir):
    merged = {}
    for file in sorted(out_dir.glob("*.safetensors")):
        merged.update(load_file(file))
    return merged


@pytest.mark.parametrize(("granularity", "ties_density"), [("layer", None), ("block", None), ("layer", 0.5)])
def test_transfuse_merge_replays_the_learned_merge_exactly(tmp_path, granularity, ties_density):
    base, vectors, paths = _write_models(tmp_path)
    result = _adapt(base, vectors, granularity=granularity, ties_density=ties_density)
    assert len(set(result.coefficients.tolist())) > 1  # the coefficients moved apart: the filters matter
    recipe = adamerging_recipe(result, paths["base"], {"a": paths["a"], "b": paths["b"]})
    assert recipe["merge_method"] == ("task_arithmetic" if ties_density is None else "ties")
    transfuse.merge(recipe, tmp_path / "out", progress=False)
    replayed = _read_merged(tmp_path / "out")
    expected = result.merged_state_dict()
    assert set(replayed) == set(base)
    for name in base:
        assert torch.equal(replayed[name], expected[name]), name
    assert torch.equal(replayed["frozen.w"], base["frozen.w"])
    assert torch.equal(replayed["ids"], base["ids"])


def test_the_yaml_recipe_replays_from_the_command_line(tmp_path):
    from typer.testing import CliRunner

    from transfuse.cli import app

    base, vectors, paths = _write_models(tmp_path)
    result = _adapt(base, vectors, granularity="task", ties_density=0.5)
    recipe_file = write_adamerging_recipe(
        result, tmp_path / "recipe.yaml", paths["base"], {"a": paths["a"], "b": paths["b"]}, dtype="float32"
    )
    text = recipe_file.read_text()
    assert text.startswith("# AdaMerging++ (TIES density 0.5), task-wise: 2 coefficients learned in 5 steps")
    parsed = yaml.safe_load(text)
    assert parsed["parameters"] == {"lambda": 1.0, "normalize": False, "sign_election": "unweighted"}
    assert parsed["models"][0]["parameters"]["density"] == 0.5
    done = CliRunner().invoke(app, ["merge", str(recipe_file), str(tmp_path / "out")])
    assert done.exit_code == 0, done.output
    replayed = _read_merged(tmp_path / "out")
    expected = result.merged_state_dict()
    for name in base:
        assert torch.equal(replayed[name], expected[name]), name


def test_weight_filters_resolve_to_each_tensors_value():
    names = list(SHAPES)
    values = {"a.w": 0.5, "w": 0.25, "layers.1.w": 0.75}
    setting = weight_filters(values, names, 0.0)
    for name in names:
        assert evaluate_setting(setting, name, 0.0) == values.get(name, 0.0), name
    # "xa.w" holds the default but "a.w" and "w" are substrings of it: it must be listed
    assert {"filter": "xa.w", "value": 0.0} in setting
    assert setting[-1] == {"value": 0.0}
    lengths = [len(e["filter"]) for e in setting[:-1]]
    assert lengths == sorted(lengths, reverse=True)
    assert weight_filters({n: 0.3 for n in names}, names, 0.0) == 0.3  # one value: a scalar
    # the most common value is the default: three tensors at 0.3, the rest at the fill value 0
    mostly = weight_filters({"w": 0.3, "a.w": 0.3, "xa.w": 0.3}, ["layers.1.w", "frozen.w"], 0.0)
    assert mostly[-1] == {"value": 0.3}


def test_task_wise_coefficients_give_short_lists(tmp_path):
    base, vectors, paths = _write_models(tmp_path)
    result = _adapt(base, vectors, granularity="task")
    recipe = adamerging_recipe(result, paths["base"], {"a": paths["a"], "b": paths["b"]})
    weight_a = recipe["models"][0]["parameters"]["weight"]
    # task a covers every float tensor but frozen.w: one default, frozen.w and the integer buffer at 0
    assert weight_a[-1] == {"value": result.coefficient("a", "w")}
    assert {e.get("filter") for e in weight_a[:-1]} == {"frozen.w", "ids"}
    assert adamerging_recipe_yaml(result, paths["base"], {"a": paths["a"], "b": paths["b"]}).startswith(
        "# AdaMerging, task-wise"
    )


def test_export_errors_are_named(tmp_path):
    base, vectors, paths = _write_models(tmp_path)
    result = _adapt(base, vectors, granularity="task")
    with pytest.raises(RecipeExportError, match=r"no model path for tasks \['b'\]"):
        adamerging_recipe(result, paths["base"], {"a": paths["a"]})
    with pytest.raises(UnknownTaskError, match=r"model paths given for unknown tasks \['c'\]"):
        adamerging_recipe(result, paths["base"], {"a": paths["a"], "b": paths["b"], "c": paths["a"]})
