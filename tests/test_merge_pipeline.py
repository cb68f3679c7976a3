"""The whole merge path: validation errors before work, atomic output, determinism, CLI, in-memory API."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import transfuse
from transfuse.cli import app
from transfuse.errors import (
    DtypeMismatchError,
    MissingTensorError,
    NonFiniteTensorError,
    NotSameBaseError,
    ParameterError,
    ShapeMismatchError,
    VocabSizeMismatchError,
)

REQUIRED_METHODS = {
    "linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties", "della",
    "della_linear", "magmax", "model_stock", "slerp", "consensus", "pcb", "tsv", "iso_c", "iso_cts",
}  # fmt: skip


def state(seed: int, vocab: int = 10) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "embed_tokens.weight": torch.randn(vocab, 4, generator=g),
        "layers.0.w": torch.randn(4, 4, generator=g),
        "layers.1.w": torch.randn(4, 4, generator=g),
        "norm.weight": torch.randn(4, generator=g),
        "position_ids": torch.arange(6),
    }


@pytest.fixture
def files(tmp_path):
    base = state(0)
    paths = {"base": tmp_path / "base.safetensors"}
    save_file(base, paths["base"])
    for i in range(2):
        ft = {k: (v + 0.1 * torch.randn_like(v) if v.is_floating_point() else v) for k, v in base.items()}
        paths[f"m{i}"] = tmp_path / f"m{i}.safetensors"
        save_file(ft, paths[f"m{i}"])
    return paths


def write_recipe(tmp_path, files, method="task_arithmetic", models=("m0", "m1"), **extra):
    recipe = {
        "merge_method": method,
        "base_model": str(files["base"]),
        "models": [{"model": str(files[m]), "parameters": {"weight": 0.5}} for m in models],
        **extra,
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_task_arithmetic_file_merge_matches_hand_computation(files, tmp_path):
    out = tmp_path / "out"
    transfuse.merge(write_recipe(tmp_path, files, parameters={"lambda": 2.0}), out, progress=False)
    got = load_file(out / "model.safetensors")
    b, m0, m1 = (load_file(files[k]) for k in ("base", "m0", "m1"))
    for name in b:
        if b[name].is_floating_point():
            expected = b[name] + 2.0 * (0.5 * (m0[name] - b[name]) + 0.5 * (m1[name] - b[name]))
            torch.testing.assert_close(got[name], expected, rtol=0, atol=1e-6)
        else:
            assert torch.equal(got[name], b[name])  # integer buffers are copied from the base
    assert "ties" not in (out / "recipe.yaml").read_text()
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["transfuse_version"] == transfuse.__version__ and "task_arithmetic" in meta["recipe"]


def test_merge_state_dicts_in_memory():
    base, a, b = state(0), state(1), state(2)
    got = transfuse.merge_state_dicts(base, [a, b], "task_arithmetic", weight=[1.0, -0.5], **{"lambda": 0.5})
    name = "layers.0.w"
    expected = base[name] + 0.5 * ((a[name] - base[name]) - 0.5 * (b[name] - base[name]))
    torch.testing.assert_close(got[name], expected, rtol=0, atol=1e-6)
    avg = transfuse.merge_state_dicts(None, [a, b], "linear")
    torch.testing.assert_close(avg[name], (a[name] + b[name]) / 2, rtol=0, atol=1e-6)


def test_every_required_method_is_registered_and_runs():
    from transfuse.methods import available_methods

    specs = {m.name: m for m in available_methods(family="data-free")}  # others: tests/stats
    assert REQUIRED_METHODS <= set(specs)
    base, a, b = state(0), state(1), state(2)
    for method, spec in sorted(specs.items()):
        models = [a] if spec.max_models == 1 else [a, b]
        # Required parameters (slerp's t has no default, as in MergeKit) get a mid-range value.
        params = {p.name: 0.5 for p in spec.params if p.default is None}
        got = transfuse.merge_state_dicts(base, models, method, **params)
        assert all(torch.isfinite(v.float()).all() for v in got.values()), method
        assert got["layers.0.w"].shape == (4, 4)


def test_multiple_shards_and_index(files, tmp_path):
    out = tmp_path / "out"
    transfuse.merge(write_recipe(tmp_path, files), out, shard_size=200, progress=False)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((out / s).exists() for s in shards)
    assert set(index["weight_map"]) == set(state(0))


def test_same_seed_is_bit_identical_and_seed_matters(files, tmp_path):
    recipe = write_recipe(tmp_path, files, method="dare_ties", parameters={"density": 0.5})
    outs = []
    for i, seed in enumerate((7, 7, 8)):
        out = tmp_path / f"o{i}"
        transfuse.merge(recipe, out, seed=seed, progress=False)
        outs.append((out / "model.safetensors").read_bytes())
    assert outs[0] == outs[1]
    assert outs[0] != outs[2]


def test_failure_mid_merge_leaves_nothing(files, tmp_path, monkeypatch):
    import transfuse.engine as engine

    calls = {"n": 0}
    real = engine.compute

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("injected failure")
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "compute", failing)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="injected"):
        transfuse.merge(write_recipe(tmp_path, files), out, shard_size=100, progress=False)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_nan_input_is_named_and_nothing_written(files, tmp_path):
    bad = load_file(files["m1"])
    bad["layers.1.w"][0, 0] = float("nan")
    save_file(bad, files["m1"])
    out = tmp_path / "out"
    with pytest.raises(NonFiniteTensorError, match=r"layers\.1\.w.*m1\.safetensors"):
        transfuse.merge(write_recipe(tmp_path, files), out, progress=False)
    assert not out.exists()


def _save_variant(files, key, tensors):
    save_file(tensors, files[key])


def test_missing_tensor(files, tmp_path):
    sd = load_file(files["m0"])
    del sd["norm.weight"]
    _save_variant(files, "m0", sd)
    with pytest.raises(MissingTensorError, match="norm.weight"):
        transfuse.merge(write_recipe(tmp_path, files), tmp_path / "o", progress=False)


def test_not_same_base(files, tmp_path):
    _save_variant(files, "m0", {"other.a": torch.zeros(2), "other.b": torch.zeros(2)})
    with pytest.raises(NotSameBaseError, match="not a fine-tune"):
        transfuse.merge(write_recipe(tmp_path, files), tmp_path / "o", progress=False)


def test_shape_and_dtype_mismatch(files, tmp_path):
    sd = load_file(files["m0"])
    sd["layers.0.w"] = torch.zeros(4, 5)
    _save_variant(files, "m0", sd)
    with pytest.raises(ShapeMismatchError, match="layers.0.w"):
        transfuse.merge(write_recipe(tmp_path, files), tmp_path / "o", progress=False)
    sd["layers.0.w"] = torch.zeros(4, 4, dtype=torch.int64)
    _save_variant(files, "m0", sd)
    with pytest.raises(DtypeMismatchError, match="layers.0.w"):
        transfuse.merge(write_recipe(tmp_path, files), tmp_path / "o", progress=False)


def test_vocab_mismatch_error_truncate_pad(files, tmp_path):
    base = load_file(files["base"])
    bigger = load_file(files["m0"])
    bigger["embed_tokens.weight"] = torch.cat([bigger["embed_tokens.weight"], torch.ones(3, 4)])
    _save_variant(files, "m0", bigger)
    with pytest.raises(VocabSizeMismatchError, match="vocab_mismatch: truncate"):
        transfuse.merge(write_recipe(tmp_path, files), tmp_path / "o", progress=False)
    with pytest.raises(VocabSizeMismatchError, match="use `vocab_mismatch: truncate`"):
        transfuse.merge(write_recipe(tmp_path, files, vocab_mismatch="pad"), tmp_path / "o", progress=False)
    transfuse.merge(write_recipe(tmp_path, files, vocab_mismatch="truncate"), tmp_path / "t", progress=False)
    m1 = load_file(files["m1"])
    got = load_file(tmp_path / "t" / "model.safetensors")["embed_tokens.weight"]
    e = "embed_tokens.weight"
    expected = base[e] + 0.5 * (bigger[e][:10] - base[e]) + 0.5 * (m1[e] - base[e])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)

    smaller = load_file(files["m0"])
    smaller[e] = smaller[e][:7]
    _save_variant(files, "m0", smaller)
    transfuse.merge(write_recipe(tmp_path, files, vocab_mismatch="pad"), tmp_path / "p", progress=False)
    got = load_file(tmp_path / "p" / "model.safetensors")[e]
    padded = torch.cat([smaller[e], base[e][7:]])  # missing rows: the base's, i.e. zero task vector
    torch.testing.assert_close(
        got, base[e] + 0.5 * (padded - base[e]) + 0.5 * (m1[e] - base[e]), rtol=0, atol=1e-6
    )


def test_cli_example_dry_run_merge_and_methods(tmp_path):
    from transformers import AutoModel

    runner = CliRunner()
    result = runner.invoke(app, ["example", str(tmp_path / "ex")])
    assert result.exit_code == 0, result.output
    recipe = tmp_path / "ex" / "recipe.yaml"
    result = runner.invoke(app, ["merge", str(recipe), str(tmp_path / "out"), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "validation passed" in result.output and not (tmp_path / "out").exists()
    result = runner.invoke(app, ["merge", str(recipe), str(tmp_path / "out"), "--no-progress"])
    assert result.exit_code == 0, result.output
    model = AutoModel.from_pretrained(tmp_path / "out")
    base = AutoModel.from_pretrained(tmp_path / "ex" / "base")
    assert model.config.hidden_size == base.config.hidden_size
    from transformers import AutoTokenizer  # the base's tokenizer is copied with the weights

    tokens = AutoTokenizer.from_pretrained(tmp_path / "out")("Hi there")["input_ids"]
    assert tokens == AutoTokenizer.from_pretrained(tmp_path / "ex" / "base")("Hi there")["input_ids"]
    assert len(tokens) == 9  # [CLS] h ##i t ##h ##e ##r ##e [SEP]
    assert (tmp_path / "out" / "recipe.yaml").exists()
    # A second run into the same dir is refused unless --overwrite.
    result = runner.invoke(app, ["merge", str(recipe), str(tmp_path / "out"), "--no-progress"])
    assert result.exit_code == 2 and "--overwrite" in result.output
    result = runner.invoke(app, ["methods"])
    assert result.exit_code == 0 and "iso_cts" in result.output


def test_dry_run_scans_for_nan_and_lists_parameter_groups(files, tmp_path):
    runner = CliRunner()
    gradient = write_recipe(
        tmp_path, files, parameters={"lambda": [{"filter": "norm", "value": 0.3}, {"value": 1.5}]}
    )
    result = runner.invoke(app, ["merge", str(gradient), str(tmp_path / "out"), "--dry-run", "--no-progress"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "parameters by tensor" in text and "lambda=0.3" in text and "lambda=1.5" in text
    assert (
        "NaN/Inf none in the 13 input tensors read" in text
    )  # 4 merged x 3 inputs + position_ids of the base
    broken = load_file(files["m1"])
    broken["layers.1.w"][0, 0] = float("nan")
    _save_variant(files, "m1", broken)
    result = runner.invoke(
        app,
        ["merge", str(write_recipe(tmp_path, files)), str(tmp_path / "out"), "--dry-run", "--no-progress"],
    )
    text = " ".join(result.output.split())
    assert (
        result.exit_code == 2 and "NonFiniteTensorError" in text and "'layers.1.w'" in text and "m1" in text
    )
    assert "validation passed" not in text and not (tmp_path / "out").exists()


def test_dry_run_check_handles_empty_tensors(tmp_path):
    from transfuse.api import plan_merge
    from transfuse.engine import check_inputs_finite

    for name in ("b", "m"):
        save_file({"w": torch.randn(3), "empty": torch.zeros(0)}, tmp_path / f"{name}.safetensors")
    recipe = {
        "merge_method": "linear",
        "base_model": str(tmp_path / "b.safetensors"),
        "models": [{"model": str(tmp_path / "m.safetensors")}],
    }
    with plan_merge(recipe) as plan:
        assert check_inputs_finite(plan) == 4  # two tensors of two inputs, the empty one included


def test_merge_restores_the_callers_thread_count(files, tmp_path, restore_threads):
    torch.set_num_threads(2)
    transfuse.merge(write_recipe(tmp_path, files), tmp_path / "o", threads=1, progress=False)
    assert torch.get_num_threads() == 2


def test_a_name_merely_containing_a_vocab_word_is_not_a_vocab_tensor(files, tmp_path):
    # "shared" is T5's embedding; an MoE "shared_expert" tensor of another size is a plain shape mismatch
    for key in ("base", "m0", "m1"):
        sd = load_file(files[key])
        sd["mlp.shared_expert.w"] = torch.zeros(5 if key == "m0" else 4, 4)
        _save_variant(files, key, sd)
    with pytest.raises(ShapeMismatchError, match="shared_expert"):
        transfuse.merge(
            write_recipe(tmp_path, files, vocab_mismatch="truncate"), tmp_path / "o", progress=False
        )


def test_methods_and_plan_show_required_parameters_and_whole_summaries(files, tmp_path):
    result = CliRunner().invoke(app, ["methods"])
    assert result.exit_code == 0 and "t=required" in "".join(result.output.split())  # rich wraps cells
    recipe = write_recipe(tmp_path, files, method="consensus")
    result = CliRunner().invoke(
        app, ["merge", str(recipe), str(tmp_path / "o"), "--dry-run", "--no-progress"]
    )
    assert result.exit_code == 0, result.output
    assert "[sum_t m_t >= k]" in " ".join(result.output.split())  # brackets are not eaten as rich markup


def test_cli_bad_recipe_is_a_clean_error(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("merge_method: ties\nmodels: [a]\nbase_model: b\nfoo: 1\n")
    result = CliRunner().invoke(app, ["merge", str(path), str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "RecipeError" in result.output and "foo" in result.output


def test_chunked_loading_matches_and_still_finds_nan(files, tmp_path, monkeypatch):
    import transfuse.engine as engine

    recipe = write_recipe(tmp_path, files, method="ties", parameters={"density": 0.5})
    transfuse.merge(recipe, tmp_path / "whole", progress=False)
    monkeypatch.setattr(engine, "LOAD_CHUNK", 3)  # every tensor spans several chunks
    transfuse.merge(recipe, tmp_path / "chunked", progress=False)
    assert (tmp_path / "whole" / "model.safetensors").read_bytes() == (
        tmp_path / "chunked" / "model.safetensors"
    ).read_bytes()
    bad = load_file(files["base"])
    bad["layers.0.w"][3, 3] = float("inf")  # in the last chunk
    save_file(bad, files["base"])
    with pytest.raises(NonFiniteTensorError, match=r"layers\.0\.w.*of the base"):
        transfuse.merge(recipe, tmp_path / "o", progress=False)


def test_della_epsilon_rule_is_checked_before_any_work(files, tmp_path, monkeypatch):
    import transfuse.engine as engine

    def never(*args, **kwargs):
        raise AssertionError("no tensor may be merged when the recipe is invalid")

    monkeypatch.setattr(engine, "compute", never)
    recipe = write_recipe(
        tmp_path,
        files,
        method="della",
        parameters={"density": [{"filter": "layers.1", "value": 0.9}, {"value": 0.5}]},
    )
    # epsilon 0.15 is fine at density 0.5 but not at 0.9 (0.9 + 0.15 >= 1), which only layers.1 gets.
    with pytest.raises(ParameterError, match=r"della, tensor 'layers\.1\.w': model 0 has density=0\.9"):
        transfuse.merge(recipe, tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("method", ["linear", "ties", "dare_ties", "breadcrumbs", "magmax", "tsv"])
def test_serial_parallel_and_mixed_engine_paths_are_bit_identical(
    files, tmp_path, monkeypatch, restore_threads, method
):
    import transfuse.chunks as chunks
    import transfuse.engine as engine
    import transfuse.methods._thresholds as thresholds

    monkeypatch.setattr(chunks, "CHUNK", 8)  # several chunks per tensor, in every run
    monkeypatch.setattr(thresholds, "_SAMPLE", 64)
    parallel_maps = []
    real_map_parallel = chunks.Workspace._map_parallel

    def spy(self, *args):
        parallel_maps.append(len(self.ranges))
        return real_map_parallel(self, *args)

    monkeypatch.setattr(chunks.Workspace, "_map_parallel", spy)
    params = {"density": 0.5} if method in ("ties", "dare_ties", "breadcrumbs") else {}
    recipe = write_recipe(tmp_path, files, method=method, parameters=params)
    outputs = {}
    before = torch.get_num_threads()
    # one thread: jobs in turn with a reader thread; two: a worker pool; mixed: embed_tokens (40 entries, five
    # chunks) is a "big" job that drains the pool and runs alone, its chunks spread over two threads
    for label, threads, prefetch_max in [("serial", 1, None), ("pool", 2, None), ("mixed", 2, 4 * 3 * 20)]:
        if prefetch_max is not None:
            monkeypatch.setattr(engine, "PREFETCH_MAX_BYTES", prefetch_max)
        out = tmp_path / label
        transfuse.merge(recipe, out, threads=threads, seed=3, progress=False)
        outputs[label] = (out / "model.safetensors").read_bytes()
        assert torch.get_num_threads() == before  # neither the pool's setting nor --threads leaks
    assert outputs["serial"] == outputs["pool"] == outputs["mixed"]
    if method != "tsv":  # (SVD methods do not loop over chunks)
        assert parallel_maps, "the big job's chunk loops should have run on the chunk pool"


def test_worker_error_propagates_and_restores_threads(files, tmp_path, restore_threads):
    bad = load_file(files["m0"])
    bad["layers.0.w"][1, 2] = float("inf")
    save_file(bad, files["m0"])
    out = tmp_path / "out"
    torch.set_num_threads(1)
    with pytest.raises(NonFiniteTensorError, match=r"layers\.0\.w.*m0\.safetensors"):
        transfuse.merge(write_recipe(tmp_path, files, method="ties"), out, threads=2, progress=False)
    assert torch.get_num_threads() == 1  # the caller's count, restored although a worker failed
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_in_memory_merge_does_not_keep_the_task_vector_stack_alive(restore_threads):
    base = {"w": torch.randn(64, 32)}
    models = [{"w": base["w"] + torch.randn(64, 32)} for _ in range(3)]
    merged = transfuse.merge_state_dicts(base, models, "ties", density=0.5)
    w = merged["w"]
    assert w.dtype == torch.float32
    assert w.untyped_storage().nbytes() == w.numel() * 4  # not a row view of the [3, 64, 32] stack


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize(
    "method,params", [("ties", {"density": 0.0}), ("linear", {}), ("task_arithmetic", {})]
)
@pytest.mark.parametrize("threads", [1, 2])
def test_reused_work_buffers_never_leak_into_results(restore_threads, method, params, k, threads):
    # many same-size float32 tensors: each pool worker (two threads) or job parity (one thread, with a reader)
    # reuses its buffers, so a result aliasing a buffer (linear with one model returns its task-vector row)
    # would be overwritten by a later job
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    base = {f"w{i}": torch.randn(16, 8, generator=g) for i in range(12)}
    models = [{n: v + torch.randn(16, 8, generator=g) for n, v in base.items()} for _ in range(k)]
    merged = transfuse.merge_state_dicts(base, models, method, **params)
    for n in base:
        if method == "ties":
            expected = base[n]
        elif method == "linear":
            expected = sum(m[n] for m in models) / k
        else:
            expected = base[n] + sum(m[n] - base[n] for m in models)
        torch.testing.assert_close(merged[n], expected, rtol=1e-6, atol=1e-6)
