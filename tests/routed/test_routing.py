"""Routing per example: a mixed-task batch gives what each task's examples give alone."""

from __future__ import annotations

import pytest
import torch

from transfuse.routed.emr import emr_merge
from transfuse.routed.errors import (
    MissingTaskIdError,
    RoutedOutputError,
    TaskIdsMismatchError,
    UnknownTaskError,
)
from transfuse.routed.model import RoutedModel

from .conftest import TinyMLP


def _alone(model, x, ids, **kwargs):
    """Each example run through its own task's expert weights, one task at a time."""
    rows = {}
    for task in dict.fromkeys(ids):
        idx = [i for i, t in enumerate(ids) if t == task]
        out = model(x[idx], task_ids=task, **kwargs)
        rows.update(zip(idx, out))
    return torch.stack([rows[i] for i in range(len(ids))])


def test_mixed_batch_equals_single_task_batches_mlp(mlp_experts):
    base, experts = mlp_experts
    model = emr_merge(base, experts, TinyMLP())
    x = torch.randn(7, 4, generator=torch.Generator().manual_seed(5))
    ids = ["b", "a", "c", "a", "b", "b", "c"]
    mixed = model(x, task_ids=ids, scale=2.0)
    assert torch.equal(mixed, _alone(model, x, ids, scale=2.0))
    # and each row is task i's model, built by hand as a plain module
    for task in "abc":
        plain = TinyMLP()
        plain.load_state_dict({**base, **model.task_parameters(task)})
        rows = [i for i, t in enumerate(ids) if t == task]
        torch.testing.assert_close(mixed[rows], plain(x[rows], scale=2.0), rtol=1e-6, atol=1e-6)
    # the tasks differ, so routing mattered
    assert not torch.allclose(model(x, task_ids="a"), model(x, task_ids="b"))


def test_mixed_batch_equals_single_task_batches_bert(bert_experts):
    module, base, experts = bert_experts
    model = emr_merge(base, experts, module)
    g = torch.Generator().manual_seed(6)
    input_ids = torch.randint(0, 40, (5, 9), generator=g)
    attention_mask = torch.ones(5, 9, dtype=torch.long)
    attention_mask[1, 6:] = 0
    attention_mask[3, 4:] = 0
    ids = ["nli", "sst", "sst", "nli", "sst"]
    with torch.no_grad():
        mixed = model(input_ids=input_ids, attention_mask=attention_mask, task_ids=ids)
        for task in ("sst", "nli"):
            rows = [i for i, t in enumerate(ids) if t == task]
            alone = model(input_ids=input_ids[rows], attention_mask=attention_mask[rows], task_ids=task)
            assert torch.equal(mixed.last_hidden_state[rows], alone.last_hidden_state)
            assert torch.equal(mixed.pooler_output[rows], alone.pooler_output)
    assert type(mixed).__name__ == "BaseModelOutputWithPoolingAndCrossAttentions"


def test_missing_and_unknown_task_ids_are_named(mlp_experts):
    base, experts = mlp_experts
    model = emr_merge(base, experts, TinyMLP())
    x = torch.randn(3, 4)
    with pytest.raises(MissingTaskIdError, match="no router"):
        model(x)
    with pytest.raises(UnknownTaskError, match="'z'.*tasks"):
        model(x, task_ids="z")
    with pytest.raises(UnknownTaskError, match="'z'"):
        model(x, task_ids=["a", "z", "a"])
    with pytest.raises(TaskIdsMismatchError, match="no tensor input has 2 rows"):
        model(x, task_ids=["a", "b"])
    with pytest.raises(TaskIdsMismatchError, match="empty"):
        model(x, task_ids=[])


def test_a_router_picks_tasks_when_no_ids_are_given(mlp_experts):
    base, experts = mlp_experts
    merged = emr_merge(base, experts, TinyMLP())
    calls = []

    def router(x, **kwargs):
        calls.append(kwargs)
        return ["a" if row[0] > 0 else "c" for row in x]

    model = RoutedModel(merged.module, merged.parts, router=router)
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(7))
    want = model(x, task_ids=router(x))
    calls.clear()
    assert torch.equal(model(x, scale=1.0), want) and calls == [{"scale": 1.0}]


def test_outputs_not_per_example_are_refused(mlp_experts):
    base, experts = mlp_experts

    class Summed(TinyMLP):
        def forward(self, x):
            return super().forward(x).sum()

    model = emr_merge(base, experts, Summed())
    with pytest.raises(RoutedOutputError, match="one row per example"):
        model(torch.randn(4, 4), task_ids=["a", "b", "a", "b"])
    assert model(torch.randn(4, 4), task_ids="a").dim() == 0  # one task per call is fine


def test_only_cache_tasks_are_kept(mlp_experts):
    base, experts = mlp_experts
    model = emr_merge(base, experts, TinyMLP(), cache_tasks=2)
    x = torch.randn(3, 4)
    model(x, task_ids=["a", "b", "c"])
    assert list(model._cache) == ["b", "c"]
    first = model.task_parameters("b")
    assert model.task_parameters("b") is first and list(model._cache) == ["c", "b"]
    model.double()
    assert not model._cache and model.task_parameters("a")["inp.weight"].dtype == torch.float64
    none = emr_merge(base, experts, TinyMLP(), cache_tasks=0)
    none(x, task_ids=["a", "b", "c"])
    assert not none._cache
