"""AdaMerging: the merged parameters, the entropy objective and its gradient, the optimization on a toy
problem, and the named errors."""

from __future__ import annotations

import math

import pytest
import torch

from transfuse.adapt import (
    AdaptParameterError,
    CoefficientLayout,
    EmptyBatchesError,
    NonFiniteObjectiveError,
    TaskVectorMerge,
    TaskVectorMismatchError,
    UnknownTaskError,
    adamerge,
    entropy_objective,
    merge_parameters,
    objective_gradient,
    prediction_entropy,
)
from transfuse.errors import ShapeMismatchError, TransfuseError


def _tiny(dtype=torch.float64, seed=0):
    """A 2-layer MLP state dict (plus a tensor no task changes), two task vectors and per-task heads."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, dtype=dtype) * scale

    base = {"l0.weight": r(5, 4), "l0.bias": r(5), "l1.weight": r(3, 5), "l1.bias": r(3), "frozen": r(3)}
    vectors = {
        "a": {"l0.weight": r(5, 4, scale=0.5), "l0.bias": r(5, scale=0.5), "l1.weight": r(3, 5, scale=0.5)},
        "b": {"l0.weight": r(5, 4, scale=0.5), "l1.weight": r(3, 5, scale=0.5), "l1.bias": r(3, scale=0.5)},
    }
    heads = {"a": r(2, 3), "b": r(4, 3)}

    def forward(p, task, x):
        h = torch.tanh(x @ p["l0.weight"].T + p["l0.bias"])
        h = torch.tanh(h @ p["l1.weight"].T + p["l1.bias"] + p["frozen"])
        return h @ heads[task].T

    batches = {"a": r(7, 4), "b": r(6, 4)}
    return base, vectors, forward, batches


def _hand_merge(base, vectors, coefficient):
    """base + sum over tasks of coefficient(task, name) * tau, entry by entry in Python."""
    out = {}
    for name, value in base.items():
        flat = value.reshape(-1).tolist()
        for task, vector in vectors.items():
            if name in vector:
                c = coefficient(task, name)
                flat = [x + c * d for x, d in zip(flat, vector[name].reshape(-1).tolist())]
        out[name] = torch.tensor(flat, dtype=value.dtype).reshape(value.shape)
    return out


def _hand_entropy(logits):
    """mean over rows of -sum p log p with p = exp(z) / sum exp(z), row by row in Python."""
    total = 0.0
    for row in logits.tolist():
        m = max(row)
        e = [math.exp(z - m) for z in row]
        s = sum(e)
        total += -sum((x / s) * math.log(x / s) for x in e)
    return total / logits.shape[0]


def test_prediction_entropy_matches_known_values():
    logits = torch.tensor(
        [[0.0, 0.0, 0.0, 0.0], [1000.0, 0.0, 0.0, 0.0], [math.log(3.0), 0.0, -1e9, -1e9]], dtype=torch.float64
    )
    h = prediction_entropy(logits)
    # uniform over 4: log 4; a one-hot: 0; p = (3/4, 1/4): -(3/4 log 3/4 + 1/4 log 1/4)
    expected = [math.log(4), 0.0, -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))]
    assert h.tolist() == pytest.approx(expected, abs=1e-12)


def test_entropy_objective_sums_the_tasks_mean_entropies():
    g = torch.Generator().manual_seed(1)
    za, zb = torch.randn(5, 3, generator=g), torch.randn(4, 6, generator=g)
    value = entropy_objective({"a": za, "b": zb})
    assert float(value) == pytest.approx(_hand_entropy(za) + _hand_entropy(zb), rel=1e-6)
    assert float(entropy_objective([za])) == pytest.approx(_hand_entropy(za), rel=1e-6)
    with pytest.raises(AdaptParameterError, match="at least one task"):
        entropy_objective({})
    with pytest.raises(AdaptParameterError, match=r"logits must be \[batch, classes\]"):
        entropy_objective([torch.zeros(3)])
    with pytest.raises(AdaptParameterError, match="at least one row"):
        entropy_objective([torch.zeros(0, 3)])


@pytest.mark.parametrize("granularity", ["task", "layer", "block"])
def test_merged_parameters_match_a_hand_loop(granularity):
    base, vectors, _, _ = _tiny()
    layout = CoefficientLayout.build({t: list(v) for t, v in vectors.items()}, granularity)
    coefficients = torch.linspace(0.1, 0.9, len(layout), dtype=torch.float64)
    merged = merge_parameters(base, vectors, layout, coefficients)
    expected = _hand_merge(base, vectors, lambda t, n: float(coefficients[layout.index(t, n)]))
    assert set(merged) == set(base)
    for name in base:
        torch.testing.assert_close(merged[name], expected[name], rtol=0, atol=1e-12)
    assert merged["frozen"] is base["frozen"]  # in no task vector: passed through
    with pytest.raises(AdaptParameterError, match="coefficients must have shape"):
        merge_parameters(base, vectors, layout, coefficients[:-1])


@pytest.mark.parametrize("granularity", ["layer", "block", "task"])
def test_gradient_of_the_objective_matches_central_differences(granularity):
    base, vectors, forward, batches = _tiny()
    layout = CoefficientLayout.build({t: list(v) for t, v in vectors.items()}, granularity)
    coefficients = torch.linspace(0.2, 0.8, len(layout), dtype=torch.float64)
    value, grad = objective_gradient(TaskVectorMerge(base, vectors, layout), forward, batches, coefficients)

    def objective(c):  # a hand merge and a hand entropy: nothing from the code under test but the layout
        merged = _hand_merge(base, vectors, lambda t, n: float(c[layout.index(t, n)]))
        return sum(_hand_entropy(forward(merged, t, x)) for t, x in batches.items())

    assert value == pytest.approx(objective(coefficients), rel=1e-10)
    eps = 1e-6
    for j in range(len(layout)):
        step = torch.zeros_like(coefficients)
        step[j] = eps
        fd = (objective(coefficients + step) - objective(coefficients - step)) / (2 * eps)
        assert float(grad[j]) == pytest.approx(fd, rel=1e-6, abs=1e-9), layout.names[j]


def test_adamerging_lowers_the_entropy_without_losing_accuracy(toy):
    batches = {t: [toy.test_x[t]] for t in toy.heads}
    for granularity in ("task", "layer"):
        result = adamerge(
            toy.base, toy.vectors, toy.forward, batches, granularity=granularity, steps=40, lr=5e-2
        )
        layout = result.layout
        at_init = merge_parameters(toy.base, toy.vectors, layout, torch.full((len(layout),), 0.3))
        learned = result.merged_state_dict()
        with torch.no_grad():
            entropy_init = sum(
                float(entropy_objective([toy.forward(at_init, t, toy.test_x[t])])) for t in toy.heads
            )
            entropy_learned = sum(
                float(entropy_objective([toy.forward(learned, t, toy.test_x[t])])) for t in toy.heads
            )
        assert entropy_learned < 0.8 * entropy_init, granularity
        assert toy.accuracy(learned) >= toy.accuracy(at_init), granularity
        assert result.steps == 40 and len(result.entropy) == 40
        assert sum(result.entropy[-10:]) < sum(result.entropy[:10])
        assert bool(((result.coefficients >= 0) & (result.coefficients <= 1)).all())
        assert not torch.equal(result.coefficients, torch.full_like(result.coefficients, 0.3))


def test_the_result_reports_coefficients_by_task_and_name(toy):
    batches = {t: [toy.test_x[t]] for t in toy.heads}
    result = adamerge(toy.base, toy.vectors, toy.forward, batches, granularity="block", steps=3, lr=0.1)
    assert result.granularity == "block"
    named = result.named_coefficients()
    assert list(named) == ["a/block 0", "a/block 1", "b/block 0", "b/block 1"]
    by_task = result.coefficients_by_task()
    assert by_task["b"]["layers.1.weight"] == named["b/block 1"] == result.coefficient("b", "layers.1.bias")
    # three Adam steps of lr 0.1 from 0.3 move each coefficient by at most 0.3 (|Adam step| <= lr)
    assert all(abs(v - 0.3) <= 0.3 + 1e-6 for v in named.values())
    merged = result.merged_state_dict()
    assert all(merged[n].dtype == toy.base[n].dtype for n in toy.base)


def test_unclamped_coefficients_can_leave_zero_one_and_clamped_ones_cannot():
    base, vectors = {"w": torch.zeros(1)}, {"a": {"w": torch.ones(1)}}

    def forward(p, task, x):  # logits (3w, -3w): the entropy falls as w grows, without bound
        return x * p["w"]

    batches = {"a": [torch.tensor([[3.0, -3.0]])]}
    kw = {"granularity": "task", "steps": 40, "lr": 0.05, "init": 0.9}
    free = adamerge(base, vectors, forward, batches, bounds=None, **kw)
    clamped = adamerge(base, vectors, forward, batches, **kw)
    # Adam moves by at most ~lr a step, by less as the gradient fades: well past 1 after 40 steps of 0.05
    assert float(free.coefficients[0]) > 1.5
    assert float(clamped.coefficients[0]) == 1.0
    assert free.coefficients.dtype == torch.float32
    # past the bound the clamp passes no gradient, so the raw value stops one step beyond it: the entropy
    # curve is flat from the step that first reaches 1
    assert clamped.entropy[-1] == clamped.entropy[-2]


def test_batches_sequences_are_cycled_and_iterables_restarted(toy):
    seen = []

    def forward(p, task, x):
        seen.append((task, int(x[0, 0] * 0) + int(x.shape[0])))
        return toy.forward(p, task, x)

    class Loader:  # re-iterable, like a DataLoader
        def __iter__(self):
            yield toy.test_x["b"][:3]
            yield toy.test_x["b"][:4]

    batches = {"a": [toy.test_x["a"][:1], toy.test_x["a"][:2]], "b": Loader()}
    adamerge(toy.base, toy.vectors, forward, batches, granularity="task", steps=6)
    sizes_a = [s for t, s in seen if t == "a"]
    sizes_b = [s for t, s in seen if t == "b"]
    assert sorted(sizes_a[:2]) == [1, 2] and sorted(sizes_a[2:4]) == [1, 2] and sorted(sizes_a[4:]) == [1, 2]
    assert sizes_b == [3, 4, 3, 4, 3, 4]


def test_the_time_budget_stops_after_the_step_that_spent_it(toy):
    import time

    def slow(p, task, x):
        time.sleep(0.02)
        return toy.forward(p, task, x)

    batches = {t: [toy.test_x[t]] for t in toy.heads}
    result = adamerge(toy.base, toy.vectors, slow, batches, steps=1000, time_budget_s=0.1)
    assert result.stopped_by_time_budget
    assert 1 <= result.steps < 1000
    full = adamerge(toy.base, toy.vectors, toy.forward, batches, steps=2, time_budget_s=60)
    assert not full.stopped_by_time_budget and full.steps == 2


def test_progress_bar_runs(toy, capsys):
    batches = {t: [toy.test_x[t]] for t in toy.heads}
    adamerge(toy.base, toy.vectors, toy.forward, batches, steps=2, progress=True)
    assert "AdaMerging (layer)" in capsys.readouterr().out


def test_bad_options_are_named_errors_before_any_work(toy):
    calls = []

    def forward(p, task, x):
        calls.append(task)
        return toy.forward(p, task, x)

    batches = {t: [toy.test_x[t]] for t in toy.heads}

    def run(**kw):
        return adamerge(toy.base, toy.vectors, forward, batches, **kw)

    cases = [
        ({"steps": 0}, "steps must be an integer >= 1"),
        ({"steps": 2.5}, "steps must be an integer >= 1"),
        ({"lr": 0.0}, "lr must be a positive number"),
        ({"lr": float("nan")}, "lr must be a positive number"),
        ({"init": float("inf")}, "init must be a finite number"),
        ({"init": 1.5}, r"init 1.5 lies outside bounds \(0.0, 1.0\)"),
        ({"bounds": (1.0, 0.0)}, "bounds must be"),
        ({"bounds": (0.0,)}, "bounds must be"),
        ({"granularity": "row"}, "granularity must be one of"),
        ({"ties_density": 0.0}, r"ties_density must be a number in \(0, 1\]"),
        ({"ties_density": 1.5}, r"ties_density must be a number in \(0, 1\]"),
        ({"time_budget_s": 0}, "time_budget_s must be a positive number"),
    ]
    for kw, message in cases:
        with pytest.raises(AdaptParameterError, match=message):
            run(**kw)
    assert not calls


def test_bad_inputs_are_named_errors_before_any_work(toy):
    calls = []

    def forward(p, task, x):
        calls.append(task)
        return toy.forward(p, task, x)

    good = {t: [toy.test_x[t]] for t in toy.heads}
    with pytest.raises(UnknownTaskError, match=r"batches are given for unknown tasks \['c'\]"):
        adamerge(toy.base, toy.vectors, forward, {**good, "c": [toy.test_x["a"]]})
    with pytest.raises(EmptyBatchesError, match=r"no batches for tasks \['b'\]"):
        adamerge(toy.base, toy.vectors, forward, {"a": good["a"]})
    with pytest.raises(EmptyBatchesError, match=r"batches\['a'\] is empty"):
        adamerge(toy.base, toy.vectors, forward, {**good, "a": []})
    with pytest.raises(
        AdaptParameterError, match=r"must be a sequence or an iterable of batches \(e.g. \[x\]"
    ):
        adamerge(toy.base, toy.vectors, forward, {**good, "a": toy.test_x["a"]})

    bad_shape = {**toy.vectors, "b": {**toy.vectors["b"], "layers.0.weight": torch.zeros(2, 2)}}
    with pytest.raises(
        TaskVectorMismatchError, match=r"'layers.0.weight' has shape \(2, 2\) in the task vector"
    ):
        adamerge(toy.base, bad_shape, forward, good)
    with pytest.raises(ShapeMismatchError):  # a TaskVectorMismatchError is also transfuse's shape error
        adamerge(toy.base, bad_shape, forward, good)
    unknown_name = {**toy.vectors, "a": {**toy.vectors["a"], "head.weight": torch.zeros(2)}}
    with pytest.raises(TaskVectorMismatchError, match="'head.weight' is not in the base state dict"):
        adamerge(toy.base, unknown_name, forward, good)
    integer = {"n": torch.zeros(3, dtype=torch.long)}
    with pytest.raises(TaskVectorMismatchError, match="only floating point tensors can be merged"):
        adamerge(
            {**toy.base, **integer}, {**toy.vectors, "a": {**toy.vectors["a"], **integer}}, forward, good
        )
    with pytest.raises(TaskVectorMismatchError, match="holds no tensors"):
        adamerge(toy.base, {**toy.vectors, "b": {}}, forward, good)
    with pytest.raises(TaskVectorMismatchError, match="at least one task vector"):
        adamerge(toy.base, {}, forward, {})
    assert not calls


def test_a_one_shot_iterator_that_runs_out_is_named(toy):
    batches = {"a": iter([toy.test_x["a"]]), "b": [toy.test_x["b"]]}
    with pytest.raises(EmptyBatchesError, match=r"batches\['a'\] yielded no batch \(any more\)"):
        adamerge(toy.base, toy.vectors, toy.forward, batches, steps=3)


def test_non_finite_logits_stop_the_run_with_the_step(toy):
    def forward(p, task, x):
        return toy.forward(p, task, x) * float("nan")

    with pytest.raises(NonFiniteObjectiveError, match="not finite at step 0"):
        adamerge(toy.base, toy.vectors, forward, {t: [toy.test_x[t]] for t in toy.heads}, steps=2)


def test_every_adapt_error_is_a_transfuse_error():
    for error in (AdaptParameterError, UnknownTaskError, EmptyBatchesError, TaskVectorMismatchError):
        assert issubclass(error, TransfuseError)
    assert str(UnknownTaskError("plain message")) == "plain message"


def _hand_cross_entropy(logits, labels):
    """mean over rows of -log(exp(z_y) / sum exp(z)), row by row in Python."""
    total = 0.0
    for row, y in zip(logits.tolist(), labels.tolist()):
        m = max(row)
        total += -(row[y] - m - math.log(sum(math.exp(z - m) for z in row)))
    return total / logits.shape[0]


@pytest.mark.parametrize("granularity", ["block", "task"])
def test_labeled_objective_gradient_matches_central_differences(granularity):
    base, vectors, forward, batches = _tiny()
    g = torch.Generator().manual_seed(3)
    labeled = {
        "a": (batches["a"], torch.randint(0, 2, (7,), generator=g)),
        "b": (batches["b"], torch.randint(0, 4, (6,), generator=g)),
    }
    layout = CoefficientLayout.build({t: list(v) for t, v in vectors.items()}, granularity)
    coefficients = torch.linspace(0.2, 0.8, len(layout), dtype=torch.float64)
    merge = TaskVectorMerge(base, vectors, layout)
    value, grad = objective_gradient(merge, forward, labeled, coefficients, "cross_entropy")

    def objective(c):
        merged = _hand_merge(base, vectors, lambda t, n: float(c[layout.index(t, n)]))
        return sum(_hand_cross_entropy(forward(merged, t, x), y) for t, (x, y) in labeled.items())

    assert value == pytest.approx(objective(coefficients), rel=1e-10)
    eps = 1e-6
    for j in range(len(layout)):
        step = torch.zeros_like(coefficients)
        step[j] = eps
        fd = (objective(coefficients + step) - objective(coefficients - step)) / (2 * eps)
        assert float(grad[j]) == pytest.approx(fd, rel=1e-6, abs=1e-9), layout.names[j]
    with pytest.raises(AdaptParameterError, match=r"pair \(inputs, labels tensor\)"):
        objective_gradient(merge, forward, batches, coefficients, "cross_entropy")
    with pytest.raises(AdaptParameterError, match="labels must be"):
        objective_gradient(
            merge, forward, {"a": (batches["a"], torch.zeros(3).long())}, coefficients, "cross_entropy"
        )


def test_few_shot_labeled_coefficients_beat_the_init_on_held_out_data(toy):
    """aTLAS-style: block-wise coefficients learned by cross-entropy on a few labeled examples per task lower
    the held-out cross-entropy below the init's and do not lose accuracy."""
    shots = {t: [(toy.test_x[t][:16], toy.test_y[t][:16])] for t in toy.heads}
    result = adamerge(
        toy.base, toy.vectors, toy.forward, shots, granularity="block", steps=40, lr=5e-2,
        objective="cross_entropy", init=0.1,
    )  # fmt: skip
    assert result.objective == "cross_entropy" and result.steps == 40
    at_init = merge_parameters(toy.base, toy.vectors, result.layout, torch.full((len(result.layout),), 0.1))
    learned = result.merged_state_dict()
    with torch.no_grad():

        def held_out(params):
            return sum(
                _hand_cross_entropy(toy.forward(params, t, toy.test_x[t][16:]), toy.test_y[t][16:])
                for t in toy.heads
            )

        assert held_out(learned) < held_out(at_init)
    assert toy.accuracy(learned) >= toy.accuracy(at_init)
    with pytest.raises(AdaptParameterError, match="objective must be one of"):
        adamerge(toy.base, toy.vectors, toy.forward, shots, objective="kl")
