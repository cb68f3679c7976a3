"""Task affinity: each matrix against a slow loop, the interference bookkeeping by hand, a pool end to end."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch

from transfuse import merge_state_dicts
from transfuse.eval import evaluate
from transfuse.models import Encoder
from transfuse.select.affinity import (
    AffinityError,
    cosine_matrix,
    interference_matrix,
    predictiveness,
    sign_conflict_matrix,
    task_vectors,
    top_magnitude_mask,
    upper_pairs,
)
from transfuse.select.pool_affinity import measure_affinity, render_affinity_markdown, write_affinity


def _vectors(k: int = 3, n: int = 50, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"m{i}": torch.randn(n, generator=g) for i in range(k)}


def test_cosine_matches_a_loop_and_zero_vectors_give_zero():
    vectors = _vectors()
    vectors["zero"] = torch.zeros(50)
    got = cosine_matrix(vectors)
    values = list(vectors.values())
    for i, j in itertools.product(range(4), repeat=2):
        a, b = values[i].tolist(), values[j].tolist()
        dot = sum(x * y for x, y in zip(a, b))
        na, nb = math.sqrt(sum(x * x for x in a)), math.sqrt(sum(y * y for y in b))
        expected = dot / (na * nb) if na and nb else 0.0
        assert got[i, j] == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("density", [0.2, 0.5, 1.0])
def test_sign_conflict_matches_a_loop(density):
    vectors = _vectors(k=3, n=40)
    vectors["m1"][:5] = 0.0  # zeros never count
    got = sign_conflict_matrix(vectors, density=density)
    values = list(vectors.values())

    def kept(v):
        top = set(_slow_top_k(v.tolist(), density))
        return [n in top and x != 0 for n, x in enumerate(v.tolist())]

    for i, j in itertools.combinations(range(3), 2):
        ki, kj = kept(values[i]), kept(values[j])
        both = [n for n in range(40) if ki[n] and kj[n]]
        differ = sum((values[i][n] > 0) != (values[j][n] > 0) for n in both)
        expected = differ / len(both) if both else 0.0
        assert got[i, j] == pytest.approx(expected) and got[j, i] == got[i, j]
    assert np.all(np.diag(got) == 0)


def _slow_top_k(values: list[float], density: float) -> list[int]:
    """TIES' trim by a full sort: the k = max(1, int(density n)) largest |x|, equal |x| by lowest index."""
    k = len(values) if density >= 1 else max(1, int(density * len(values)))
    return sorted(sorted(range(len(values)), key=lambda n: (-abs(values[n]), n))[:k])


