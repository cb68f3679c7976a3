"""Readers: HF dirs (safetensors / .bin, single / sharded), bare files, and the errors for bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from transfuse.errors import CheckpointError, MissingTensorError
from transfuse.io import Checkpoint, TensorInfo, is_lora_adapter, open_checkpoint


def read_all(ckpt: Checkpoint) -> dict[str, torch.Tensor]:
    return {name: ckpt.tensor(name) for name in ckpt.names()}


def mixed_tensors() -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    return {
        "z.weight": torch.randn(3, 5),
        "a.half": torch.randn(4).to(torch.bfloat16),
        "m.f16": torch.randn(2, 2).half(),
        "ids": torch.arange(7),
        "mask": torch.tensor([True, False]),
        "scalar": torch.tensor(2.5),
    }


# ---------------------------------------------------------------------------------------------- safetensors


def test_single_safetensors_file(tmp_path):
    tensors = mixed_tensors()
    path = tmp_path / "weights.safetensors"
    save_file(tensors, path, metadata={"k": "v"})
    with open_checkpoint(str(path)) as ckpt:
        assert isinstance(ckpt, Checkpoint)
        assert ckpt.source == str(path)
        assert ckpt.config_dir is None
        assert set(ckpt.names()) == set(tensors)
        assert ckpt.info("a.half") == TensorInfo("a.half", (4,), torch.bfloat16)
        assert ckpt.info("scalar").shape == ()
        for name, t in tensors.items():
            got = ckpt.tensor(name)
            assert got.dtype == t.dtype and torch.equal(got, t)
        assert ckpt.metadata() == {"k": "v"}
        with pytest.raises(MissingTensorError, match="nope"):
            ckpt.info("nope")
        with pytest.raises(MissingTensorError, match=str(path)):
            ckpt.tensor("nope")
    with pytest.raises(CheckpointError, match="closed"):
        ckpt.tensor("ids")


def test_names_follow_stored_order(tmp_path):
    # safetensors writes tensors sorted by dtype alignment then name; names() must follow the file, not the
    # alphabet
    path = tmp_path / "w.safetensors"
    save_file({"b": torch.zeros(2, dtype=torch.float64), "a": torch.zeros(2, dtype=torch.int8)}, path)
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        stored = f.offset_keys()
    assert open_checkpoint(path).names() == stored


def test_sharded_hf_dir(llama_dir, llama_state, assert_same_tensors):
    assert (llama_dir / "model.safetensors.index.json").is_file()
    assert len(list(llama_dir.glob("model-*-of-*.safetensors"))) >= 3
    ckpt = open_checkpoint(llama_dir)
    assert ckpt.config_dir == llama_dir
    assert_same_tensors(read_all(ckpt), llama_state)
    index = json.loads((llama_dir / "model.safetensors.index.json").read_text())
    assert set(ckpt.names()) == set(index["weight_map"])
    ckpt.close()


def test_single_file_hf_dir(tmp_path, llama_config, assert_same_tensors):
    import transformers

    model = transformers.LlamaForCausalLM(llama_config())
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    ckpt = open_checkpoint(tmp_path)
    assert ckpt.config_dir == tmp_path
    assert_same_tensors(read_all(ckpt), {k: v.detach() for k, v in model.state_dict().items()})


def test_weights_dir_without_config_has_no_config_dir(tmp_path):
    save_file({"w": torch.ones(2)}, tmp_path / "model.safetensors")
    assert open_checkpoint(tmp_path).config_dir is None


def test_missing_shard_is_reported(tmp_path):
    save_file({"a": torch.ones(2)}, tmp_path / "model-00001-of-00002.safetensors")
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors.*missing"):
        open_checkpoint(tmp_path)


def test_tensor_in_two_shards_is_reported(tmp_path):
    save_file({"a": torch.ones(2)}, tmp_path / "s1.safetensors")
    save_file({"a": torch.ones(2)}, tmp_path / "s2.safetensors")
    index = {"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="stored twice"):
        open_checkpoint(tmp_path)


def test_corrupt_safetensors(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 3)
    with pytest.raises(CheckpointError, match=r"bad\.safetensors.*expected a complete safetensors file"):
        open_checkpoint(bad)
    good = tmp_path / "trunc.safetensors"
    save_file({"w": torch.randn(64, 64)}, good)
    good.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="trunc.safetensors"):
        open_checkpoint(good)


# ---------------------------------------------------------------------------------------------- torch.save


def test_bin_dir_single_and_sharded(tmp_path, llama_state, assert_same_tensors):
    single = tmp_path / "single"
    single.mkdir()
    torch.save(llama_state, single / "pytorch_model.bin")
    (single / "config.json").write_text("{}")
    ckpt = open_checkpoint(single)
    assert ckpt.config_dir == single
    assert ckpt.names() == list(llama_state)
    assert_same_tensors(read_all(ckpt), llama_state)

    sharded = tmp_path / "sharded"
    sharded.mkdir()
    names = list(llama_state)
    halves = {"pytorch_model-00001-of-00002.bin": names[:5], "pytorch_model-00002-of-00002.bin": names[5:]}
    weight_map = {}
    for file, part in halves.items():
        torch.save({n: llama_state[n] for n in part}, sharded / file)
        weight_map.update(dict.fromkeys(part, file))
    (sharded / "pytorch_model.bin.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    ckpt = open_checkpoint(sharded)
    assert ckpt.names() == names
    assert ckpt.info(names[0]) == TensorInfo(names[0], tuple(llama_state[names[0]].shape), torch.float32)
    assert_same_tensors(read_all(ckpt), llama_state)


@pytest.mark.parametrize("wrapper", ["state_dict", "model", None])
def test_pt_file_unwrapped_and_non_tensors_ignored(tmp_path, wrapper):
    tensors = {"w": torch.randn(2, 3), "b": torch.zeros(3, dtype=torch.bfloat16)}
    payload = {**tensors, "step": 7, "name": "x", "nested": {"t": torch.ones(1)}}
    obj = {wrapper: payload, "epoch": 3, "optimizer": {"lr": 0.1}} if wrapper else payload
    path = tmp_path / "ckpt.pt"
    torch.save(obj, path)
    ckpt = open_checkpoint(path)
    assert ckpt.config_dir is None
    assert ckpt.names() == ["w", "b"]
    assert torch.equal(ckpt.tensor("w"), tensors["w"])
    assert ckpt.info("b").dtype == torch.bfloat16


def test_legacy_torch_format(tmp_path):
    path = tmp_path / "old.bin"
    torch.save({"w": torch.arange(4.0)}, path, _use_new_zipfile_serialization=False)
    assert torch.equal(open_checkpoint(path).tensor("w"), torch.arange(4.0))


class _Opaque:
    pass


def test_pickled_object_is_refused(tmp_path):
    path = tmp_path / "evil.bin"
    torch.save({"w": torch.ones(2), "obj": _Opaque()}, path)
    with pytest.raises(CheckpointError, match=r"evil\.bin.*weights_only=True.*_Opaque.*state dict"):
        open_checkpoint(path)


def test_bad_torch_files(tmp_path):
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"definitely not a checkpoint")
    with pytest.raises(CheckpointError, match="garbage.bin"):
        open_checkpoint(garbage)
    trunc = tmp_path / "trunc.pt"
    torch.save({"w": torch.randn(100)}, trunc)
    trunc.write_bytes(trunc.read_bytes()[:200])
    with pytest.raises(CheckpointError, match=r"trunc\.pt.*torch\.save file"):
        open_checkpoint(trunc)
    not_dict = tmp_path / "list.pt"
    torch.save([torch.ones(1)], not_dict)
    with pytest.raises(CheckpointError, match="list.pt holds a list, expected a state dict"):
        open_checkpoint(not_dict)
    empty = tmp_path / "empty.pt"
    torch.save({"epoch": 1}, empty)
    with pytest.raises(CheckpointError, match="holds no tensors"):
        open_checkpoint(empty)


# ---------------------------------------------------------------------------------------------- paths


def test_missing_path(tmp_path):
    with pytest.raises(CheckpointError, match="does-not-exist.*does not exist"):
        open_checkpoint(tmp_path / "does-not-exist")
    with pytest.raises(CheckpointError, match="Hugging Face Hub id"):
        open_checkpoint("some-org/some-model-that-is-not-here")


def test_dir_without_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(
        CheckpointError, match=r"holds no model weights: expected model\.safetensors.*config\.json"
    ):
        open_checkpoint(tmp_path)


def test_unknown_file_kind(tmp_path):
    path = tmp_path / "weights.npz"
    path.write_bytes(b"x")
    with pytest.raises(CheckpointError, match=r"unknown kind.*\.safetensors"):
        open_checkpoint(path)


def test_bad_index(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="index"):
        open_checkpoint(tmp_path)


def test_is_lora_adapter(tmp_path):
    assert not is_lora_adapter(tmp_path)
    (tmp_path / "adapter_config.json").write_text("{}")
    assert is_lora_adapter(tmp_path)
    assert is_lora_adapter(str(tmp_path))
    save_file({"w": torch.ones(1)}, tmp_path / "model.safetensors")  # a merged model shipped with its adapter
    assert not is_lora_adapter(tmp_path)
    assert not is_lora_adapter(tmp_path / "model.safetensors")
    assert not is_lora_adapter(Path("/nonexistent/dir"))


def test_lora_base_ignored_for_full_models(tmp_path):
    save_file({"w": torch.ones(1)}, tmp_path / "m.safetensors")
    assert open_checkpoint(tmp_path / "m.safetensors", lora_base="/nonexistent").names() == ["w"]


@pytest.mark.parametrize("file", ["model.safetensors", "pytorch_model.bin"])
def test_git_lfs_pointer_is_explained(tmp_path, file):
    pointer = "version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n"
    (tmp_path / file).write_text(pointer)
    with pytest.raises(CheckpointError, match="Git LFS pointer"):
        open_checkpoint(tmp_path)


def _rss_file_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1])
    raise AssertionError("no RssFile line")


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="page release is Linux-only")
def test_bin_release_drops_mapped_pages_and_keeps_the_data(tmp_path):
    big = torch.randn(4096, 2048)  # 32 MiB
    torch.save({"a": big, "tied": big, "small": torch.arange(10)}, tmp_path / "m.bin")
    checkpoint = open_checkpoint(tmp_path / "m.bin")
    assert float(checkpoint.tensor("a").sum()) == float(big.sum())  # touch every page
    before = _rss_file_kb()
    checkpoint.release("a")
    assert before - _rss_file_kb() > 24 * 1024  # most of the 32 MiB left the resident set
    assert torch.equal(checkpoint.tensor("a"), big) and torch.equal(checkpoint.tensor("tied"), big)
    checkpoint.release("small")
    assert checkpoint.tensor("small").tolist() == list(range(10))


def test_bin_release_is_a_no_op_for_files_read_into_memory(tmp_path):
    # the legacy format is not memory-mapped: dropping its pages would zero the data, so release must not
    big = torch.randn(1024, 1024)
    torch.save({"a": big}, tmp_path / "legacy.bin", _use_new_zipfile_serialization=False)
    checkpoint = open_checkpoint(tmp_path / "legacy.bin")
    checkpoint.release("a")
    assert torch.equal(checkpoint.tensor("a"), big)
