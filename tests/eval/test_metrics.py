"""Merge scores and the paired bootstrap on constructed examples."""

from __future__ import annotations

import math

import numpy as np
import pytest

from transfuse.eval.metrics import (
    gain_retained,
    mean_accuracy,
    normalized_accuracy,
    paired_bootstrap,
    per_task_gain,
    per_task_normalized,
)

MERGED = {"a": 0.8, "b": 0.45, "c": 0.7}
EXPERTS = {"a": 1.0, "b": 0.9, "c": 0.7}
PRETRAINED = {"a": 0.6, "b": 0.3, "c": 0.5}


def test_mean_accuracy_weighs_tasks_equally():
    assert mean_accuracy(MERGED) == pytest.approx((0.8 + 0.45 + 0.7) / 3)


def test_normalized_accuracy():
    assert per_task_normalized(MERGED, EXPERTS) == pytest.approx({"a": 0.8, "b": 0.5, "c": 1.0})
    assert normalized_accuracy(MERGED, EXPERTS) == pytest.approx((0.8 + 0.5 + 1.0) / 3)


def test_gain_retained():
    # a: (0.8-0.6)/(1.0-0.6) = 0.5;  b: (0.45-0.3)/(0.9-0.3) = 0.25;  c: (0.7-0.5)/(0.7-0.5) = 1
    assert per_task_gain(MERGED, EXPERTS, PRETRAINED) == pytest.approx({"a": 0.5, "b": 0.25, "c": 1.0})
    assert gain_retained(MERGED, EXPERTS, PRETRAINED) == pytest.approx((0.5 + 0.25 + 1.0) / 3)
    # below the pretrained floor is negative
    assert gain_retained({"a": 0.5}, EXPERTS, PRETRAINED) == pytest.approx(-0.25)


def test_gain_retained_leaves_out_tasks_the_expert_did_not_improve():
    pretrained = {"a": 0.6, "b": 0.95, "c": 0.7}  # b: expert below pretrained, c: equal
    assert per_task_gain(MERGED, EXPERTS, pretrained) == {"a": pytest.approx(0.5), "b": None, "c": None}
    assert gain_retained(MERGED, EXPERTS, pretrained) == pytest.approx(0.5)
    assert math.isnan(gain_retained({"c": 0.7}, EXPERTS, pretrained))


def test_missing_reference_task_is_an_error():
    with pytest.raises(KeyError, match="d"):
        normalized_accuracy({"d": 0.5}, EXPERTS)
    with pytest.raises(ValueError):
        mean_accuracy({})


def test_paired_bootstrap_constructed_case():
    # A right on all 200 items, B wrong on exactly 20 of them: difference 0.1.
    a = np.ones(200, dtype=bool)
    b = a.copy()
    b[::10] = False
    result = paired_bootstrap(a, b, n=2000, seed=0)
    assert result.difference == pytest.approx(0.1)
    # each resample's difference is Binomial(200, 0.1) / 200: sd = sqrt(0.1 * 0.9 / 200) = 0.0212
    assert result.low == pytest.approx(0.1 - 1.96 * 0.0212, abs=0.012)
    assert result.high == pytest.approx(0.1 + 1.96 * 0.0212, abs=0.012)
    assert 0 < result.low < 0.1 < result.high
    assert result.p_value < 0.01
    assert "+10.00 points" in str(result)
    # deterministic given the seed; swapping A and B negates everything
    assert paired_bootstrap(a, b, n=2000, seed=0) == result
    swapped = paired_bootstrap(b, a, n=2000, seed=0)
    assert swapped.difference == pytest.approx(-0.1)
    assert swapped.low == pytest.approx(-result.high) and swapped.high == pytest.approx(-result.low)


def test_paired_bootstrap_identical_results():
    x = np.array([True, False, True, True, False])
    result = paired_bootstrap(x, x, n=100)
    assert (result.difference, result.low, result.high, result.p_value) == (0.0, 0.0, 0.0, 1.0)


def test_paired_bootstrap_per_task_is_stratified_and_equal_weight():
    # task t1: 100 items, A - B = 0.1; task t2: 10 items, A - B = 0 -> mean of per-task differences 0.05
    # (pooling the 110 items would give 10/110).
    a = {"t1": np.ones(100, bool), "t2": np.ones(10, bool)}
    b = {"t1": np.r_[np.zeros(10, bool), np.ones(90, bool)], "t2": np.ones(10, bool)}
    result = paired_bootstrap(a, b, n=500, seed=1)
    assert result.difference == pytest.approx(0.05)
    assert 0 < result.low <= 0.05 <= result.high
    with pytest.raises(KeyError):
        paired_bootstrap(a, {"t1": b["t1"]})
    with pytest.raises(ValueError):
        paired_bootstrap(np.ones(3, bool), np.ones(4, bool))
    with pytest.raises(TypeError):
        paired_bootstrap(a, np.ones(3, bool))
