"""Expert and multi-task fine-tuning on a tiny random BERT: learning, saving, reloading, caching, resuming."""

from __future__ import annotations

import json

import pytest
import torch

from transfuse.models import Encoder, TaskHead, load_heads
from transfuse.train import experts as experts_module
from transfuse.train.experts import (
    ExpertRecipe,
    TrainingError,
    load_expert,
    recipe_hash,
    train_expert,
    train_experts,
    train_multitask,
)

transformers = pytest.importorskip("transformers")

FAST = dict(steps=30, batch_size=8, encoder_lr=3e-3, head_lr=3e-2, progress=False)


@pytest.fixture
def capture(monkeypatch):
    """Record the in-memory encoder and heads at the moment they are saved."""
    seen: dict[str, list] = {"encoders": [], "heads": []}
    save_encoder, save_head = Encoder.save, TaskHead.save

    def encoder_save(self, path):
        seen["encoders"].append(self)
        return save_encoder(self, path)

    def head_save(self, directory):
        seen["heads"].append(self)
        return save_head(self, directory)

    monkeypatch.setattr(Encoder, "save", encoder_save)
    monkeypatch.setattr(TaskHead, "save", head_save)
    return seen


def test_train_expert_learns_saves_and_reloads(tiny_backbone, suite, tmp_path, capture):
    task = suite["colour"]
    expert = train_expert(task, backbone_dir=tiny_backbone, out_dir=tmp_path / "colour", **FAST)

    losses = expert.info["loss_curve"]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
    assert expert.test_accuracy["colour"] >= 0.8

    files = {p.name for p in expert.path.iterdir()}
    assert {"config.json", "model.safetensors", "head.safetensors", "head.json", "expert.json"} <= files
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary dirs left
    info = json.loads((expert.path / "expert.json").read_text())
    assert info["tasks"] == ["colour"] and info["seed"] == 0
    assert info["recipe"]["steps"] == 30 and info["recipe"]["optimizer"] == "adamw"
    assert info["train_seconds"] > 0 and 0 <= info["test_accuracy"]["colour"] <= 1

    # The directory is a normal HF model: AutoModel gives exactly the trained encoder's outputs.
    trained = capture["encoders"][0].model.eval()
    reloaded = transformers.AutoModel.from_pretrained(str(expert.path)).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(expert.path))
    batch = tokenizer(["the red cat", "a very big blue wolf and it"], padding=True, return_tensors="pt")
    with torch.no_grad():
        a = trained(**batch).last_hidden_state
        b = reloaded(**batch).last_hidden_state
    assert torch.equal(a, b)
    head = load_heads(expert.path)["colour"]
    assert head.label_names == ["warm", "cool"]
    assert torch.equal(head.linear.weight, capture["heads"][0].linear.weight)
    assert torch.equal(head.linear.bias, capture["heads"][0].linear.bias)

    # ... and re-scoring the reloaded expert reproduces the accuracy recorded at training time.
    from transfuse.eval import evaluate

    assert evaluate(expert.path, expert.path, [task])["colour"] == pytest.approx(
        expert.test_accuracy["colour"], abs=1e-6
    )
    assert load_expert(expert.path).info == expert.info


def test_training_is_seeded(tiny_backbone, suite, tmp_path):
    task = suite["animal"]
    fast = {**FAST, "steps": 8}
    one = train_expert(task, backbone_dir=tiny_backbone, out_dir=tmp_path / "a", **fast)
    two = train_expert(task, backbone_dir=tiny_backbone, out_dir=tmp_path / "b", **fast)
    other = train_expert(task, backbone_dir=tiny_backbone, out_dir=tmp_path / "c", seed=1, **fast)
    sa, sb, sc = (e.encoder_state_dict() for e in (one, two, other))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    assert one.info["loss_curve"] == two.info["loss_curve"]
    # the unused pooler is never updated: its task vector is exactly zero
    base = Encoder.load(tiny_backbone).state_dict()
    assert torch.equal(sa["pooler.dense.weight"], base["pooler.dense.weight"])


