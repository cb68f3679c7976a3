"""The method contract beyond the tensors: MethodContext, method families, and how the engine, the sweep, the
bench and the CLI treat a method that is not data-free (a dummy registered here and removed afterwards)."""

from __future__ import annotations

import threading

import pytest
import torch
from typer.testing import CliRunner

from transfuse.api import merge_state_dicts
from transfuse.bench.config import BenchConfig, BenchConfigError
from transfuse.bench.runner import check_config
from transfuse.engine import iter_merged, tensor_seed
from transfuse.errors import UnknownMethodError
from transfuse.eval.harness import EvaluationError
from transfuse.eval.sweep import method_grid, sweepable_methods
from transfuse.io.state_dict import StateDictCheckpoint
from transfuse.methods import (
    FAMILIES,
    MethodContext,
    MissingStatisticsError,
    ParamSpec,
    available_methods,
    get_method,
    register,
)
from transfuse.methods.registry import unregister
from transfuse.plan import build_plan
from transfuse.recipe import Recipe

DUMMY = "test_gram_scaled"


@pytest.fixture
def dummy_method():
    """A needs-statistics method: ``base + gram * sum_i w_i delta_i`` with a per-tensor ``gram`` statistic
    (a stand-in for RegMean's Gram matrices).  It records the contexts it was given."""
    seen: list[MethodContext] = []
    lock = threading.Lock()

    @register(
        DUMMY,
        params=(ParamSpec("scale", float, 1.0, "extra scale"),),
        paper="none (test)",
        family="needs-statistics",
        needs=("gram",),
    )
    def gram_scaled(base, deltas, weights, *, scale, ctx: MethodContext):
        """Test method: base + scale * gram * sum_i w_i delta_i."""
        with lock:
            seen.append(ctx)
        summed = (deltas * weights.reshape(-1, *([1] * (deltas.dim() - 1)))).sum(dim=0)
        return base + scale * ctx.statistic("gram") * summed

    try:
        yield seen
    finally:
        unregister(DUMMY)
    assert DUMMY not in {s.name for s in available_methods()}


def _state_dicts(k=2):
    g = torch.Generator().manual_seed(0)
    shapes = {"a.weight": (6, 4), "b.weight": (5,), "c.weight": (3, 3)}
    base = {n: torch.randn(s, generator=g) for n, s in shapes.items()}
    models = [{n: t + torch.randn(t.shape, generator=g) for n, t in base.items()} for _ in range(k)]
    return base, models


def _plan(method, base, models, **parameters):
    recipe = Recipe.from_dict(
        {
            "merge_method": method,
            "base_model": "base",
            "models": [{"model": f"model_{i}"} for i in range(len(models))],
            "parameters": parameters,
            "seed": 0,
        }
    )
    checkpoints = {f"model_{i}": StateDictCheckpoint(m, f"models[{i}]") for i, m in enumerate(models)}
    checkpoints["base"] = StateDictCheckpoint(base, "base")
    return build_plan(recipe, checkpoints=checkpoints)


def test_methods_by_family():
    assert FAMILIES == ("data-free", "needs-statistics", "routed")
    free = available_methods(family="data-free")
    assert all(s.needs == () and s.outputs == () and s.fallback is None for s in free)
    stats = available_methods(family="needs-statistics")
    assert {s.name for s in stats} == {"fisher", "regmean"}
    assert all(s.needs and s.fallback and s.takes_context for s in stats)
    assert available_methods() == sorted(free + stats, key=lambda s: s.name)
    with pytest.raises(ValueError, match="unknown method family"):
        available_methods(family="data_free")  # type: ignore[arg-type]


def test_family_filters_and_the_sweep_refuses_other_families(dummy_method):
    assert DUMMY in [s.name for s in available_methods(family="needs-statistics")]
    assert DUMMY not in {s.name for s in available_methods(family="data-free")}
    assert DUMMY not in {s.name for s in sweepable_methods()}  # the default sweep: data-free only
    assert {s.name for s in sweepable_methods()} == {s.name for s in available_methods(family="data-free")}
    assert [s.name for s in sweepable_methods(["ties", DUMMY])] == ["ties", DUMMY]  # named: swept
    register("test_routed_dummy", paper="x", family="routed", needs=("router",))(
        lambda base, deltas, weights, *, ctx: base
    )
    try:
        with pytest.raises(EvaluationError, match=r"routed method; the method sweep merges data-free and"):
            sweepable_methods(["ties", "test_routed_dummy"])
        with pytest.raises(EvaluationError, match="data-free and statistics-based methods only"):
            method_grid(get_method("test_routed_dummy"))
        with pytest.raises(BenchConfigError, match="data-free and statistics-based methods only"):
            check_config(BenchConfig(methods=("test_routed_dummy",)))
    finally:
        unregister("test_routed_dummy")

    from transfuse.cli import app

    runner = CliRunner()
    out = runner.invoke(app, ["methods", "--family", "needs-statistics"], env={"COLUMNS": "200"})
    assert out.exit_code == 0, out.output
    assert DUMMY in out.output and "gram" in out.output and "ties" not in out.output
    out = runner.invoke(app, ["methods", "--family", "data-free"], env={"COLUMNS": "200"})
    assert out.exit_code == 0 and DUMMY not in out.output and "ties" in out.output
    assert runner.invoke(app, ["methods", "--family", "nope"]).exit_code != 0


