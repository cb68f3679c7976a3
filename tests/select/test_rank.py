"""Ranking candidate encoders for a target task: order, scores, names, errors, and the CLI."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from typer.testing import CliRunner

from transfuse.cli import app
from transfuse.errors import CheckpointError
from transfuse.models import Encoder
from transfuse.select import logme, nce
from transfuse.select.rank import RankingError, candidate_name, rank_sources


@pytest.fixture(scope="module")
def pool(tmp_path_factory, tiny, train_tiny_experts, one_torch_thread):
    root = tmp_path_factory.mktemp("rank")
    backbone = tiny.build_tiny_backbone(root / "backbone")
    other = tiny.build_tiny_backbone(root / "other_random", seed=5)
    suite = tiny.tiny_suite()
    experts = train_tiny_experts(suite, root / "cache", backbone)
    return root, backbone, other, suite, experts


def test_ranking_is_sorted_by_the_metric_on_the_targets_features(pool):
    _, backbone, other, suite, experts = pool
    target = suite["colour"]
    candidates = {"random": other, "pretrained": backbone, "animal expert": experts["animal"].path}
    ranked = rank_sources(target, candidates, "logme", max_examples=40)
    assert [r.rank for r in ranked] == [1, 2, 3]
    assert [r.score for r in ranked] == sorted((r.score for r in ranked), reverse=True)
    labels = torch.tensor(target.labels("train")[:40])
    for r in ranked:
        features = Encoder.load(candidates[r.name]).encode(target.texts("train")[:40])
        assert r.score == pytest.approx(float(logme(features, labels)), rel=1e-9)
        assert r.num_parameters == sum(p.numel() for p in Encoder.load(candidates[r.name]).model.parameters())


def test_head_metric_uses_the_experts_own_classifier(pool):
    _, backbone, _, suite, experts = pool
    target = suite["colour"]
    ranked = rank_sources(target, [experts["animal"].path, experts["colour"].path], "nce", max_examples=40)
    assert {r.name for r in ranked} == {"animal expert", "colour expert"}
    head = experts["colour"].head()
    features = Encoder.load(experts["colour"].path).encode(target.texts("train")[:40])
    with torch.inference_mode():
        expected = nce(head(features).argmax(1), torch.tensor(target.labels("train")[:40]))
    assert next(r for r in ranked if r.name == "colour expert").score == pytest.approx(float(expected))


def test_errors_before_any_work(pool, tmp_path):
    _, backbone, _, suite, _ = pool
    with pytest.raises(RankingError, match="unknown metric"):
        rank_sources(suite["colour"], [backbone], "accuracy")
    with pytest.raises(RankingError, match="no candidates"):
        rank_sources(suite["colour"], [], "logme")
    with pytest.raises(RankingError, match="exactly one"):
        rank_sources(suite["colour"], [backbone], "leep")
    with pytest.raises(CheckpointError, match="config.json"):
        rank_sources(suite["colour"], [backbone, tmp_path], "logme")


def test_candidate_names(pool):
    _, backbone, _, _, experts = pool
    assert candidate_name(experts["animal"].path) == "animal expert"
    assert candidate_name(backbone) == "backbone"


def test_cli_rank_on_a_user_task_file(pool, tmp_path):
    _, backbone, other, suite, experts = pool
    rows = [{"text": e.text, "label": suite["animal"].label_names[e.label]} for e in suite["animal"].train]
    task_file = tmp_path / "pets.jsonl"
    task_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "ranking.json"
    result = CliRunner().invoke(
        app,
        [
            "rank",
            "--target",
            str(task_file),
            "--candidates",
            f"{backbone},{other}",
            "--candidates",
            str(experts["animal"].path),
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    payload = json.loads(out.read_text())
    assert payload["metric"] == "logme" and len(payload["ranking"]) == 3
    assert [r["rank"] for r in payload["ranking"]] == [1, 2, 3]
    assert "animal expert" in result.output


def test_cli_rank_on_a_csv_task_file(pool, tmp_path):
    """A CSV target (columns in any order, a split column, label names, quoting) is read as the same task, so the
    CLI's scores equal rank_sources on the in-memory task."""
    _, backbone, other, suite, _ = pool
    task = suite["animal"]
    task_file = tmp_path / "pets.csv"
    with task_file.open("w", newline="") as handle:
        writer = csv.writer(handle, quoting=csv.QUOTE_NONNUMERIC)
        writer.writerow(["split", "label", "text"])
        for split in ("train", "test"):
            writer.writerows((split, task.label_names[e.label], e.text) for e in task.split(split))
    out = tmp_path / "ranking.json"
    result = CliRunner().invoke(
        app,
        ["rank", "--target", str(task_file), "--candidates", f"{backbone},{other}", "--max-examples", "40"]
        + ["--out", str(out)],
    )
    assert result.exit_code == 0, result.output
    payload = json.loads(out.read_text())
    assert payload["target"] == "pets" and payload["metric"] == "logme"
    expected = rank_sources(task, [backbone, other], "logme", max_examples=40)
    assert [(r["name"], r["rank"]) for r in payload["ranking"]] == [(r.name, r.rank) for r in expected]
    for got, want in zip(payload["ranking"], expected):
        assert got["score"] == pytest.approx(want.score, rel=1e-9)
