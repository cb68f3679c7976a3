"""Hostile inputs against the merge: nothing lost, nothing broken published, a named error before any work.

Each test hands the merge the hostile thing itself (an output dir that is an input, a lying shard index, a real
SIGTERM, a YAML alias bomb, a sparse file claiming a 40 GB tensor...) and checks both the error and that every
input is byte-for-byte intact and nothing is left behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import transfuse
from transfuse.cli import app
from transfuse.errors import (
    CheckpointError,
    ConfigError,
    DuplicateInputError,
    InsufficientMemoryError,
    LoraAdapterError,
    NonFiniteOutputError,
    OutputOverlapsInputError,
    RecipeError,
)
from transfuse.example import write_example


@pytest.fixture(scope="session")
def example_template(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("trust") / "example"
    write_example(folder, hidden=16, layers=1)
    return folder


@pytest.fixture
def ex(example_template, tmp_path) -> Path:
    """A fresh copy of the tiny example (base/, three experts, recipe.yaml with relative paths)."""
    folder = tmp_path / "models"
    shutil.copytree(example_template, folder)
    return folder


def digest_tree(root: Path) -> dict[str, str]:
    """Every file under ``root`` (symlinks not followed) with the SHA-256 of its bytes."""
    out = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink():
            out[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def cli(*args: str, cwd: Path | None = None):
    old = os.getcwd()
    if cwd is not None:
        os.chdir(cwd)
    try:
        return CliRunner().invoke(app, list(args))
    finally:
        os.chdir(old)


def assert_clean_failure(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in result.output, result.output


def recipe_file(folder: Path, data: dict, name: str = "r.yaml") -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def example_recipe(**extra) -> dict:
    return {
        "merge_method": "task_arithmetic",
        "base_model": "base",
        "models": [{"model": "expert_sentiment"}, {"model": "expert_topic"}],
        "parameters": {"lambda": 0.5},
        **extra,
    }


# ---------------------------------------------------------------- 1. data loss and silent wrong results


@pytest.mark.parametrize("target", ["base", "expert_topic", ".", "base/inside", "link_to_base"])
def test_output_that_is_contains_or_lies_in_an_input_is_refused_even_with_overwrite(ex, target):
    (ex / "link_to_base").symlink_to(ex / "base", target_is_directory=True)
    recipe = ex / "recipe.yaml"
    before = digest_tree(ex)
    result = cli("merge", str(recipe), target, "--overwrite", "--no-progress", cwd=ex)
    assert_clean_failure(result, "OutputOverlapsInputError")
    assert digest_tree(ex) == before
    assert sorted(p.name for p in ex.iterdir() if p.name.startswith(".")) == []
    with pytest.raises(OutputOverlapsInputError):
        transfuse.merge(recipe, ex / target, overwrite=True, progress=False)
    assert digest_tree(ex) == before


def test_dry_run_refuses_an_output_inside_an_input_too(ex):
    result = cli("merge", str(ex / "recipe.yaml"), str(ex / "base"), "--dry-run")
    assert_clean_failure(result, "OutputOverlapsInputError", "is the input")


def test_index_listing_a_tensor_no_shard_holds_is_refused(ex, tmp_path):
    from transformers import BertModel

    sharded = ex / "expert_topic"
    model = BertModel.from_pretrained(sharded)
    shutil.rmtree(sharded)
    model.save_pretrained(sharded, max_shard_size="20KB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    index["weight_map"]["encoder.layer.0.extra.weight"] = sorted(index["weight_map"].values())[0]
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="lists 1 tensor.*no shard holds.*encoder.layer.0.extra"):
        transfuse.merge(ex / "recipe.yaml", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_base_dir_without_config_is_refused_unless_a_config_source_is_named(ex, tmp_path):
    from transformers import AutoModel

    (ex / "base" / "config.json").unlink()
    with pytest.raises(ConfigError, match="has no config.json.*config_source"):
        transfuse.merge(recipe_file(ex, example_recipe()), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    recipe = recipe_file(ex, example_recipe(config_source="expert_sentiment"))
    transfuse.merge(recipe, tmp_path / "out", progress=False)
    assert AutoModel.from_pretrained(tmp_path / "out").config.hidden_size == 16


def test_the_same_model_twice_is_refused_also_through_a_symlink(ex, tmp_path):
    twice = example_recipe(models=[{"model": "expert_topic"}, {"model": "expert_topic"}])
    with pytest.raises(DuplicateInputError, match=r"models\[0\] and models\[1\]"):
        transfuse.merge(recipe_file(ex, twice), tmp_path / "out", progress=False)
    (ex / "alias").symlink_to(ex / "expert_topic", target_is_directory=True)
    aliased = example_recipe(models=[{"model": "expert_topic"}, {"model": "alias/"}])
    assert_clean_failure(cli("merge", str(recipe_file(ex, aliased)), str(tmp_path / "out")), "same model")
    assert not (tmp_path / "out").exists()


@pytest.fixture
def adapter(ex, tmp_path) -> Path:
    peft = pytest.importorskip("peft")
    from transformers import BertModel

    model = peft.get_peft_model(
        BertModel.from_pretrained(ex / "base"), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["query"])
    )
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)
    out = ex / "adapter"
    model.save_pretrained(out)
    return out


def _edit_adapter_config(adapter: Path, **changes) -> None:
    path = adapter / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def test_loftq_adapters_are_refused(ex, adapter, tmp_path):
    _edit_adapter_config(adapter, init_lora_weights="loftq")
    recipe = recipe_file(ex, example_recipe(models=[{"model": "adapter"}, {"model": "expert_topic"}]))
    with pytest.raises(LoraAdapterError, match="LoftQ"):
        transfuse.merge(recipe, tmp_path / "out", progress=False)


def test_adapter_trained_on_another_local_model_warns_or_errors_with_the_flag(ex, adapter, tmp_path):
    _edit_adapter_config(adapter, base_model_name_or_path=str(ex / "expert_language"))
    recipe = recipe_file(ex, example_recipe(models=[{"model": "adapter"}, {"model": "expert_topic"}]))
    result = transfuse.merge(recipe, tmp_path / "out", progress=False)
    assert any("expert_language" in w and "base_model_name_or_path" in w for w in result.warnings)
    with pytest.raises(LoraAdapterError, match="strict-lora-base"):
        transfuse.merge(recipe, tmp_path / "out2", progress=False, strict_lora_base=True)
    assert not (tmp_path / "out2").exists()
    cli_result = cli("merge", str(recipe), str(tmp_path / "out3"), "--strict-lora-base", "--no-progress")
    assert_clean_failure(cli_result, "LoraAdapterError")
    # Named as the very base it is applied to (a different spelling of the same path): no warning.
    _edit_adapter_config(adapter, base_model_name_or_path=str(ex / "base") + "/")
    assert transfuse.merge(recipe, tmp_path / "out4", progress=False).warnings == []


def _weights_of(tmp_path, values: dict[str, float]) -> dict[str, Path]:
    files = {}
    for name, value in values.items():
        files[name] = tmp_path / f"{name}.safetensors"
        save_file({"w": torch.full((4, 4), value), "b": torch.full((4,), value)}, files[name])
    return files


def test_weights_that_overflow_float32_are_refused_naming_the_tensor(tmp_path):
    files = _weights_of(tmp_path, {"base": 0.0, "a": 1.0, "b": -1.0})
    recipe = {
        "merge_method": "task_arithmetic",
        "base_model": str(files["base"]),
        "models": [{"model": str(files["a"]), "parameters": {"weight": 1e300}}, {"model": str(files["b"])}],
    }
    with pytest.raises(NonFiniteOutputError, match=r"merged tensor '(w|b)'.*1e\+300"):
        transfuse.merge(recipe, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
    with pytest.raises(NonFiniteOutputError):  # the in-memory API refuses too
        transfuse.merge_state_dicts(
            load_file(files["base"]), [load_file(files["a"])], "task_arithmetic", weight=1e300
        )


def test_float16_output_beyond_65504_is_refused_naming_the_cast(tmp_path):
    files = _weights_of(tmp_path, {"base": 7e4, "a": 7e4 + 1})
    recipe = {
        "merge_method": "task_arithmetic",
        "base_model": str(files["base"]),
        "models": [str(files["a"])],
    }
    with pytest.raises(NonFiniteOutputError, match="beyond float16's range.*65504"):
        transfuse.merge(recipe, tmp_path / "out", dtype="float16", progress=False)
    assert not (tmp_path / "out").exists()
    transfuse.merge(recipe, tmp_path / "out", dtype="float32", progress=False)  # the advice works
    assert load_file(tmp_path / "out" / "model.safetensors")["w"][0, 0] == 7e4 + 1


@pytest.fixture
def bigger_vocab_expert(ex) -> Path:
    """expert_topic with two tokens added (tokenizer and embedding rows): vocab 1002 against the base's 1000."""
    from transformers import AutoTokenizer, BertModel

    tokenizer = AutoTokenizer.from_pretrained(ex / "base")
    tokenizer.add_tokens(["zzzz", "qqqq"])
    model = BertModel.from_pretrained(ex / "expert_topic")
    model.resize_token_embeddings(len(tokenizer))
    out = ex / "expert_big_vocab"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_a_tokenizer_source_with_more_tokens_gets_rows_for_them_and_loads(ex, bigger_vocab_expert, tmp_path):
    """Config, tokenizer and tensors agree: the expert's two extra tokens get rows (its own) in the output."""
    from transformers import AutoModel, AutoTokenizer

    recipe = example_recipe(
        models=[{"model": "expert_big_vocab"}, {"model": "expert_sentiment"}],
        tokenizer_source="expert_big_vocab",
    )
    transfuse.merge(recipe_file(ex, recipe), tmp_path / "out", progress=False)
    model = AutoModel.from_pretrained(tmp_path / "out")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    rows = model.embeddings.word_embeddings.weight
    assert rows.shape[0] == model.config.vocab_size == len(tokenizer) == 1002
    expert = AutoModel.from_pretrained(ex / "expert_big_vocab").embeddings.word_embeddings.weight
    new_id = tokenizer.convert_tokens_to_ids("zzzz")
    assert new_id >= 1000 and torch.equal(
        rows[new_id], expert[new_id]
    )  # only that expert has it: its row, whole


