"""``TensorJob.has_base`` / ``MethodContext.has_base``: set by both planners from the recipe, never from values."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from transfuse.engine import method_context
from transfuse.methods.context import MethodContext
from transfuse.plan import build_plan
from transfuse.recipe import Recipe


@pytest.fixture()
def weights(tmp_path):
    g = torch.Generator().manual_seed(0)
    names = ["embed.weight", "layers.0.w", "layers.1.w"]
    paths = {}
    for label in ("base", "a", "b"):
        path = tmp_path / f"{label}.safetensors"
        save_file({n: torch.randn(3, 2, generator=g) for n in names}, str(path))
        paths[label] = str(path)
    return paths


def _jobs(data):
    plan = build_plan(Recipe.from_dict(data))
    try:
        return plan, [(j.name, j.has_base) for j in plan.jobs]
    finally:
        plan.close()


@pytest.mark.parametrize("method", ["nuslerp", "multislerp", "karcher", "linear", "task_arithmetic"])
def test_whole_model_recipes(weights, method):
    models = [{"model": weights["a"]}, {"model": weights["b"]}]
    plan, jobs = _jobs({"merge_method": method, "base_model": weights["base"], "models": models})
    assert jobs and all(has for _, has in jobs)  # a base_model is the reference, needs_base or not
    ctx = method_context(plan, plan.jobs[0], torch.device("cpu"))
    assert ctx.has_base
    if not plan.spec.needs_base:
        plan, jobs = _jobs({"merge_method": method, "models": models})
        assert jobs and not any(has for _, has in jobs)
        assert not method_context(plan, plan.jobs[0], torch.device("cpu")).has_base


def test_slice_recipes(weights):
    def sliced(method, base):
        sources = [{"model": weights[m], "layer_range": [0, 2]} for m in ("base", "a", "b")]
        data = {"merge_method": method, "slices": [{"sources": sources}]}
        if base:
            data["base_model"] = weights["base"]
        return _jobs(data)[1]

    # a needs_base method: the slice's base is its base
    assert all(has for _, has in sliced("task_arithmetic", base=True))
    # a method that works with or without a base: a base named in the recipe and listed as a source is the base
    assert all(has for _, has in sliced("karcher", base=True))
    # without a base every source is a model and the first is the reference
    assert not any(has for _, has in sliced("multislerp", base=False))
    assert not any(
        has for _, has in sliced("linear", base=True)
    )  # linear ignores a base (MergeKit's "ignored")


def test_default_context_has_a_base():
    assert MethodContext().has_base and not MethodContext(has_base=False).has_base
