"""Duplicate removal and seeded class-balanced splitting."""

from __future__ import annotations

import random

import pytest

from transfuse.data import Example, SplitSizes, TaskDataError, dedup_examples, normalize_text
from transfuse.data.splits import (
    balanced_subset,
    even_shares,
    proportional_counts,
    seeded_order,
    split_balanced,
    split_stratified,
)


def make_examples(per_class: list[int], prefix: str = "text") -> list[Example]:
    return [Example(f"{prefix} {c} {i}", c) for c, n in enumerate(per_class) for i in range(n)]


def assert_disjoint(parts: dict[str, list[Example]]) -> None:
    seen: dict[str, str] = {}
    for split, examples in parts.items():
        for e in examples:
            assert e.text not in seen, f"{e.text!r} in {seen.get(e.text)} and {split}"
            seen[e.text] = split


def test_normalize_text_collapses_all_whitespace():
    assert normalize_text("  a\tb\n\nc \u00a0 d  ") == "a b c d"
    assert normalize_text("\n \t") == ""


def test_dedup_keeps_one_copy_and_drops_conflicting_texts():
    raw = [
        ("hello  world", 0),
        ("hello world", 0),  # same text after normalization, same label: one copy kept
        ("both", 0),
        ("both", 1),  # two labels: dropped with all copies
        ("both ", 1),
        ("   ", 1),  # empty
        ("only one", 1),
    ]
    kept, report = dedup_examples(raw)
    assert kept == [Example("hello world", 0), Example("only one", 1)]
    assert report.as_dict() == {
        "total": 7,
        "empty": 1,
        "duplicates": 1,
        "conflicting_texts": 1,
        "conflicting_examples": 3,
        "kept": 2,
    }


def test_even_shares_and_proportional_counts():
    assert even_shares(500, [10, 10, 10, 10, 10, 10]) == [84, 84, 83, 83, 83, 83]
    # leftover units go to the classes with most examples
    assert even_shares(10, [1, 100, 50]) == [3, 4, 3]
    assert proportional_counts(74, [63, 62, 250]) == [13, 12, 49]  # 12.43, 12.23, 49.33
    assert sum(proportional_counts(7, [1, 1, 1])) == 7
    assert proportional_counts(5, [0, 0]) == [0, 0]


def test_split_balanced_caps_and_balances():
    examples = make_examples([5000, 3000, 900, 2000])
    parts = split_balanced(examples, 4, sizes=SplitSizes(train=2000, validation=500, test=500), seed=0)
    assert {k: len(v) for k, v in parts.items()} == {"train": 2000, "validation": 500, "test": 500}
    for split, n in (("train", 500), ("validation", 125), ("test", 125)):
        counts = [sum(e.label == c for e in parts[split]) for c in range(4)]
        assert counts == [n] * 4
    assert_disjoint(parts)


def test_split_balanced_small_class_is_split_in_the_same_ratio():
    # class 1 has 60 examples, fewer than its shares 1000 + 250 + 250: divided 4:1:1 like the shares
    examples = make_examples([3000, 60])
    parts = split_balanced(examples, 2, sizes=SplitSizes(train=2000, validation=500, test=500))
    counts = {s: [sum(e.label == c for e in parts[s]) for c in range(2)] for s in parts}
    assert counts["train"][0] == 1000 and counts["validation"][0] == 250 and counts["test"][0] == 250
    assert counts["train"][1] + counts["validation"][1] + counts["test"][1] == 60
    assert (counts["train"][1], counts["validation"][1], counts["test"][1]) == (40, 10, 10)
    assert_disjoint(parts)


def test_split_balanced_is_deterministic_and_independent_of_input_order():
    examples = make_examples([700, 400, 300])
    shuffled = examples[:]
    random.Random(123).shuffle(shuffled)
    a = split_balanced(examples, 3, sizes=SplitSizes(300, 60, 60), seed=5)
    b = split_balanced(shuffled, 3, sizes=SplitSizes(300, 60, 60), seed=5)
    assert a == b
    c = split_balanced(examples, 3, sizes=SplitSizes(300, 60, 60), seed=6)
    assert c["test"] != a["test"]


def test_split_is_stored_shuffled_not_grouped_by_class():
    parts = split_balanced(make_examples([5000, 3000, 1000, 400]), 4, sizes=SplitSizes(400, 100, 100))
    labels = [e.label for e in parts["train"]]
    changes = sum(a != b for a, b in zip(labels, labels[1:]))
    assert changes > len(labels) / 2  # a grouped order would change label 3 times


def test_test_split_does_not_depend_on_train_size():
    examples = make_examples([900, 900])
    small = split_balanced(examples, 2, sizes=SplitSizes(train=100, validation=50, test=50))
    large = split_balanced(examples, 2, sizes=SplitSizes(train=1000, validation=50, test=50))
    assert small["test"] == large["test"] and small["validation"] == large["validation"]


def test_split_rejects_duplicates_and_bad_labels():
    with pytest.raises(TaskDataError, match="twice"):
        split_balanced([Example("a", 0), Example("a", 1), Example("b", 1)], 2)
    with pytest.raises(TaskDataError, match="outside"):
        split_balanced([Example("a", 0), Example("b", 2)], 2)
    with pytest.raises(TaskDataError):
        SplitSizes(train=0)


def test_split_stratified_keeps_everything_in_ratio():
    examples = make_examples([100, 50, 3, 2])
    parts = split_stratified(examples, 4, fractions=(0.8, 0.1, 0.1), seed=0)
    assert sum(len(v) for v in parts.values()) == 155
    counts = {s: [sum(e.label == c for e in parts[s]) for c in range(4)] for s in parts}
    assert counts["test"][:2] == [10, 5] and counts["validation"][:2] == [10, 5]
    assert counts["test"][2] == 1 and counts["validation"][2] == 1 and counts["train"][2] == 1
    assert counts["test"][3] == 1 and counts["train"][3] == 1
    assert_disjoint(parts)
    with pytest.raises(TaskDataError):
        split_stratified(examples, 4, fractions=(0.9, 0.1, 0.0))


def test_seeded_order_and_balanced_subset():
    examples = make_examples([10, 10, 3])
    ordered = seeded_order(examples, 0)
    assert ordered == seeded_order(list(reversed(examples)), 0)
    subset = balanced_subset(ordered, 3, 12)
    counts = [sum(e.label == c for e in subset) for c in range(3)]
    assert counts == [5, 4, 3] or counts == [4, 5, 3]
    assert [e for e in ordered if e in subset] == subset  # order kept
    assert set(balanced_subset(ordered, 3, 6)) <= set(subset)  # nested
    assert balanced_subset(ordered, 3, 100) == ordered
