"""The atomic sharded writer: layout, index, metadata, config copying, failure and overwrite semantics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import transfuse.io.writer as writer_module
from transfuse.errors import CheckpointError, OutputExistsError, WriteError
from transfuse.io import ShardedWriter, config_files, open_checkpoint
from transfuse.io.files import HOST_TAG

META = {"merge_method": "ties", "recipe": "models: []\n"}


def leftovers(parent: Path) -> list[str]:
    """Hidden temp / old dirs the writer may have left beside its target."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def some_tensors() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {
        "a.weight": torch.randn(8, 8),
        "b.weight": torch.randn(4, 8).to(torch.bfloat16),
        "c.ids": torch.arange(5),
        "d.half": torch.randn(3).half(),
    }


def test_single_shard(tmp_path):
    out = tmp_path / "out"
    tensors = some_tensors()
    with ShardedWriter(out, metadata=META) as writer:
        for name, t in tensors.items():
            writer.add(name, t)
        assert writer.total_size == sum(t.numel() * t.element_size() for t in tensors.values())
        assert not out.exists()  # nothing at the target until finish()
        result = writer.finish()
    assert result == out
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]
    loaded = load_file(out / "model.safetensors")
    for name, t in tensors.items():
        assert loaded[name].dtype == t.dtype and torch.equal(loaded[name], t)
    with safe_open(out / "model.safetensors", framework="pt") as f:
        assert f.metadata() == {**META, "format": "pt"}
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("streamed", [True, False])
def test_sharded_output_loads_in_transformers(streamed, llama_dir, llama_state, tmp_path):
    import transformers

    out = tmp_path / "merged"
    source = open_checkpoint(llama_dir)
    with ShardedWriter(out, max_shard_bytes=6_000, metadata=META) as writer:
        if streamed:
            writer.expect([(n, tuple(source.info(n).shape), source.info(n).dtype) for n in source.names()])
        for name in source.names():
            writer.add(name, source.tensor(name))
        writer.copy_config_from(source.config_dir)
        writer.finish()

    shards = sorted(out.glob("model-*.safetensors"))
    n = len(shards)
    assert n > 3
    assert [s.name for s in shards] == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert not (out / "model.safetensors").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in llama_state.values())
    assert set(index["weight_map"]) == set(llama_state)
    for shard in shards:
        with safe_open(shard, framework="pt") as f:
            assert f.metadata() == {**META, "format": "pt"}
            keys = set(f.keys())
        assert keys == {k for k, v in index["weight_map"].items() if v == shard.name}
        # each shard within the limit unless it holds a single oversized tensor
        data = sum(t.numel() * t.element_size() for t in load_file(shard).values())
        assert data <= 6_000 or len(keys) == 1
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (llama_dir / name).read_bytes()

    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, llama_state[name]), name
    assert leftovers(tmp_path) == []


def test_failure_mid_merge_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"):
        with ShardedWriter(out, max_shard_bytes=100) as writer:
            for i in range(10):
                writer.add(f"t{i}", torch.randn(10))  # 40 bytes each: several shards get written
            raise RuntimeError("boom")
    assert not out.exists()
    assert leftovers(tmp_path) == []


def test_write_error_leaves_nothing(tmp_path, monkeypatch):
    real = writer_module._write_shard
    calls = []

    def flaky(path, tensors, metadata):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real(path, tensors, metadata)

    monkeypatch.setattr(writer_module, "_write_shard", flaky)
    out = tmp_path / "out"
    with pytest.raises(WriteError, match="No space left on device"):
        with ShardedWriter(out, max_shard_bytes=40) as writer:
            for i in range(10):
                writer.add(f"t{i}", torch.randn(10))
            writer.finish()
    assert len(calls) == 2
    assert not out.exists()
    assert leftovers(tmp_path) == []


