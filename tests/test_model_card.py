"""The output's model card and MergeKit's output flags (--copy-tokenizer, --out-shard-size, --no-model-card)."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml
from typer.testing import CliRunner

from transfuse.cli import app
from transfuse.example import write_example


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    folder = tmp_path_factory.mktemp("card") / "ex"
    write_example(folder, hidden=16, layers=1)
    config = json.loads((folder / "base" / "config.json").read_text())
    config["_name_or_path"] = "someorg/tiny-bert"  # as if the base had been downloaded from the Hub
    (folder / "base" / "config.json").write_text(json.dumps(config))
    return folder


def run(*args):
    result = CliRunner().invoke(app, [*map(str, args), "--no-progress"])
    assert result.exit_code == 0, result.output
    return result


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_model_card_names_method_inputs_hub_base_and_holds_the_recipe(example, tmp_path):
    run("merge", example / "recipe.yaml", tmp_path / "out")
    card = (tmp_path / "out" / "README.md").read_text()
    meta = front_matter(card)
    assert meta["base_model"] == ["someorg/tiny-bert"]  # local paths are not Hub ids: only the recorded one
    assert meta["tags"] == ["merge", "transfuse", "ties"] and meta["library_name"] == "transformers"
    assert "**ties**" in card and "TIES-Merging" in card
    for expert in ("expert_sentiment", "expert_topic", "expert_language"):
        assert f"{example / expert}`" in card
    stored = (tmp_path / "out" / "recipe.yaml").read_text()
    block = card.split("```yaml\n")[1].split("```")[0]
    assert yaml.safe_load(block) == yaml.safe_load(stored)


def test_no_model_card_and_no_copy_tokenizer(example, tmp_path):
    run("merge", example / "recipe.yaml", tmp_path / "out", "--no-model-card", "--no-copy-tokenizer")
    names = {p.name for p in (tmp_path / "out").iterdir()}
    assert "README.md" not in names
    assert not any(n.startswith(("tokenizer", "vocab", "special_tokens")) for n in names)
    assert {"config.json", "recipe.yaml", "model.safetensors"} <= names
    run("merge", example / "recipe.yaml", tmp_path / "with", "--copy-tokenizer")
    assert (tmp_path / "with" / "tokenizer_config.json").is_file()


def test_out_shard_size_is_mergekits_count_of_bytes(example, tmp_path):
    run("merge", example / "recipe.yaml", tmp_path / "mk", "--out-shard-size", "20K")
    run("merge", example / "recipe.yaml", tmp_path / "ours", "--shard-size", "20KB")
    mk = json.loads((tmp_path / "mk" / "model.safetensors.index.json").read_text())
    ours = json.loads((tmp_path / "ours" / "model.safetensors.index.json").read_text())
    assert mk["weight_map"] == ours["weight_map"] and len(set(mk["weight_map"].values())) > 1
    for bad, fragment in (("5GB", "whole number"), ("0", "must be positive"), ("x", "whole number")):
        result = CliRunner().invoke(
            app, ["merge", str(example / "recipe.yaml"), str(tmp_path / "x"), "--out-shard-size", bad]
        )
        assert result.exit_code == 2 and fragment in result.output, result.output
    both = [
        "merge",
        str(example / "recipe.yaml"),
        str(tmp_path / "x"),
        "--out-shard-size",
        "5B",
        "--shard-size",
        "1GB",
    ]
    result = CliRunner().invoke(app, both)
    assert result.exit_code == 2 and "not both" in result.output
    assert not (tmp_path / "x").exists()
    shutil.rmtree(tmp_path / "mk")
