"""scipy.stats.weightedtau (the ranking score used to compare transferability metrics with fine-tuned accuracy)
reproduced by a hand loop over pairs, so its definition is pinned down before the ranking code relies on it."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy.stats import weightedtau


def _weighted_tau_one_way(a, b) -> float:
    """Vigna's weighted tau with hyperbolic weights 1/(r+1), additive pair weights, ranks by decreasing
    lexicographic (a, b); ties in a (or b) count as neither concordant nor discordant."""
    n = len(a)
    order = sorted(range(n), key=lambda i: (a[i], b[i]), reverse=True)
    rank = [0] * n
    for r, i in enumerate(order):
        rank[i] = r
    num = den_a = den_b = 0.0
    for i, j in itertools.combinations(range(n), 2):
        w = 1.0 / (rank[i] + 1) + 1.0 / (rank[j] + 1)
        sa = int(a[i] > a[j]) - int(a[i] < a[j])
        sb = int(b[i] > b[j]) - int(b[i] < b[j])
        num += w * sa * sb
        den_a += w * (sa != 0)
        den_b += w * (sb != 0)
    return num / math.sqrt(den_a * den_b)


def hand_weighted_tau(x, y) -> float:
    """scipy's default (rank=True): the mean of the (x, y)- and (y, x)-ranked values."""
    return (_weighted_tau_one_way(x, y) + _weighted_tau_one_way(y, x)) / 2


def test_hand_made_ranking():
    # Five models: metric scores vs fine-tuned accuracy. The best two are swapped, the rest agree.
    scores = [0.9, 0.8, 0.5, 0.3, 0.1]
    accuracy = [0.85, 0.88, 0.70, 0.60, 0.40]
    expected = hand_weighted_tau(scores, accuracy)
    assert weightedtau(scores, accuracy).statistic == pytest.approx(expected, abs=1e-12)
    assert 0 < expected < 1  # one discordant pair, at the top, where the weights are largest
    # A swap at the bottom costs less than the same swap at the top.
    bottom = hand_weighted_tau([0.9, 0.8, 0.5, 0.3, 0.1], [0.88, 0.85, 0.70, 0.40, 0.60])
    assert bottom > expected
    assert weightedtau(scores, scores).statistic == pytest.approx(1.0)
    assert weightedtau(scores, scores[::-1]).statistic == pytest.approx(-1.0)


def test_random_rankings_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(5):
        x = rng.standard_normal(9)
        y = x + rng.standard_normal(9)
        assert weightedtau(x, y).statistic == pytest.approx(hand_weighted_tau(x, y), abs=1e-12)
    x = [1, 2, 2, 3, 4, 4, 5]
    y = [2, 1, 3, 3, 5, 4, 4]
    assert weightedtau(x, y).statistic == pytest.approx(hand_weighted_tau(x, y), abs=1e-12)