@pytest.mark.parametrize("threads", [1, 2])
def test_engine_passes_statistics_through_the_context(dummy_method, threads):
    base, models = _state_dicts()
    gram = {name: {"gram": torch.tensor(0.5 + i)} for i, name in enumerate(sorted(base))}
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with _plan(DUMMY, base, models, scale=2.0) as plan:
            merged = dict(iter_merged(plan, statistics=gram))
    finally:
        torch.set_num_threads(before)
    for name, tensor in merged.items():
        expected = base[name] + 2.0 * gram[name]["gram"] * sum(m[name] - base[name] for m in models)
        torch.testing.assert_close(tensor, expected)
    contexts = {ctx.name: ctx for ctx in dummy_method}
    assert set(contexts) == set(base)
    for name, ctx in contexts.items():
        assert dict(ctx.statistics) == gram[name]  # only the declared statistics, on the compute device
        assert ctx.generator is None and ctx.device == torch.device("cpu")


def test_engine_refuses_a_method_without_its_statistics(dummy_method):
    base, models = _state_dicts()
    with _plan(DUMMY, base, models) as plan:
        with pytest.raises(MissingStatisticsError, match="none were given"):
            next(iter_merged(plan))
        partial = {"a.weight": {"gram": torch.tensor(1.0)}, "b.weight": {"other": torch.tensor(1.0)}}
        with pytest.raises(MissingStatisticsError, match=r"no 'gram' statistics for tensor '(b|c)\.weight'"):
            list(iter_merged(plan, statistics=partial))


def test_registration_checks_the_declaration():
    def fn(base, deltas, weights, *, ctx):
        return base

    def no_ctx(base, deltas, weights):
        return base

    def positional_ctx(base, deltas, weights, ctx):
        return base

    with pytest.raises(ValueError, match="data-free method needs no statistics"):
        register("test_bad1", paper="x", needs=("gram",))(fn)
    with pytest.raises(ValueError, match="data-free method needs no statistics"):
        register("test_bad2", paper="x", family="needs-statistics")(fn)
    with pytest.raises(ValueError, match="family must be one of"):
        register("test_bad3", paper="x", family="data_free")(fn)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="declare a keyword-only ctx"):
        register("test_bad4", paper="x", random=True)(no_ctx)
    with pytest.raises(ValueError, match="ctx must be a keyword-only"):
        register("test_bad5", paper="x")(positional_ctx)
    assert not {s.name for s in available_methods()} & {f"test_bad{i}" for i in range(1, 6)}


def test_unknown_method_suggests_the_closest_name():
    with pytest.raises(UnknownMethodError, match=r"'tie' \(did you mean 'ties'\?\); available: .*ties"):
        get_method("tie")
    with pytest.raises(UnknownMethodError, match=r"did you mean 'dare_ties'\?"):
        get_method("dare-ties")
    with pytest.raises(UnknownMethodError) as info:
        get_method("qwertyuiop")
    assert "did you mean" not in str(info.value) and "available: " in str(info.value)


def test_context_defaults_and_errors():
    ctx = MethodContext()
    assert ctx.device == torch.device("cpu") and ctx.generator is None and dict(ctx.statistics) == {}
    with pytest.raises(MissingStatisticsError, match="'fisher'; given: none"):
        ctx.statistic("fisher")
    spec = get_method("dare_ties")
    base, deltas = torch.zeros(10), torch.ones(2, 10)
    with pytest.raises(ValueError, match="needs MethodContext\\(generator=...\\)"):
        spec.fn(base, deltas, torch.ones(2), density=torch.full((2,), 0.5), normalize=False, rescale=True,
                rescale_mode="l1", lambda_=1.0, ctx=ctx)  # fmt: skip


def test_direct_call_with_the_engines_generator_equals_the_engine():
    # The context is the whole contract: a direct call given the engine's generator reproduces the merge.
    base, models = _state_dicts(3)
    merged = merge_state_dicts(base, models, "dare_ties", density=0.5, seed=11)
    spec = get_method("dare_ties")
    for name in base:
        generator = torch.Generator().manual_seed(tensor_seed(11, name))
        deltas = torch.stack([m[name] - base[name] for m in models])
        direct = spec.fn(
            base[name].clone(),
            deltas,
            torch.ones(3),
            density=torch.full((3,), 0.5),
            normalize=False,
            rescale=True,
            rescale_mode="l1",
            lambda_=1.0,
            sign_election="weighted",
            ctx=MethodContext(name=name, generator=generator),
        )
        assert torch.equal(direct, merged[name])


def test_int8_mask_is_accepted_inert_and_never_passed():
    for name in ("ties", "dare_ties", "della", "breadcrumbs_ties", "task_arithmetic"):
        assert get_method(name).param("int8_mask").inert
    base, models = _state_dicts(3)
    for method in ("ties", "dare_ties"):
        plain = merge_state_dicts(base, models, method, density=0.5, seed=1)
        masked = merge_state_dicts(base, models, method, density=0.5, seed=1, int8_mask=True)
        assert all(torch.equal(plain[n], masked[n]) for n in plain)  # the functions do not even take it
