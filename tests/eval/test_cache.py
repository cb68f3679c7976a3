"""The evaluation cache: keys change with anything that changes an evaluation, and only with that."""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from transfuse.data.task import Example, Task
from transfuse.eval.cache import EvaluationCache, examples_digest, tensors_digest


def _task(texts: list[str]) -> Task:
    examples = [Example(t, i % 2) for i, t in enumerate(texts)]
    return Task("t", ["a", "b"], train=examples, validation=examples, test=examples)


def test_tensors_digest_is_sha256_of_names_dtypes_shapes_and_bytes():
    state = {"b": torch.tensor([1.0, 2.0]), "a": torch.tensor([[3]], dtype=torch.int64)}
    expected = hashlib.sha256()
    for name in ("a", "b"):  # sorted
        t = state[name]
        expected.update(f"{name}\x00{t.dtype}\x00{tuple(t.shape)}\x00".encode() + t.numpy().tobytes())
    assert tensors_digest(state) == expected.hexdigest()


def test_tensors_digest_sees_one_changed_value_a_dtype_and_a_name():
    state = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
    same = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3).clone()}
    assert tensors_digest(state) == tensors_digest(same)
    nudged = {"w": state["w"].clone()}
    nudged["w"][1, 2] = torch.nextafter(nudged["w"][1, 2], torch.tensor(100.0))
    assert tensors_digest(nudged) != tensors_digest(state)
    assert tensors_digest({"w": state["w"].double()}) != tensors_digest(state)
    assert tensors_digest({"v": state["w"]}) != tensors_digest(state)
    assert tensors_digest({"w": state["w"].reshape(3, 2)}) != tensors_digest(state)
    assert tensors_digest({"w": state["w"].t()}) != tensors_digest(state)  # non-contiguous: its values


def test_key_depends_on_examples_split_limit_and_length(tmp_path):
    cache = EvaluationCache(tmp_path)
    task = _task(["x y", "y z", "z x"])

    def key(split: str = "test", **kw):
        options = {"max_examples": None, "max_length": 48, "device": "cpu", **kw}
        return cache.key("enc", "heads", [task], split, **options)

    base = key()
    assert key() == base
    assert key(split="validation") != base
    assert key(max_examples=2) != base
    assert key(max_length=32) != base
    assert cache.key("enc2", "heads", [task], "test", max_examples=None, max_length=48, device="cpu") != base
    assert (
        cache.key(
            "enc",
            "heads",
            [_task(["x y", "y z", "z y"])],
            "test",
            max_examples=None,
            max_length=48,
            device="cpu",
        )
        != base
    )
    # a limit at or beyond the split's size reads the same examples: same digest of the examples
    assert examples_digest(task, "test", 3) == examples_digest(task, "test", None)


def test_put_get_round_trip_and_counts(tmp_path):
    cache = EvaluationCache(tmp_path)
    assert cache.get("ab" * 32) is None and cache.misses == 1
    cache.put("ab" * 32, {"t": 0.5}, {"t": np.array([True, False])})
    accuracy, correct = cache.get("ab" * 32)
    assert accuracy == {"t": 0.5} and correct["t"].tolist() == [True, False] and correct["t"].dtype == bool
    assert cache.hits == 1
    assert not list(tmp_path.rglob(".*"))  # no temporary files left


def test_merge_key_changes_with_every_input(tmp_path):
    cache = EvaluationCache(tmp_path)

    def key(**kw):
        args = {
            "method": "ties",
            "params": {"density": 0.2},
            "seed": 0,
            "base_digest": "b",
            "model_digests": ["m1", "m2"],
            "device": "cpu",
            **kw,
        }
        return cache.merge_key(**args)

    base = key()
    assert key() == base and key(device="cpu") == base
    for change in (
        {"method": "dare_ties"},
        {"params": {"density": 0.3}},
        {"seed": 1},
        {"base_digest": "c"},
        {"model_digests": ["m2", "m1"]},
        {"device": "cuda"},
    ):
        assert key(**change) != base, change
    assert cache.get_merge(base) is None
    cache.put_merge(base, "abc")
    assert cache.get_merge(base) == "abc"