@pytest.mark.parametrize("density", [0.001, 0.1, 0.2, 0.25, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("seed", range(4))
def test_top_magnitude_mask_matches_a_sorted_loop(density, seed):
    g = torch.Generator().manual_seed(seed)
    # few distinct magnitudes and both signs, so the threshold falls inside a tied group
    v = (
        torch.randint(0, 4, (203,), generator=g) * torch.randint(0, 2, (203,), generator=g).mul(2).sub(1)
    ).float()
    mask = top_magnitude_mask(v, density)
    assert mask.dtype == torch.bool and mask.shape == v.shape
    assert torch.nonzero(mask).reshape(-1).tolist() == _slow_top_k(v.tolist(), density)


def test_top_magnitude_mask_keeps_what_the_ties_method_keeps():
    # One model over a zero base: TIES' sign election and mean leave the trimmed task vector itself.
    g = torch.Generator().manual_seed(1)
    delta = torch.randint(1, 5, (12, 17), generator=g).float() * torch.randn(12, 17, generator=g).sign()
    for density in (0.05, 0.2, 0.5):
        merged = merge_state_dicts({"w": torch.zeros(12, 17)}, [{"w": delta}], "ties", density=density)["w"]
        assert torch.equal(merged.reshape(-1) != 0, top_magnitude_mask(delta.reshape(-1), density))


def test_sign_conflict_extremes():
    v = torch.tensor([1.0, -2.0, 3.0, -4.0])
    assert sign_conflict_matrix({"a": v, "b": 2 * v}, density=1.0)[0, 1] == 0.0
    assert sign_conflict_matrix({"a": v, "b": -v}, density=1.0)[0, 1] == 1.0
    with pytest.raises(AffinityError, match="density"):
        sign_conflict_matrix({"a": v, "b": v}, density=0.0)


def test_interference_bookkeeping_by_hand():
    names = ["a", "b", "c"]
    experts = {"a": 0.9, "b": 0.8, "c": 0.7}
    merged_acc = {
        ("a", "b"): {"a": 0.8, "b": 0.8},
        ("a", "c"): {"a": 0.5, "c": 0.6},
        ("b", "c"): {"b": 0.9, "c": 0.7},
    }
    matrix, per_pair = interference_matrix(
        names, lambda x, y: (x, y), lambda model, on: merged_acc[model], experts
    )
    assert matrix[0, 1] == pytest.approx((0.1 + 0.0) / 2)
    assert matrix[0, 2] == pytest.approx((0.4 + 0.1) / 2)
    assert matrix[1, 2] == pytest.approx((-0.1 + 0.0) / 2)  # a pair can help: negative interference
    assert np.allclose(matrix, matrix.T) and np.all(np.diag(matrix) == 0)
    assert per_pair["a+c"] == {"a": 0.5, "c": 0.6}
    assert upper_pairs(matrix).tolist() == pytest.approx([0.05, 0.25, -0.05])


def test_predictiveness_on_monotone_pairs():
    interference = np.array([[0, 1, 2, 3], [1, 0, 4, 5], [2, 4, 0, 6], [3, 5, 6, 0]], dtype=float)
    assert predictiveness(interference * 2 + 1, interference)["spearman"] == pytest.approx(1.0)
    result = predictiveness(-interference, interference)
    assert result["spearman"] == pytest.approx(-1.0) and result["kendall"] == pytest.approx(-1.0)
    assert result["pairs"] == 6


def test_task_vector_errors():
    base = {"w": torch.zeros(3), "steps": torch.tensor(1)}
    with pytest.raises(AffinityError, match="at least two"):
        task_vectors(base, {"a": {"w": torch.ones(3)}})
    with pytest.raises(AffinityError, match="lacks"):
        task_vectors(base, {"a": {"w": torch.ones(3)}, "b": {}})
    with pytest.raises(AffinityError, match="shaped"):
        task_vectors(base, {"a": {"w": torch.ones(3)}, "b": {"w": torch.ones(4)}})
    vectors = task_vectors(base, {"a": {"w": torch.ones(3)}, "b": {"w": torch.full((3,), 2.0)}})
    assert vectors["b"].tolist() == [2.0, 2.0, 2.0]  # integer tensors are not part of a task vector


def test_pool_affinity_end_to_end(tmp_path, tiny, train_tiny_experts, one_torch_thread):
    backbone = tiny.build_tiny_backbone(tmp_path / "backbone")
    colour, animal = tiny.tiny_suite()
    third = tiny.tiny_task("size", ["big", "very"], ["small", "a"], 3, ["large", "little"])
    suite = [colour, animal, third]
    experts = train_tiny_experts(suite, tmp_path / "cache", backbone)
    base = Encoder.load(backbone).state_dict()
    result = measure_affinity(suite, experts, base, lambda_=0.5, max_examples=20, backbone_dir=backbone)
    assert result["tasks"] == ["colour", "animal", "size"]
    interference = np.array(result["matrices"]["interference"])
    # re-derive one pair: merge with task arithmetic, evaluate through the two experts' heads
    states = {n: Encoder.load(e.path).state_dict() for n, e in experts.items()}
    merged = merge_state_dicts(base, [states["colour"], states["size"]], "task_arithmetic", **{"lambda": 0.5})
    heads = {n: experts[n].path for n in ("colour", "size")}
    acc = evaluate(merged, heads, [colour, third], max_examples=20, backbone_dir=backbone)
    own = {
        n: evaluate(experts[n].path, {n: experts[n].path}, [t], max_examples=20)[n]
        for n, t in (("colour", colour), ("size", third))
    }
    expected = ((own["colour"] - acc["colour"]) + (own["size"] - acc["size"])) / 2
    assert interference[0, 2] == pytest.approx(expected, abs=1e-9)
    cosine = np.array(result["matrices"]["cosine"])
    assert np.allclose(np.diag(cosine), 1.0) and np.allclose(cosine, cosine.T)
    written = write_affinity(result, tmp_path / "out")
    assert [p.name for p in written] == ["affinity.json", "affinity.md", "affinity.png"]
    assert (tmp_path / "out" / "affinity.png").read_bytes()[:4] == b"\x89PNG"
    assert "Measured interference" in render_affinity_markdown(result)


def test_cli_affinity_on_two_text8_tasks(tmp_path, text8_fixtures):
    from typer.testing import CliRunner

    from transfuse.cli import app

    backbone = text8_fixtures.build_text8_backbone(tmp_path / "backbone", words=500)
    args = [
        "affinity",
        "text8",
        "--tasks",
        "bing_sentiment,wordnet_pos",
        "--steps",
        "3",
        "--test-examples",
        "20",
    ]
    args += [
        "--backbone",
        str(backbone),
        "--cache-dir",
        str(tmp_path / "cache"),
        "--out",
        str(tmp_path / "out"),
    ]
    result = CliRunner().invoke(app, [*args, "--no-progress"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "affinity.json").read_text())
    assert report["tasks"] == ["bing_sentiment", "wordnet_pos"]
    assert report["predicts_interference"]["cosine"]["pairs"] == 1  # too few pairs for a correlation
    assert report["predicts_interference"]["cosine"]["spearman"] is None
    one = CliRunner().invoke(
        app, ["affinity", "text8", "--tasks", "bing_sentiment", "--backbone", str(backbone)]
    )
    assert one.exit_code == 2 and "at least two tasks" in one.output