def test_cache_skips_done_experts_and_retrains_a_changed_recipe(tiny_backbone, suite, tmp_path, monkeypatch):
    fast = {**FAST, "steps": 6}
    first = train_experts(suite, tmp_path, backbone_dir=tiny_backbone, **fast)
    assert list(first) == ["colour", "animal"]
    for name, expert in first.items():
        assert expert.path.parent == tmp_path / "experts" / name
        assert expert.path.name == expert.recipe_hash[:16]

    def no_training(*args, **kwargs):
        raise AssertionError("a cached expert was retrained")

    real_fit = experts_module._fit
    monkeypatch.setattr(experts_module, "_fit", no_training)
    again = train_experts(suite, tmp_path, backbone_dir=tiny_backbone, **fast)
    assert {n: e.path for n, e in again.items()} == {n: e.path for n, e in first.items()}
    assert {n: e.info for n, e in again.items()} == {n: e.info for n, e in first.items()}

    # a changed recipe trains again, beside the old experts
    calls = []
    monkeypatch.setattr(experts_module, "_fit", lambda *a, **k: calls.append(1) or real_fit(*a, **k))
    changed = train_experts(suite, tmp_path, backbone_dir=tiny_backbone, **{**fast, "head_lr": 5e-3})
    assert len(calls) == 2
    assert all(changed[n].path != first[n].path and first[n].path.is_dir() for n in suite.names)
    assert changed["colour"].info["recipe"]["head_lr"] == 5e-3

    # force retrains in place
    train_experts(suite.select(["colour"]), tmp_path, backbone_dir=tiny_backbone, force=True, **fast)
    assert len(calls) == 3


def test_an_interrupted_expert_leaves_nothing_and_is_resumed(tiny_backbone, suite, tmp_path, monkeypatch):
    task = suite["colour"]
    out = tmp_path / "expert"
    fast = {**FAST, "steps": 4}

    def crash(self, directory):
        raise RuntimeError("disk full")

    monkeypatch.setattr(TaskHead, "save", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        train_expert(task, backbone_dir=tiny_backbone, out_dir=out, **fast)
    assert list(tmp_path.iterdir()) == []  # neither the expert nor its temporary directory
    monkeypatch.undo()

    done = train_expert(task, backbone_dir=tiny_backbone, out_dir=out, **fast)
    assert (out / "expert.json").is_file()
    # another recipe into the same out_dir replaces the expert
    replaced = train_expert(task, backbone_dir=tiny_backbone, out_dir=out, **{**fast, "steps": 5})
    assert replaced.recipe_hash != done.recipe_hash
    assert load_expert(out).info["recipe"]["steps"] == 5
    assert [p.name for p in tmp_path.iterdir()] == ["expert"]


def test_multitask_model(tiny_backbone, suite, tmp_path):
    model = train_multitask(
        suite,
        tmp_path,
        backbone_dir=tiny_backbone,
        steps_per_task=20,
        **{k: v for k, v in FAST.items() if k != "steps"},
    )
    assert model.kind == "multitask" and model.tasks == suite.names
    assert model.info["recipe"]["steps"] == 40  # the budget of both experts together
    assert model.path.parent == tmp_path / "multitask"
    heads = model.load_heads()
    assert set(heads) == set(suite.names)
    assert (model.path / "heads" / "animal" / "head.safetensors").is_file()
    assert set(model.test_accuracy) == set(suite.names)
    losses = model.info["loss_curve"]
    assert sum(losses[-6:]) < sum(losses[:6])
    again = train_multitask(
        suite,
        tmp_path,
        backbone_dir=tiny_backbone,
        steps_per_task=20,
        **{k: v for k, v in FAST.items() if k != "steps"},
    )
    assert again.info == model.info


def test_batch_stream_passes_over_every_example():
    stream = experts_module._BatchStream(12, 4, seed=0)
    first_pass = [i for _ in range(3) for i in next(stream)]
    assert sorted(first_pass) == list(range(12))
    assert sorted(i for _ in range(3) for i in next(stream)) == list(range(12))
    assert [next(experts_module._BatchStream(12, 4, seed=0)) for _ in range(1)] == [first_pass[:4]]


def test_recipe_validation_and_hash(tiny_backbone, suite):
    with pytest.raises(TrainingError, match="steps"):
        ExpertRecipe(steps=0)
    with pytest.raises(TrainingError, match="precision"):
        ExpertRecipe(precision="fp8")
    task = suite["colour"]
    h = recipe_hash("expert", ExpertRecipe(), [task], tiny_backbone)
    assert h == recipe_hash("expert", ExpertRecipe(), [task], tiny_backbone)
    assert h != recipe_hash("expert", ExpertRecipe(seed=1), [task], tiny_backbone)
    assert h != recipe_hash("expert", ExpertRecipe(), [task.with_max_train(10)], tiny_backbone)
    assert h != recipe_hash("multitask", ExpertRecipe(), [task], tiny_backbone)
