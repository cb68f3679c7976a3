"""save_routed -> load round trips, and directories whose files lie are refused by name."""

from __future__ import annotations

import json
import struct

import pytest
import torch

import transfuse
from transfuse.errors import OutputExistsError
from transfuse.routed.bitpack import packed_size
from transfuse.routed.emr import emr_merge
from transfuse.routed.errors import (
    MissingModuleError,
    MissingTaskIdError,
    ModuleMismatchError,
    RoutedFormatError,
    UnsupportedFormatVersionError,
)
from transfuse.routed.model import RoutedModel
from transfuse.routed.store import save_routed

from .conftest import TinyMLP


@pytest.fixture
def saved_mlp(mlp_experts, tmp_path):
    base, experts = mlp_experts
    model = emr_merge(base, experts, TinyMLP())
    return model, save_routed(model, tmp_path / "routed")


def _manifest(directory):
    return json.loads((directory / "manifest.json").read_text())


def _rewrite(directory, edit):
    manifest = _manifest(directory)
    edit(manifest)
    (directory / "manifest.json").write_text(json.dumps(manifest))


def test_round_trip_mlp_gives_identical_outputs(saved_mlp):
    model, directory = saved_mlp
    names = sorted(p.name for p in directory.iterdir())
    assert names == [
        "base.safetensors",
        "manifest.json",
        "shared.safetensors",
        "task-000.safetensors",
        "task-001.safetensors",
        "task-002.safetensors",
    ]
    assert not [p for p in directory.parent.iterdir() if p.name.startswith(".")]  # no temporary dir left
    manifest = _manifest(directory)
    assert (
        manifest["format_version"] == 1
        and manifest["method"] == "emr"
        and manifest["tasks"] == ["a", "b", "c"]
    )
    assert manifest["module"]["kind"] == "module" and manifest["router"] is False
    # masks at 1 bit per entry, rescaler one float32
    task_file = manifest["files"]["task-000.safetensors"]["tensors"]
    assert task_file["mask.inp.weight"] == {"dtype": "uint8", "shape": [packed_size(32)]}
    assert task_file["rescaler"] == {"dtype": "float32", "shape": [1]}
    loaded = transfuse.load(directory, module=TinyMLP())
    assert isinstance(loaded, RoutedModel) and loaded.tasks == ("a", "b", "c")
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(8))
    ids = ["c", "a", "b", "b", "a", "c"]
    assert torch.equal(loaded(x, task_ids=ids), model(x, task_ids=ids))
    assert torch.equal(loaded.module.version, torch.tensor([3]))


def test_round_trip_bert_rebuilds_the_module_from_its_config(bert_experts, tmp_path):
    module, base, experts = bert_experts
    model = emr_merge(base, experts, module)
    directory = save_routed(model, tmp_path / "bert")
    assert _manifest(directory)["module"] == {
        "kind": "transformers",
        "class": "BertModel",
        "config": "config.json",
    }
    loaded = transfuse.load(directory)
    loaded.eval()
    assert type(loaded.module).__name__ == "BertModel"
    input_ids = torch.randint(0, 40, (4, 7), generator=torch.Generator().manual_seed(9))
    ids = ["sst", "nli", "nli", "sst"]
    with torch.no_grad():
        want = model(input_ids=input_ids, task_ids=ids).last_hidden_state
        got = loaded(input_ids=input_ids, task_ids=ids).last_hidden_state
    assert torch.equal(got, want)


def test_existing_output_is_kept_unless_overwrite(saved_mlp):
    model, directory = saved_mlp
    with pytest.raises(OutputExistsError):
        save_routed(model, directory)
    save_routed(model, directory, overwrite=True)
    assert transfuse.load(directory, module=TinyMLP()).tasks == ("a", "b", "c")


def test_a_saved_router_is_asked_for_again(saved_mlp, tmp_path):
    model, _ = saved_mlp
    routed = RoutedModel(model.module, model.parts, router=lambda x: "a")
    directory = save_routed(routed, tmp_path / "with_router")
    assert _manifest(directory)["router"] is True
    loaded = transfuse.load(directory, module=TinyMLP())
    with pytest.raises(MissingTaskIdError, match="router="):
        loaded(torch.randn(2, 4))
    again = transfuse.load(directory, module=TinyMLP(), router=lambda x: "a")
    x = torch.randn(2, 4)
    assert torch.equal(again(x), model(x, task_ids="a"))


def test_missing_or_mismatched_module(saved_mlp):
    _, directory = saved_mlp
    with pytest.raises(MissingModuleError, match="module="):
        transfuse.load(directory)
    with pytest.raises(ModuleMismatchError, match="saved structure"):
        transfuse.load(directory, module=torch.nn.Linear(4, 8))