def test_existing_output(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(OutputExistsError, match="not empty.*overwrite"):
        ShardedWriter(out)
    assert (out / "keep.txt").read_text() == "precious"
    assert leftovers(tmp_path) == []

    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(OutputExistsError, match="not a dir"):
        ShardedWriter(afile, overwrite=True)

    empty = tmp_path / "empty"
    empty.mkdir()
    with ShardedWriter(empty) as writer:
        writer.add("w", torch.ones(2))
        writer.finish()
    assert (empty / "model.safetensors").is_file()


def test_output_appearing_during_merge(tmp_path):
    out = tmp_path / "out"
    with ShardedWriter(out) as writer:
        writer.add("w", torch.ones(2))
        out.mkdir()
        (out / "other.txt").write_text("someone else's")
        with pytest.raises(OutputExistsError):
            writer.finish()
    assert (out / "other.txt").read_text() == "someone else's"
    assert leftovers(tmp_path) == []


def test_overwrite_replaces_only_when_complete(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")

    with pytest.raises(RuntimeError):
        with ShardedWriter(out, overwrite=True) as writer:
            writer.add("w", torch.ones(2))
            raise RuntimeError("merge failed")
    assert (out / "old.txt").read_text() == "old"  # a failed run keeps the old output

    with ShardedWriter(out, overwrite=True) as writer:
        writer.add("w", torch.ones(2))
        assert (out / "old.txt").exists()
        writer.finish()
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]
    assert leftovers(tmp_path) == []


def test_exit_without_finish_discards(tmp_path):
    out = tmp_path / "out"
    with pytest.warns(UserWarning, match="without finish"):
        with ShardedWriter(out) as writer:
            writer.add("w", torch.ones(2))
    assert not out.exists()
    assert leftovers(tmp_path) == []

    writer = ShardedWriter(out)
    writer.add("w", torch.ones(2))
    writer.abort()
    writer.abort()  # idempotent
    with pytest.raises(WriteError, match="aborted"):
        writer.add("x", torch.ones(1))
    assert leftovers(tmp_path) == []


def test_dropped_writer_removes_its_temp_dir(tmp_path):
    writer = ShardedWriter(tmp_path / "out")
    writer.add("w", torch.ones(2))
    assert leftovers(tmp_path)
    del writer
    import gc

    gc.collect()
    assert leftovers(tmp_path) == []


def test_a_killed_writers_temp_dir_is_removed_by_the_next_writer(tmp_path):
    import os
    import subprocess
    import sys

    # a real SIGKILL mid-write: no Python cleanup runs, so the temp dir stays behind
    child = (
        "import os, signal, sys, torch\n"
        "from transfuse.io import ShardedWriter\n"
        "w = ShardedWriter(sys.argv[1])\n"
        "w.add('w', torch.ones(1000))\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    result = subprocess.run([sys.executable, "-c", child, str(tmp_path / "out")], check=False)
    assert result.returncode == -9
    stale = leftovers(tmp_path)
    assert len(stale) == 1 and stale[0].startswith(".out.tmp-")
    # not ours to judge: another output's dir, another host's, and one of a live process (this one)
    host = HOST_TAG
    other_host = "000000" if host != "000000" else "111111"
    keep = [
        f".other.tmp-{host}-999999-0123abcd",  # (pid 999999: no such process)
        f".out.tmp-{other_host}-999999-0123abcd",
        f".out.tmp-{host}-{os.getpid()}-0123abcd",
    ]
    for name in keep:
        (tmp_path / name).mkdir()
    with ShardedWriter(tmp_path / "out") as writer:
        assert stale[0] not in leftovers(tmp_path)
        writer.add("w", torch.ones(2))
        writer.finish()
    assert leftovers(tmp_path) == sorted(keep)
    assert load_file(tmp_path / "out" / "model.safetensors")["w"].tolist() == [1.0, 1.0]


def test_files_and_config_copy(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    wanted = [
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "tokenizer.model",
        "special_tokens_map.json",
        "vocab.txt",
        "merges.txt",
        "added_tokens.json",
        "chat_template.jinja",
        "cl100k.tiktoken",
    ]
    unwanted = [
        "model.safetensors",
        "model-00001-of-00002.safetensors",
        "model.safetensors.index.json",
        "pytorch_model.bin",
        "adapter_config.json",
        "adapter_model.safetensors",
        "README.md",
        "training_args.bin",
    ]
    for name in wanted + unwanted:
        (src / name).write_text(f"content of {name}")
    assert [p.name for p in config_files(src)] == sorted(wanted)

    out = tmp_path / "out"
    with ShardedWriter(out) as writer:
        writer.add("w", torch.ones(2))
        writer.add_file("config.json", '{"mine": true}')
        writer.copy_config_from(src)
        writer.add_file("recipe.yaml", "merge_method: ties\n")
        writer.add_file("extra/notes.txt", b"\x00bytes")
        with pytest.raises(WriteError, match="reserved"):
            writer.add_file("model.safetensors", "x")
        with pytest.raises(WriteError, match="invalid output file name"):
            writer.add_file("../escape.txt", "x")
        with pytest.raises(CheckpointError, match="not a dir"):
            writer.copy_config_from(tmp_path / "missing")
        writer.finish()
    names = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert names == set(wanted) | {"model.safetensors", "recipe.yaml", "extra/notes.txt"}
    assert (out / "config.json").read_text() == '{"mine": true}'  # add_file wins over the copy
    assert (out / "tokenizer.json").read_text() == "content of tokenizer.json"
    assert (out / "extra/notes.txt").read_bytes() == b"\x00bytes"


def test_tensor_edge_cases(tmp_path):
    out = tmp_path / "out"
    shared = torch.randn(4, 4)
    big = torch.randn(100)  # 400 bytes > max_shard_bytes: a shard of its own
    with ShardedWriter(out, max_shard_bytes=128) as writer:
        writer.add("embed.weight", shared)
        writer.add("lm_head.weight", shared)  # tied weights: the same storage twice
        writer.add("t.weight", shared.T)  # non-contiguous
        writer.add("big", big)
        writer.add("empty", torch.zeros(0, 3))
        writer.add("grad", torch.ones(2, requires_grad=True))
        with pytest.raises(WriteError, match="added twice"):
            writer.add("big", big)
        with pytest.raises(WriteError, match="dense"):
            writer.add("meta", torch.empty(2, device="meta"))
        writer.finish()
    ckpt = open_checkpoint(out)
    assert torch.equal(ckpt.tensor("embed.weight"), shared)
    assert torch.equal(ckpt.tensor("lm_head.weight"), shared)
    assert torch.equal(ckpt.tensor("t.weight"), shared.T)
    assert torch.equal(ckpt.tensor("big"), big)
    assert ckpt.info("empty").shape == (0, 3)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    big_shard = index["weight_map"]["big"]
    assert [n for n, f in index["weight_map"].items() if f == big_shard] == ["big"]


def test_nothing_added_and_bad_arguments(tmp_path):
    out = tmp_path / "out"
    with ShardedWriter(out) as writer:
        with pytest.raises(WriteError, match="no tensors"):
            writer.finish()
    assert not out.exists() and leftovers(tmp_path) == []
    with pytest.raises(WriteError, match="max_shard_bytes"):
        ShardedWriter(out, max_shard_bytes=0)
    with pytest.raises(WriteError, match="str to str"):
        ShardedWriter(out, metadata={"n": 1})  # type: ignore[dict-item]
    assert leftovers(tmp_path) == []


def test_read_write_round_trip_single_file(tmp_path, llama_state):
    src = tmp_path / "in.safetensors"
    from safetensors.torch import save_file

    save_file(llama_state, src)
    ckpt = open_checkpoint(src)
    with ShardedWriter(tmp_path / "out") as writer:
        for name in ckpt.names():
            writer.add(name, ckpt.tensor(name))
        out = writer.finish()
    again = open_checkpoint(out)
    assert again.names() == ckpt.names()
    for name in ckpt.names():
        assert torch.equal(again.tensor(name), llama_state[name])


def test_output_bytes_are_deterministic(tmp_path):
    # safetensors serialises metadata from a hash map; the writer canonicalises the header so reruns are
    # identical
    meta = {f"key{i}": f"value {i} é\n" for i in range(8)}
    blobs = set()
    for run in range(4):
        out = tmp_path / f"out{run}"
        with ShardedWriter(out, max_shard_bytes=64, metadata=meta) as writer:
            for name, t in some_tensors().items():
                writer.add(name, t)
            writer.finish()
        blobs.add(b"".join(p.read_bytes() for p in sorted(out.iterdir())))
    assert len(blobs) == 1
    with safe_open(tmp_path / "out0" / "model-00001-of-00003.safetensors", framework="pt") as f:
        assert f.metadata() == {**meta, "format": "pt"}


def test_streamed_layout_matches_safetensors_and_loads(tmp_path):
    """expect() + add() streams bytes into pre-laid-out shards; safetensors' own reader must agree."""
    from safetensors.torch import load_file as st_load

    g = torch.Generator().manual_seed(0)
    tensors = {
        "a.weight": torch.randn(5, 7, generator=g).to(torch.bfloat16),
        "b.bias": torch.randn(3, generator=g),
        "c.ids": torch.arange(4),
        "d.empty": torch.zeros(0, 2),
        "e.flag": torch.tensor([True, False]),
        "f.half": torch.randn(2, 2, generator=g).half(),
    }
    with ShardedWriter(tmp_path / "out", max_shard_bytes=64, metadata={"k": "v"}) as writer:
        writer.expect([(n, tuple(t.shape), t.dtype) for n, t in tensors.items()])
        for n, t in tensors.items():
            writer.add(n, t)
        out = writer.finish()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    loaded = {}
    for shard in sorted(set(index["weight_map"].values())):
        loaded.update(st_load(out / shard))
        with safe_open(str(out / shard), "pt") as f:
            assert f.metadata()["k"] == "v" and f.metadata()["format"] == "pt"
    assert set(loaded) == set(tensors)
    for n, t in tensors.items():
        assert loaded[n].dtype == t.dtype and torch.equal(loaded[n], t)


def test_streamed_order_and_completeness_are_checked(tmp_path):
    writer = ShardedWriter(tmp_path / "out")
    writer.expect([("a", (2,), torch.float32), ("b", (2,), torch.float32)])
    with pytest.raises(WriteError, match="out of the declared order"):
        writer.add("b", torch.zeros(2))
    writer.add("a", torch.zeros(2))
    with pytest.raises(WriteError, match="declared as"):
        writer.add("b", torch.zeros(3))
    with pytest.raises(WriteError, match="only 1 of the 2"):
        writer.finish()
    assert not (tmp_path / "out").exists()
    assert list(tmp_path.iterdir()) == []
