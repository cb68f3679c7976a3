"""Duplicate removal and seeded, class-balanced train / validation / test splitting.

Everything here is deterministic without a random-number generator: the order of the examples of a class is
the order of ``sha256(f"select\\x00{seed}\\x00{text}")``, so the same inputs and seed give the same splits on every
Python version and platform, whatever order the inputs arrive in, and adding one example to a source moves
no other example between splits.

Duplicates are removed *before* splitting (:func:`dedup_examples`), so no text can appear in two splits.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from transfuse.data.task import Example, TaskDataError

SPLITS = ("train", "validation", "test")


def normalize_text(text: str) -> str:
    """Collapse every run of whitespace (spaces, tabs, newlines) to one space and strip both ends."""
    return " ".join(text.split())


@dataclass(frozen=True)
class DedupReport:
    """What :func:`dedup_examples` removed."""

    total: int  #: examples given
    empty: int  #: examples whose text is empty after whitespace normalization
    duplicates: int  #: repeated (text, label) pairs removed (one copy kept)
    conflicting_texts: int  #: distinct texts seen with two or more labels, removed entirely
    conflicting_examples: int  #: examples removed because their text is conflicting
    kept: int  #: unique examples left

    def as_dict(self) -> dict[str, int]:
        return {
            "total": self.total,
            "empty": self.empty,
            "duplicates": self.duplicates,
            "conflicting_texts": self.conflicting_texts,
            "conflicting_examples": self.conflicting_examples,
            "kept": self.kept,
        }


def dedup_examples(examples: Iterable[tuple[str, int]]) -> tuple[list[Example], DedupReport]:
    """Normalize whitespace, drop empty texts, keep one copy of each text, and drop texts with several labels.

    Two texts are the same when they are equal after :func:`normalize_text` (case and punctuation count).
    A text that occurs with two different labels is ambiguous and is removed with all its copies.
    Returns the unique examples sorted by (label, text) and a :class:`DedupReport`.
    """
    labels_of: dict[str, set[int]] = {}
    copies: dict[str, int] = {}
    total = empty = 0
    for text, label in examples:
        total += 1
        norm = normalize_text(text)
        if not norm:
            empty += 1
            continue
        labels_of.setdefault(norm, set()).add(int(label))
        copies[norm] = copies.get(norm, 0) + 1
    kept: list[Example] = []
    conflicting_texts = conflicting_examples = 0
    for text, labels in labels_of.items():
        if len(labels) > 1:
            conflicting_texts += 1
            conflicting_examples += copies[text]
        else:
            kept.append(Example(text, next(iter(labels))))
    kept.sort(key=lambda e: (e.label, e.text))
    duplicates = total - empty - conflicting_examples - len(kept)
    report = DedupReport(total, empty, duplicates, conflicting_texts, conflicting_examples, len(kept))
    return kept, report


def order_key(text: str, seed: int, purpose: str = "select") -> bytes:
    """The seeded sort key of a text: ``sha256(f"{purpose}\\x00{seed}\\x00{text}")``.

    Two purposes give two independent orders: ``"select"`` decides which examples of a class go to which
    split, ``"shuffle"`` orders the examples of a split (with one key for both, a split sorted by the key
    would come out grouped by class, since each class contributes a different range of keys).
    """
    return hashlib.sha256(f"{purpose}\x00{seed}\x00{text}".encode()).digest()


def seeded_order(examples: Iterable[Example], seed: int, purpose: str = "select") -> list[Example]:
    """The examples in the seeded pseudo-random order of :func:`order_key` (ties broken by label)."""
    return sorted(examples, key=lambda e: (order_key(e.text, seed, purpose), e.label))


@dataclass(frozen=True)
class SplitSizes:
    """Upper bounds on the size of each split (the whole split, all classes together)."""

    train: int = 2000
    validation: int = 500
    test: int = 500

    def __post_init__(self) -> None:
        for split in SPLITS:
            value = getattr(self, split)
            if not isinstance(value, int) or value < 0:
                raise TaskDataError(f"split size {split}={value!r} must be an integer >= 0")
        if self.train == 0 or self.test == 0:
            raise TaskDataError("the train and test splits must be allowed at least one example")

    def as_dict(self) -> dict[str, int]:
        return {split: getattr(self, split) for split in SPLITS}


def _by_class(examples: Iterable[Example], num_classes: int) -> list[list[Example]]:
    pools: list[list[Example]] = [[] for _ in range(num_classes)]
    for example in examples:
        if not 0 <= example.label < num_classes:
            raise TaskDataError(f"label id {example.label} is outside 0..{num_classes - 1}")
        pools[example.label].append(example)
    return pools


def even_shares(budget: int, available: Sequence[int]) -> list[int]:
    """Divide `budget` into ``len(available)`` near-equal integer shares.

    Every class gets ``budget // K``; the ``budget % K`` leftover units go to the classes with the most
    examples available (ties: the lower label id), so they land where they can be used.
    """
    k = len(available)
    base, extra = divmod(budget, k)
    shares = [base] * k
    for c in sorted(range(k), key=lambda c: (-available[c], c))[:extra]:
        shares[c] += 1
    return shares


def proportional_counts(n: int, weights: Sequence[int]) -> list[int]:
    """Split `n` items in proportion to `weights` (largest remainder; ties go to the earlier weight)."""
    total = sum(weights)
    if total == 0:
        return [0] * len(weights)
    exact = [n * w / total for w in weights]
    counts = [math.floor(x) for x in exact]
    order = sorted(range(len(weights)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    return counts


def split_balanced(
    examples: Iterable[Example], num_classes: int, *, sizes: SplitSizes | None = None, seed: int = 0
) -> dict[str, list[Example]]:
    """Class-balanced train / validation / test splits of unique examples, capped by `sizes`.

    Each split's size is divided evenly among the classes (:func:`even_shares`). A class with at least the
    sum of its three shares gives exactly its shares; a smaller class gives all its examples, divided among
    the splits in the same proportions (:func:`proportional_counts`, test first on ties). The shortfall of a
    small class is *not* made up by the other classes: the splits stay as balanced as the source allows
    and may then be smaller than `sizes`.

    Within a class the examples are taken in :func:`seeded_order`: test first, then validation, then
    train, so the test set does not depend on the train size. Each split is returned shuffled (``seeded_order(..., purpose="shuffle")``).
    The examples must be unique texts (see :func:`dedup_examples`); a repeated text raises.
    """
    sizes = sizes or SplitSizes()
    pools = [seeded_order(pool, seed) for pool in _by_class(examples, num_classes)]
    _check_unique(pools)
    available = [len(pool) for pool in pools]
    # Order of taking within a class: test, validation, train.
    taking = ("test", "validation", "train")
    shares = {split: even_shares(getattr(sizes, split), available) for split in taking}
    out: dict[str, list[Example]] = {split: [] for split in SPLITS}
    for c, pool in enumerate(pools):
        wanted = [shares[split][c] for split in taking]
        counts = wanted if len(pool) >= sum(wanted) else proportional_counts(len(pool), wanted)
        start = 0
        for split, count in zip(taking, counts):
            out[split].extend(pool[start : start + count])
            start += count
    return {split: seeded_order(out[split], seed, "shuffle") for split in SPLITS}


def split_stratified(
    examples: Iterable[Example],
    num_classes: int,
    *,
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
    seed: int = 0,
) -> dict[str, list[Example]]:
    """Stratified train / validation / test splits by `fractions`, keeping every example.

    Used for a user's own task file without a split column. Each class is divided in the given proportions
    (largest remainder, test first on ties) after :func:`seeded_order`; every class with at least two
    examples gets at least one test example and, when it has at least three and validation is wanted,
    one validation example.
    """
    if len(fractions) != 3 or any(f < 0 for f in fractions) or fractions[0] <= 0 or fractions[2] <= 0:
        raise TaskDataError(f"fractions {fractions!r} must be (train > 0, validation >= 0, test > 0)")
    pools = [seeded_order(pool, seed) for pool in _by_class(examples, num_classes)]
    _check_unique(pools)
    # Integer weights in the order of taking (test, validation, train) so ties favour evaluation.
    weights = [round(f * 1_000_000) for f in (fractions[2], fractions[1], fractions[0])]
    out: dict[str, list[Example]] = {split: [] for split in SPLITS}
    for pool in pools:
        n = len(pool)
        test, val, train = proportional_counts(n, weights)
        if n >= 2 and test == 0:
            test, train = 1, train - 1
        if n >= 3 and weights[1] > 0 and val == 0:
            val, train = 1, train - 1
        out["test"].extend(pool[:test])
        out["validation"].extend(pool[test : test + val])
        out["train"].extend(pool[test + val :])
    return {split: seeded_order(out[split], seed, "shuffle") for split in SPLITS}


def _check_unique(pools: list[list[Example]]) -> None:
    seen: set[str] = set()
    for pool in pools:
        for example in pool:
            if example.text in seen:
                raise TaskDataError(
                    f"text {example.text[:60]!r} occurs twice: remove duplicates first (dedup_examples)"
                )
            seen.add(example.text)


def balanced_subset(examples: Sequence[Example], num_classes: int, limit: int) -> list[Example]:
    """At most `limit` examples, as class-balanced as possible, keeping the given order within each class.

    Classes take turns (label 0, 1, ...), each contributing its next example, until `limit` is reached or
    every class is exhausted. The result keeps the relative order of `examples`.
    """
    if limit < 0:
        raise TaskDataError(f"limit {limit} must be >= 0")
    if limit >= len(examples):
        return list(examples)
    indices: list[list[int]] = [[] for _ in range(num_classes)]
    for i, example in enumerate(examples):
        if not 0 <= example.label < num_classes:
            raise TaskDataError(f"label id {example.label} is outside 0..{num_classes - 1}")
        indices[example.label].append(i)
    shares = [0] * num_classes
    remaining = limit
    while remaining > 0:
        progressed = False
        for c in range(num_classes):
            if remaining > 0 and shares[c] < len(indices[c]):
                shares[c] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            break
    chosen = sorted(i for c in range(num_classes) for i in indices[c][: shares[c]])
    return [examples[i] for i in chosen]
