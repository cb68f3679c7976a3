"""Input validation shared by every metric, label remapping and label-permutation invariance."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import transfuse.select as select
from transfuse.errors import TransfuseError
from transfuse.select import SelectionInputError, leep, logme, nce, tmi
from transfuse.select.rank import FEATURE_METRICS as FEATURE_METRIC_NAMES
from transfuse.select.rank import METRICS

FEATURE_METRICS = [getattr(select, name) for name in FEATURE_METRIC_NAMES]


def test_the_metric_names_are_the_functions_of_the_package():
    functions = {name for name in select.__all__ if name != "SelectionInputError"}
    assert set(METRICS) == functions and len(METRICS) == len(functions)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _problem(n=90, d=6, c=3, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % c
    rng.shuffle(labels)
    f = 2.0 * rng.standard_normal((n, d))
    f[:, :c] += 2.0 * np.eye(c)[labels]
    return f, labels


def _softmax(x):
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _all_scores(f, labels):
    probs = _softmax(np.asarray(f)[:, :5])
    if isinstance(f, torch.Tensor):
        probs = torch.from_numpy(probs)
    scores = {m.__name__: m(f, labels) for m in FEATURE_METRICS}
    scores["leep"] = leep(probs, labels)
    scores["nce"] = nce(
        probs.argmax(axis=1) if isinstance(probs, np.ndarray) else probs.argmax(dim=1), labels
    )
    return scores


@pytest.mark.parametrize("metric", FEATURE_METRICS, ids=lambda m: m.__name__)
def test_nan_and_inf_features(metric):
    f, labels = _problem()
    for bad in (np.nan, np.inf):
        g = f.copy()
        g[5, 2] = bad
        with pytest.raises(SelectionInputError, match="NaN/Inf.*drop or impute"):
            metric(g, labels)


@pytest.mark.parametrize("metric", FEATURE_METRICS, ids=lambda m: m.__name__)
def test_length_mismatch_and_single_class(metric):
    f, labels = _problem()
    with pytest.raises(SelectionInputError, match="89 labels for 90 samples"):
        metric(f, labels[:-1])
    with pytest.raises(SelectionInputError, match="at least two classes"):
        metric(f, np.zeros(len(f), dtype=int))


def _check_label_errors(metric, source, labels):
    """The errors every metric shares: NaN/Inf labels, lengths that differ either way, a single class."""
    for bad in (np.nan, np.inf):
        with pytest.raises(SelectionInputError, match="NaN/Inf labels"):
            metric(source, np.where(np.arange(len(labels)) == 5, bad, labels.astype(float)))
    with pytest.raises(SelectionInputError, match="89 labels for 90 samples"):
        metric(source, labels[:-1])
    with pytest.raises(SelectionInputError, match="90 labels for 89 samples"):
        metric(source[:-1], labels)
    with pytest.raises(SelectionInputError, match="at least two classes"):
        metric(source, np.zeros(len(labels), dtype=int))
    with pytest.raises(SelectionInputError, match="at least two classes"):
        metric(torch.from_numpy(source), torch.full((len(labels),), 4))


def test_leep_nan_inf_length_mismatch_and_single_class():
    f, labels = _problem()
    probs = _softmax(f)
    for bad in (np.nan, np.inf):
        p = probs.copy()
        p[5, 2] = bad
        with pytest.raises(SelectionInputError, match="source_probs: .*NaN/Inf.*drop or impute"):
            leep(p, labels)
    _check_label_errors(leep, probs, labels)


def test_nce_nan_inf_length_mismatch_and_single_class():
    f, labels = _problem()
    source = _softmax(f).argmax(axis=1)
    for bad in (np.nan, np.inf):
        z = source.astype(float)
        z[5] = bad
        with pytest.raises(SelectionInputError, match="source_labels: NaN/Inf"):
            nce(z, labels)
    _check_label_errors(nce, source, labels)
    assert nce(np.zeros(len(f), dtype=int), labels) <= 0  # one *source* class is fine: NCE = -H(Y)


def test_other_bad_inputs():
    f, labels = _problem()
    with pytest.raises(SelectionInputError, match="2-D"):
        logme(f[:, 0], labels)
    with pytest.raises(SelectionInputError, match="more samples than classes"):
        logme(f[:3], [0, 1, 2])
    with pytest.raises(SelectionInputError, match="regression"):
        logme(f, labels + 0.5)
    with pytest.raises(SelectionInputError, match="one label per sample"):
        logme(f, np.eye(3)[labels])
    with pytest.raises(SelectionInputError, match="real number"):
        logme(f.astype(str), labels)
    probs = _softmax(f)
    with pytest.raises(SelectionInputError, match="softmax"):
        leep(f, labels)  # logits, not probabilities
    with pytest.raises(SelectionInputError, match="sum to 1"):
        leep(probs * 0.5, labels)
    with pytest.raises(SelectionInputError, match="argmax"):
        nce(probs, labels)
    with pytest.raises(SelectionInputError, match="k-th neighbour"):
        tmi(f, labels, k=40)
    assert issubclass(SelectionInputError, ValueError)
    assert issubclass(SelectionInputError, TransfuseError)


def test_non_contiguous_and_string_labels_are_remapped():
    f, labels = _problem()
    expected = _all_scores(f, labels)
    for remapped in (np.array([3, 7, 9])[labels], np.array(["cat", "dog", "emu"])[labels]):
        got = _all_scores(f, remapped)
        for name, value in expected.items():
            assert got[name] == pytest.approx(value, rel=1e-12, abs=1e-12), name


def test_label_permutation_invariance():
    f, labels = _problem(seed=1)
    expected = _all_scores(f, labels)
    permuted = np.array([2, 0, 1])[labels]  # rename the classes
    got = _all_scores(f, permuted)
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, rel=1e-9, abs=1e-12), name


def test_torch_inputs_match_numpy():
    f, labels = _problem(seed=2)
    expected = _all_scores(f, labels)
    got = _all_scores(torch.from_numpy(f), torch.from_numpy(labels))
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, rel=1e-12, abs=1e-12), name
    assert logme(f.tolist(), labels.tolist()) == pytest.approx(expected["logme"], rel=1e-12)
