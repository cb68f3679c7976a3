"""LEEP, N-LEEP and NCE against hand computations."""

from __future__ import annotations

import math

import numpy as np
import pytest

from transfuse.select import leep, nce, nleep

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _entropy(labels) -> float:
    _, counts = np.unique(labels, return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log(p)).sum())


def test_leep_zero_for_perfect_one_to_one_predictions():
    labels = np.array([0, 1, 2, 2, 1, 0, 2, 1])
    mapping = np.array([4, 0, 2])  # target class -> source class, among 6 source classes
    probs = np.zeros((len(labels), 6))
    probs[np.arange(len(labels)), mapping[labels]] = 1.0
    assert leep(probs, labels) == pytest.approx(0.0, abs=1e-12)


def test_leep_is_minus_label_entropy_for_uniform_predictions():
    labels = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 2])
    probs = np.full((len(labels), 7), 1 / 7)
    assert leep(probs, labels) == pytest.approx(-_entropy(labels), abs=1e-12)


def test_leep_hand_loop():
    probs = np.array(
        [[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4], [0.5, 0.25, 0.25], [0.05, 0.05, 0.9]]
    )
    labels = np.array([1, 0, 0, 1, 0])
    n, zs = probs.shape
    joint = {(y, z): 0.0 for y in (0, 1) for z in range(zs)}
    for i in range(n):
        for z in range(zs):
            joint[labels[i], z] += probs[i, z] / n
    total = 0.0
    for i in range(n):
        eep = 0.0
        for z in range(zs):
            pz = joint[0, z] + joint[1, z]
            eep += joint[labels[i], z] / pz * probs[i, z]
        total += math.log(eep)
    assert leep(probs, labels) == pytest.approx(total / n, abs=1e-12)
    assert leep(probs, labels) <= 0


def test_leep_drops_unused_source_classes():
    probs = np.array([[0.6, 0.4, 0.0], [0.3, 0.7, 0.0], [0.9, 0.1, 0.0]])
    labels = [0, 1, 0]
    assert leep(probs, labels) == pytest.approx(leep(probs[:, :2], labels), abs=1e-12)


def test_nce_hand_table():
    # Joint counts (source z rows, target y columns): z=a: y0 3, y1 1;  z=b: y0 0, y1 2;  z=c: y0 1, y1 1.
    source = ["a"] * 4 + ["b"] * 2 + ["c"] * 2
    target = [0, 0, 0, 1, 1, 1, 0, 1]
    n = 8
    expected = (
        3 / n * math.log(3 / 4)
        + 1 / n * math.log(1 / 4)
        + 2 / n * math.log(1.0)
        + 2 * (1 / n * math.log(1 / 2))
    )
    assert nce(source, target) == pytest.approx(expected, abs=1e-12)


def test_nce_extremes():
    target = np.array([0, 1, 2, 0, 1, 2, 2, 2])
    assert nce(target + 10, target) == pytest.approx(0.0, abs=1e-12)  # source determines target
    assert nce(np.zeros(8, dtype=int), target) == pytest.approx(-_entropy(target), abs=1e-12)


def _blobs(n_per_class=40, c=3, d=6, spread=8.0, seed=0):
    rng = np.random.default_rng(seed)
    centers = spread * rng.standard_normal((c, d))
    labels = np.repeat(np.arange(c), n_per_class)
    return centers[labels] + rng.standard_normal((len(labels), d)), labels


def test_nleep_near_zero_on_separated_classes_and_lower_on_random_labels():
    f, labels = _blobs()
    good = nleep(f, labels)
    assert -0.05 < good <= 0
    shuffled = np.random.default_rng(1).permutation(labels)
    assert nleep(f, shuffled) < good - 0.5


def test_nleep_deterministic_for_a_seed():
    f, labels = _blobs(spread=1.0, seed=2)
    assert nleep(f, labels, seed=3) == nleep(f, labels, seed=3)
    assert nleep(f, labels, n_components=4) <= 0