def test_a_config_whose_vocab_disagrees_with_the_merged_rows_is_refused(ex, bigger_vocab_expert, tmp_path):
    recipe = example_recipe(
        models=[{"model": "expert_big_vocab"}, {"model": "expert_sentiment"}],
        config_source="expert_big_vocab",
        vocab_mismatch="truncate",
    )
    with pytest.raises(ConfigError, match="vocab_size 1002.*1000 rows"):
        transfuse.merge(recipe_file(ex, recipe), tmp_path / "out", progress=False)


def test_a_base_config_that_is_not_json_is_refused_before_any_work(ex, tmp_path, monkeypatch):
    import transfuse.api

    (ex / "base" / "config.json").write_text("{not json")

    def never(*args, **kwargs):
        raise AssertionError("the merge started before the config was read")

    monkeypatch.setattr(transfuse.api, "run_plan", never)
    with pytest.raises(ConfigError, match="cannot read model config"):
        transfuse.merge(ex / "recipe.yaml", tmp_path / "out", progress=False)


@pytest.mark.parametrize(
    "config, fragment",
    [
        ({"model_type": "no_such_model"}, "no_such_model"),
        ({"model_type": "llama", "num_attention_heads": 5}, "not a multiple"),
    ],
)
def test_a_config_transformers_rejects_is_never_published(ex, tmp_path, config, fragment):
    """Checked beside the first tensors (transformers' import costs seconds), before anything is published; the
    dry run checks it up front."""
    path = ex / "base" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
    with pytest.raises(ConfigError, match=f"transformers cannot read.*{fragment}"):
        transfuse.merge(ex / "recipe.yaml", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
    result = cli("merge", str(ex / "recipe.yaml"), str(tmp_path / "out"), "--dry-run")
    assert_clean_failure(result, "ConfigError")


def test_every_example_output_loads_with_transformers_with_its_tokenizer(ex, tmp_path):
    from transformers import AutoModel, AutoTokenizer

    for method in ("ties", "task_arithmetic", "dare_ties", "slerp", "model_stock", "tsv"):
        models = [{"model": "expert_sentiment"}, {"model": "expert_topic"}][: 1 if method == "slerp" else 2]
        params = {"t": 0.5} if method == "slerp" else {}
        recipe = recipe_file(
            ex, {"merge_method": method, "base_model": "base", "models": models, "parameters": params}
        )
        out = tmp_path / method
        transfuse.merge(recipe, out, progress=False, dtype="bfloat16")
        model = AutoModel.from_pretrained(out)
        assert model.config.torch_dtype == torch.bfloat16 or model.config.dtype == torch.bfloat16
        assert model.embeddings.word_embeddings.weight.shape[0] == model.config.vocab_size
        tokenizer = AutoTokenizer.from_pretrained(out)
        ids = tokenizer("hello there", return_tensors="pt")
        assert torch.isfinite(model(**ids).last_hidden_state).all()


def test_the_written_recipe_replays_from_any_folder(ex, tmp_path):
    out = tmp_path / "merged"
    assert cli("merge", "recipe.yaml", str(out), "--no-progress", cwd=ex).exit_code == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    stored = yaml.safe_load((out / "recipe.yaml").read_text())
    assert Path(stored["base_model"]).is_absolute()
    result = cli("merge", str(out / "recipe.yaml"), "again", "--no-progress", cwd=elsewhere)
    assert result.exit_code == 0, result.output
    a, b = load_file(out / "model.safetensors"), load_file(elsewhere / "again" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------- 2. no tracebacks, no hangs, nothing left


def _slow_recipe(tmp_path: Path) -> Path:
    """A merge of many tensors that takes a few seconds on one thread."""
    g = torch.Generator().manual_seed(0)
    base = {f"layers.{i}.w": torch.randn(256, 256, generator=g) for i in range(400)}
    save_file(base, tmp_path / "base.safetensors")
    for m in ("a", "b"):
        save_file({k: v + 0.01 for k, v in base.items()}, tmp_path / f"{m}.safetensors")
    data = {
        "merge_method": "ties",
        "base_model": str(tmp_path / "base.safetensors"),
        "models": [str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")],
        "parameters": {"density": 0.5},
    }
    return recipe_file(tmp_path, data)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_sigterm_sighup_and_sigint_remove_the_temp_dir_and_say_one_line(tmp_path, sig):
    recipe = _slow_recipe(tmp_path)
    out = tmp_path / "out"
    inputs = {p: p.read_bytes() for p in tmp_path.glob("*.safetensors")}
    proc = subprocess.Popen(
        [sys.executable, "-c", "from transfuse.cli import app; app()", "merge", str(recipe), str(out)]
        + ["--threads", "1", "--shard-size", "200KB", "--no-progress"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 180  # a loaded machine imports slowly
    while not any(p.glob("*.safetensors") for p in tmp_path.glob(".out.tmp-*")):  # writing has begun
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.01)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, (stdout, stderr)
    assert "Traceback" not in stderr
    assert f"stopped by {signal.Signals(sig).name}" in stderr and len(stderr.strip().splitlines()) == 1
    assert not out.exists() and not list(tmp_path.glob(".out*"))
    assert {p: p.read_bytes() for p in tmp_path.glob("*.safetensors")} == inputs


def test_yaml_alias_bomb_is_refused_fast(tmp_path):
    lines = ['a0: &a0 ["x", "x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 10)]
    lines += ["merge_method: linear", "models: *a9"]
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\n")
    assert path.stat().st_size < 2048
    start = time.perf_counter()
    with pytest.raises(RecipeError, match="expands to more than"):
        transfuse.merge(path, tmp_path / "out", progress=False)
    assert time.perf_counter() - start < 5
    result = cli("merge", str(path), str(tmp_path / "out"))
    assert_clean_failure(result, "expands to more than")


def test_recursive_alias_and_deep_nesting_are_refused(tmp_path):
    recursive = tmp_path / "rec.yaml"
    recursive.write_text("merge_method: linear\nmodels: &m [*m]\n")
    assert_clean_failure(cli("merge", str(recursive), str(tmp_path / "o")), "recursive YAML alias")
    deep = tmp_path / "deep.yaml"
    deep.write_text("merge_method: linear\nmodels: " + "[" * 20_000 + "]" * 20_000 + "\n")
    assert_clean_failure(cli("merge", str(deep), str(tmp_path / "o")), "nested too deeply")
    shallow_but_deep = tmp_path / "deep2.yaml"
    shallow_but_deep.write_text("merge_method: linear\nmodels: " + "[" * 100 + "]" * 100 + "\n")
    assert_clean_failure(cli("merge", str(shallow_but_deep), str(tmp_path / "o")), "levels deep")


def test_recipe_that_is_not_utf8_is_a_named_error(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("merge_method: linear\nname: caf\xe9\nmodels: [a]\n".encode("latin-1"))
    assert_clean_failure(cli("merge", str(path), str(tmp_path / "o")), "not UTF-8")


def test_output_path_that_is_a_file_is_a_named_error(ex, tmp_path):
    target = tmp_path / "a_file"
    target.write_text("keep me")
    for extra in ([], ["--overwrite"], ["--dry-run"]):
        result = cli("merge", str(ex / "recipe.yaml"), str(target), "--no-progress", *extra)
        assert_clean_failure(result, "not a dir")
    assert target.read_text() == "keep me"


@pytest.mark.parametrize(
    "option, fragment",
    [
        (["--threads", "0"], "threads must be"),
        (["--threads", "-3"], "threads must be"),
        (["--device", "tpu"], "not a device name"),
        (["--device", "meta"], "meta tensors hold no data"),
        (["--device", "cuda:99"], "cuda"),
        (["--shard-size", "nan"], "not a finite byte count"),
        (["--shard-size", "1e400"], "not a finite byte count"),
        (["--shard-size", "-5GB"], "must be positive"),
        (["--dtype", "int8"], "--dtype must be one of"),
    ],
)
def test_bad_options_are_named_errors_before_any_work(ex, tmp_path, option, fragment):
    for extra in ([], ["--dry-run"]):
        result = cli(
            "merge", str(ex / "recipe.yaml"), str(tmp_path / "out"), "--no-progress", *option, *extra
        )
        assert_clean_failure(result, fragment)
    assert not (tmp_path / "out").exists()


def _sparse_giant(path: Path, rows: int, cols: int) -> None:
    """A valid safetensors file holding one float32 [rows, cols] tensor whose data is a hole (no disk used)."""
    header = json.dumps({"w": {"dtype": "F32", "shape": [rows, cols], "data_offsets": [0, rows * cols * 4]}})
    header += " " * (-len(header) % 8)
    with open(path, "wb") as fh:
        fh.write(len(header).to_bytes(8, "little") + header.encode())
        fh.truncate(8 + len(header) + rows * cols * 4)


def test_a_merge_that_cannot_fit_in_memory_is_refused_with_the_numbers(tmp_path):
    import psutil

    rows = int(psutil.virtual_memory().total // (4 * 100_000) // 2) + 1  # each tensor: half the machine's RAM
    for name in ("base", "a", "b"):
        _sparse_giant(tmp_path / f"{name}.safetensors", rows, 100_000)
    recipe = {
        "merge_method": "task_arithmetic",
        "base_model": str(tmp_path / "base.safetensors"),
        "models": [str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")],
    }
    with pytest.raises(InsufficientMemoryError, match=r"needs about \d+\.\d GiB.*only \d+\.\d GiB"):
        transfuse.merge(recipe, tmp_path / "out", progress=False)
    path = recipe_file(tmp_path, recipe)
    assert_clean_failure(
        cli("merge", str(path), str(tmp_path / "out"), "--dry-run"), "InsufficientMemoryError"
    )
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


@pytest.mark.skipif(
    shutil.which("setpriv") is None, reason="needs setpriv to drop root's file-access override"
)
def test_an_unreadable_input_says_permission_not_redownload(tmp_path):
    folder = tmp_path / "perm"
    folder.mkdir()
    files = _weights_of(folder, {"base": 0.0, "a": 1.0})
    files["a"].chmod(0)
    folder.chmod(0o755)
    tmp_path.chmod(0o755)
    recipe = recipe_file(folder, {"merge_method": "task_arithmetic", "base_model": str(files["base"]),
                                  "models": [str(files["a"])]})  # fmt: skip
    command = [sys.executable, "-c", "from transfuse.cli import app; app()", "merge", str(recipe)]
    command += [str(tmp_path / "out"), "--no-progress"]
    if os.geteuid() == 0:  # root reads anything: drop the capabilities that let it
        command = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", *command]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "permission denied" in proc.stderr and "re-download" not in proc.stderr
    assert "Traceback" not in proc.stderr


def test_merge_state_dicts_takes_lambda_spelled_for_python():
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(3, 3, generator=g)}
    model = {"w": base["w"] + torch.randn(3, 3, generator=g)}
    half = transfuse.merge_state_dicts(base, [model], "task_arithmetic", lambda_=0.5)
    assert torch.allclose(half["w"], base["w"] + 0.5 * (model["w"] - base["w"]))
    same = transfuse.merge_state_dicts(base, [model], "task_arithmetic", **{"lambda": 0.5})
    assert torch.equal(same["w"], half["w"])


def test_the_config_check_in_a_child_process_refuses_too(ex, tmp_path):
    """A fresh CLI process has not imported transformers: the check runs in a child process beside the merge."""
    path = ex / "base" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "model_type": "no_such_model"}))
    command = [sys.executable, "-c", "from transfuse.cli import app; app()", "merge", str(ex / "recipe.yaml")]
    proc = subprocess.run(
        [*command, str(tmp_path / "out"), "--no-progress"], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 2, proc.stderr
    assert "ConfigError" in proc.stderr and "no_such_model" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