def test_unknown_version_and_foreign_manifest(saved_mlp):
    _, directory = saved_mlp
    _rewrite(directory, lambda m: m.update(format_version=2))
    with pytest.raises(UnsupportedFormatVersionError, match="version 2"):
        transfuse.load(directory, module=TinyMLP())
    _rewrite(directory, lambda m: m.update(format_version=1, format="other"))
    with pytest.raises(RoutedFormatError, match="format 'other'"):
        transfuse.load(directory, module=TinyMLP())
    (directory / "manifest.json").write_text("{not json")
    with pytest.raises(RoutedFormatError, match="JSON"):
        transfuse.load(directory, module=TinyMLP())
    (directory / "manifest.json").unlink()
    with pytest.raises(RoutedFormatError, match="no manifest.json"):
        transfuse.load(directory, module=TinyMLP())


def test_missing_file(saved_mlp):
    _, directory = saved_mlp
    (directory / "task-001.safetensors").unlink()
    with pytest.raises(RoutedFormatError, match="lacks task-001.safetensors"):
        transfuse.load(directory, module=TinyMLP())


def test_truncated_safetensors(saved_mlp):
    _, directory = saved_mlp
    path = directory / "shared.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:-5])
    with pytest.raises(RoutedFormatError, match="bytes, the manifest says"):
        transfuse.load(directory, module=TinyMLP())
    # the manifest made to agree with the truncated size: the header no longer covers the file
    _rewrite(directory, lambda m: m["files"]["shared.safetensors"].update(bytes=len(data) - 5))
    with pytest.raises(RoutedFormatError, match="truncated or padded"):
        transfuse.load(directory, module=TinyMLP())
    path.write_bytes(data[:6])
    _rewrite(directory, lambda m: m["files"]["shared.safetensors"].update(bytes=6))
    with pytest.raises(RoutedFormatError, match="no safetensors header"):
        transfuse.load(directory, module=TinyMLP())


def test_manifest_lies_about_shape_dtype_or_tensors(saved_mlp):
    _, directory = saved_mlp
    original = _manifest(directory)
    entry = ("files", "task-000.safetensors", "tensors", "mask.inp.weight")

    def set_spec(**spec):
        def edit(m):
            m[entry[0]][entry[1]][entry[2]][entry[3]].update(spec)

        return edit

    _rewrite(directory, set_spec(shape=[5]))
    with pytest.raises(RoutedFormatError, match=r"mask.inp.weight is U8 \[4\], the manifest says U8 \[5\]"):
        transfuse.load(directory, module=TinyMLP())
    (directory / "manifest.json").write_text(json.dumps(original))
    _rewrite(directory, set_spec(dtype="int8"))
    with pytest.raises(RoutedFormatError, match="the manifest says I8"):
        transfuse.load(directory, module=TinyMLP())
    (directory / "manifest.json").write_text(json.dumps(original))
    _rewrite(directory, lambda m: m["files"]["task-000.safetensors"]["tensors"].pop("rescaler"))
    with pytest.raises(RoutedFormatError, match="disagree on its tensors"):
        transfuse.load(directory, module=TinyMLP())


def _replace_tensor_file(path, tensors):
    from safetensors.torch import save_file

    save_file(tensors, str(path))


def test_files_consistent_with_a_lying_manifest_still_fail_the_method_checks(saved_mlp):
    """A file replaced and the manifest rewritten to match it: the parts' own checks catch the wrong shape."""
    model, directory = saved_mlp
    path = directory / "task-002.safetensors"
    tensors = {k: v.clone() for k, v in model.parts.task_tensors("c").items()}
    tensors["mask.inp.weight"] = torch.zeros(3, dtype=torch.uint8)  # 32 entries need 4 bytes
    _replace_tensor_file(path, tensors)

    def edit(m):
        m["files"]["task-002.safetensors"]["bytes"] = path.stat().st_size
        m["files"]["task-002.safetensors"]["tensors"]["mask.inp.weight"]["shape"] = [3]

    _rewrite(directory, edit)
    with pytest.raises(
        RoutedFormatError, match=r"mask.inp.weight is torch.uint8 \(3,\), expected uint8 \(4,\)"
    ):
        transfuse.load(directory, module=TinyMLP())


def test_a_header_with_gaps_is_refused(saved_mlp):
    _, directory = saved_mlp
    path = directory / "task-000.safetensors"
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    name = next(k for k in header if k != "__metadata__")
    start, stop = header[name]["data_offsets"]
    header[name]["data_offsets"] = [start + 1, stop + 1]
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + length :])
    _rewrite(directory, lambda m: m["files"]["task-000.safetensors"].update(bytes=path.stat().st_size))
    with pytest.raises(RoutedFormatError, match="overlaps or leaves gaps|truncated or padded"):
        transfuse.load(directory, module=TinyMLP())


def test_file_names_in_the_manifest_stay_inside_the_directory(saved_mlp):
    _, directory = saved_mlp
    _rewrite(directory, lambda m: m["files"].update({"../manifest.json": {"bytes": 1}}))
    with pytest.raises(RoutedFormatError, match="not a plain file name"):
        transfuse.load(directory, module=TinyMLP())
