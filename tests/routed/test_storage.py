"""Bytes of the shared and per-task parts, against closed forms and the files save_routed writes."""

from __future__ import annotations

import json
import struct

import pytest

from transfuse.routed.emr import emr_merge
from transfuse.routed.storage import emr_storage_estimate, routed_storage
from transfuse.routed.store import save_routed

from .conftest import TinyMLP


def _data_bytes(path):
    """Tensor bytes of a safetensors file: its size less the 8-byte length and the JSON header."""
    with path.open("rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        json.loads(f.read(length))
    return path.stat().st_size - 8 - length


def test_estimate_for_a_minilm_sized_model():
    n, k = 22_700_000, 8
    report = emr_storage_estimate(n, k)
    assert report.shared_bytes == 4 * n + 4 * n  # float32 base + float32 tau_uni
    assert set(report.task_bytes.values()) == {2_837_500 + 4}  # 1 bit per parameter + the rescaler
    assert report.full_experts_bytes == k * 4 * n
    assert report.total_bytes == 8 * n + k * 2_837_504
    assert report.ratio_to_full_experts == pytest.approx((8 * n + k * 2_837_504) / (32 * n))
    half = emr_storage_estimate(n, k, bytes_per_param=2)
    assert half.shared_bytes == 6 * n and half.full_experts_bytes == 16 * n
    with pytest.raises(ValueError):
        emr_storage_estimate(0, 8)


def test_report_of_a_model_matches_its_saved_files(mlp_experts, tmp_path):
    base, experts = mlp_experts
    model = emr_merge(base, experts, TinyMLP())
    report = routed_storage(model)
    directory = save_routed(model, tmp_path / "r")
    shared = _data_bytes(directory / "base.safetensors") + _data_bytes(directory / "shared.safetensors")
    assert report.shared_bytes == shared
    for i, task in enumerate(model.tasks):
        assert report.task_bytes[task] == _data_bytes(directory / f"task-{i:03d}.safetensors")
    # routed: inp.weight 32 + inp.bias 8 + out.weight 24 entries -> 4 + 1 + 3 mask bytes + 4 rescaler bytes
    assert report.task_bytes["a"] == 12
    base_bytes = sum(t.numel() * t.element_size() for t in base.values())
    assert report.full_experts_bytes == 3 * base_bytes
