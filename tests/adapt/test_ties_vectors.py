"""AdaMerging++'s TIES-processed task vectors against a plain-Python TIES (trim by sorted ranks, elect, select)."""

from __future__ import annotations

import pytest
import torch

from transfuse.adapt import AdaptParameterError, ties_task_vectors
from transfuse.adapt.ties_vectors import trim_top_k


def _python_trim(values: list[float], density: float) -> list[float]:
    """Keep the k = max(1, int(density*n)) largest |x|, ranking equal magnitudes by index (lower first)."""
    n = len(values)
    if density >= 1:
        return list(values)
    k = max(1, int(density * n))
    ranked = sorted(range(n), key=lambda i: (-abs(values[i]), i))
    keep = set(ranked[:k])
    return [v if i in keep else 0.0 for i, v in enumerate(values)]


def _python_ties(rows: list[list[float]], density: float) -> list[list[float]]:
    trimmed = [_python_trim(r, density) for r in rows]
    sums = [sum(col) for col in zip(*trimmed)]
    plus_majority = sum(s > 0 for s in sums) >= sum(s < 0 for s in sums)
    out = []
    for row in trimmed:
        kept = []
        for v, s in zip(row, sums):
            plus = s > 0 or (s == 0 and plus_majority)
            kept.append(v if (v > 0 if plus else v < 0) else 0.0)
        out.append(kept)
    return out


def test_trim_keeps_exactly_k_entries_and_breaks_ties_by_index():
    x = torch.tensor([3.0, -1.0, 1.0, 1.0, -2.0, 1.0])
    assert trim_top_k(x, 0.5).tolist() == [3.0, -1.0, 0.0, 0.0, -2.0, 0.0]
    assert trim_top_k(x, 0.01).tolist() == [3.0, 0, 0, 0, 0, 0]  # at least one entry
    assert trim_top_k(x, 1.0).tolist() == x.tolist()
    assert trim_top_k(x.reshape(2, 3), 0.5).shape == (2, 3)


def test_zero_sums_take_the_tensors_majority_sign():
    plus = ties_task_vectors(
        {"a": {"t": torch.tensor([1.0, -1.0, 2.0])}, "b": {"t": torch.tensor([-1.0, 1.0, 1.0])}}, 1.0
    )
    assert plus["a"]["t"].tolist() == [1.0, 0.0, 2.0] and plus["b"]["t"].tolist() == [0.0, 1.0, 1.0]
    minus = ties_task_vectors(
        {"a": {"t": torch.tensor([1.0, -2.0])}, "b": {"t": torch.tensor([-1.0, -1.0])}}, 1.0
    )
    assert minus["a"]["t"].tolist() == [0.0, -2.0] and minus["b"]["t"].tolist() == [-1.0, -1.0]


@pytest.mark.parametrize("density", [0.2, 0.5, 0.7, 1.0])
def test_ties_task_vectors_match_a_python_ties(density):
    g = torch.Generator().manual_seed(3)
    # small integers: many equal magnitudes and zero sums, the cases where tie rules matter
    shapes = {"w": (4, 5), "b": (7,), "one": (1,)}
    vectors = {
        task: {n: torch.randint(-3, 4, s, generator=g).float() for n, s in shapes.items()} for task in "xyz"
    }
    vectors["z"].pop("b")  # a tensor only some tasks have: the others count as zero
    before = {t: {n: v.clone() for n, v in vec.items()} for t, vec in vectors.items()}
    out = ties_task_vectors(vectors, density)
    for task, vector in vectors.items():  # the inputs are not modified
        assert all(torch.equal(v, before[task][n]) for n, v in vector.items())
    for name in shapes:
        owners = [t for t in vectors if name in vectors[t]]
        expected = _python_ties([vectors[t][name].reshape(-1).tolist() for t in owners], density)
        for task, row in zip(owners, expected):
            assert out[task][name].reshape(-1).tolist() == row, (task, name)
            assert out[task][name].shape == shapes[name]
    assert "b" not in out["z"]


def test_bad_density_is_named():
    for density in (0.0, -0.1, 1.01, True, "0.2"):
        with pytest.raises(AdaptParameterError, match=r"ties_density must be a number in \(0, 1\]"):
            ties_task_vectors({"a": {"t": torch.ones(2)}}, density)
