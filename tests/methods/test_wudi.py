"""wudi (WUDI-merging) against float64 re-derivations: NumPy least squares of the stacked system, autograd of
the official objective, torch.optim.Adam on that objective (the official loop), and the method's properties."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from transfuse import merge_state_dicts
from transfuse.errors import ParameterError
from transfuse.methods import get_method
from transfuse.methods.wudi import _Objective


def _merge(base, deltas, weights=None, **params):
    spec = get_method("wudi")
    kwargs = {p.name: p.default for p in spec.params} | params
    weights = torch.ones(deltas.shape[0]) if weights is None else weights
    return spec.fn(base.clone(), deltas.clone(), weights, **kwargs)


def _problem(shape, k, seed=0, scale=0.1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), scale * torch.randn(k, *shape, generator=g)


def _objective(x, taus):
    """The official loss, literally: sum_i ||(x - tau_i) tau_i^T||_F^2 / ||tau_i||_F^2 (float64 NumPy)."""
    return sum(np.sum(((x - t) @ t.T) ** 2) / np.sum(t**2) for t in taus if np.any(t))


def _lstsq_minimiser(deltas, weights):
    """Min-norm minimiser from NumPy's lstsq of the stacked system X [sqrt(c_i) tau_i^T]_i = [sqrt(c_i) tau_i tau_i^T]_i."""
    taus = [w * d for w, d in zip(weights.double().numpy(), deltas.double().numpy(), strict=True)]
    taus = [t for t in taus if np.any(t)]
    p = np.hstack([t.T / np.linalg.norm(t) for t in taus])  # [in, K*out]
    q = np.hstack([t @ t.T / np.linalg.norm(t) for t in taus])  # [out, K*out]
    return np.linalg.lstsq(p.T, q.T, rcond=None)[0].T


# (6, 10, 3): K*out > in, G full rank; (4, 20, 2): K*out < in, G rank-deficient (the dual, M M^T, path);
# (12, 5, 2): tall.
SHAPES = [((6, 10), 3), ((4, 20), 2), ((12, 5), 2), ((8, 8), 4)]


@pytest.mark.parametrize(("shape", "k"), SHAPES)
def test_closed_form_is_the_float64_lstsq_minimiser(shape, k):
    base, deltas = _problem(shape, k, seed=k)
    weights = torch.tensor([1.0, -0.6, 1.7, 0.4][:k])
    expected = base.double().numpy() + 0.8 * _lstsq_minimiser(deltas, weights)
    out = _merge(base, deltas, weights, solver="closed_form", alpha=0.8)
    assert out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), expected, rtol=0, atol=2e-6)


@pytest.mark.parametrize(("shape", "k"), SHAPES)
def test_closed_form_satisfies_the_normal_equations(shape, k):
    base, deltas = _problem(shape, k, seed=10 + k)
    x = (_merge(base, deltas, solver="closed_form") - base).double().numpy()
    taus = deltas.double().numpy()
    # d/dX of the objective = 2 sum_i c_i (X - tau_i) tau_i^T tau_i = 0, written out term by term
    residual = sum((x - t) @ t.T @ t / np.sum(t**2) for t in taus)
    scale = sum(np.abs(t @ t.T @ t).max() / np.sum(t**2) for t in taus)
    assert np.abs(residual).max() < 1e-5 * scale
    assert _objective(x, taus) <= _objective(taus.sum(0), taus)


@pytest.mark.parametrize("gram", [True, False])  # 2 (x G - B) with [in, in] G, or 2 (x M^T - C) M
@pytest.mark.parametrize("shape", [(6, 10), (4, 40)])
def test_gradient_is_autograd_of_the_official_objective(shape, gram):
    _, deltas = _problem(shape, 3, seed=3)
    deltas[1] *= 5.0  # unequal norms, so the 1/||tau_i||^2 weighting matters
    deltas[2] = 0.0  # a zero task vector drops out
    taus = deltas.double()
    x = torch.randn(
        shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64, requires_grad=True
    )
    loss = sum(((x - t) @ t.T).pow(2).sum() / t.pow(2).sum() for t in taus[:2])
    (expected,) = torch.autograd.grad(loss, x)
    norms = torch.linalg.vector_norm(taus.reshape(3, -1), dim=1)
    got = _Objective(taus.clone(), norms, torch.float64, gram=gram).gradient()(x.detach())
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_adam_is_the_official_loop():
    """Our Adam equals torch.optim.Adam on the official loss (nlp_roberta/lamassu.py), same start and lr."""
    base, deltas = _problem((6, 10), 3, seed=5)
    weights = torch.tensor([1.0, 0.5, -1.0])
    taus = deltas * weights[:, None, None]
    x = torch.nn.Parameter(taus.sum(0).clone())
    opt = torch.optim.Adam([x], lr=1e-3)
    norms = taus.reshape(3, -1).pow(2).sum(1)
    for _ in range(40):
        loss = (torch.matmul(x.unsqueeze(0) - taus, taus.transpose(1, 2)).pow(2) / norms[:, None, None]).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    out = _merge(base, deltas, weights, steps=40, lr=1e-3)
    torch.testing.assert_close(out - base, x.detach(), rtol=0, atol=2e-6)


def test_adam_descends_towards_the_closed_form():
    base, deltas = _problem((12, 4), 3, seed=6, scale=0.01)  # K*out >> in: G well conditioned
    taus = deltas.double().numpy()
    exact = (_merge(base, deltas, solver="closed_form") - base).double().numpy()
    losses = [
        _objective((_merge(base, deltas, steps=n, lr=1e-4) - base).double().numpy(), taus)
        for n in (0, 10, 100, 300, 3000)
    ]
    assert losses[0] == pytest.approx(_objective(taus.sum(0), taus), rel=1e-5)  # the task-arithmetic start
    assert all(b <= a * (1 + 1e-6) for a, b in zip(losses, losses[1:], strict=False))
    assert losses[-1] == pytest.approx(_objective(exact, taus), rel=1e-5)
    far = (_merge(base, deltas, steps=3000, lr=1e-4) - base).double().numpy()
    np.testing.assert_allclose(far, exact, rtol=0, atol=5e-7)


@pytest.mark.parametrize("solver", ["adam", "closed_form"])
def test_one_task_gives_that_task(solver):
    base, deltas = _problem((10, 6), 1, seed=7)  # out >= in: G = tau^T tau is full rank
    out = _merge(base, deltas, torch.tensor([0.7]), solver=solver)
    torch.testing.assert_close(out, base + 0.7 * deltas[0], rtol=0, atol=1e-6)
    # a zero-weight model drops out: the other task alone
    two = torch.stack([deltas[0], _problem((10, 6), 1, seed=8)[1][0]])
    out = _merge(base, two, torch.tensor([0.7, 0.0]), solver=solver)
    torch.testing.assert_close(out, base + 0.7 * deltas[0], rtol=0, atol=1e-6)


def test_two_copies_of_a_task_give_that_task_through_the_solvers():
    base, deltas = _problem((10, 6), 1, seed=9)
    copies = deltas.repeat(2, 1, 1)  # both terms vanish at X = tau only (G full rank)
    torch.testing.assert_close(
        _merge(base, copies, solver="closed_form"), base + deltas[0], rtol=0, atol=2e-6
    )
    adam = _merge(base, copies, steps=2000, lr=1e-3)  # starts at 2 tau
    torch.testing.assert_close(adam, base + deltas[0], rtol=0, atol=5e-5)


def test_weights_scale_as_documented():
    base, deltas = _problem((6, 10), 3, seed=11, scale=0.01)
    one = _merge(base, deltas, solver="closed_form") - base
    for s in (2.0, -0.5):
        scaled = _merge(base, deltas, torch.full((3,), s), solver="closed_form") - base
        torch.testing.assert_close(scaled, s * one, rtol=0, atol=1e-6)
    # Adam's step is absolute: a common weight s with lr * |s| follows s times the trajectory
    adam = _merge(base, deltas, steps=50, lr=1e-4) - base
    scaled = _merge(base, deltas, torch.full((3,), 3.0), steps=50, lr=3e-4) - base
    torch.testing.assert_close(scaled, 3.0 * adam, rtol=0, atol=1e-6)
    # Adam starts from the weighted task-arithmetic sum
    weights = torch.tensor([1.0, -2.0, 0.5])
    start = _merge(base, deltas, weights, steps=0)
    torch.testing.assert_close(start, base + (weights[:, None, None] * deltas).sum(0), rtol=0, atol=1e-7)
    torch.testing.assert_close(_merge(base, deltas, weights, lr=0.0), start, rtol=0, atol=0)


def test_alpha_scales_the_update():
    base, deltas = _problem((6, 10), 3, seed=12)
    for solver in ("adam", "closed_form"):
        one = _merge(base, deltas, solver=solver) - base
        torch.testing.assert_close(_merge(base, deltas, solver=solver, alpha=0.3) - base, 0.3 * one)


@pytest.mark.parametrize("solver", ["adam", "closed_form", "mean"])
@pytest.mark.parametrize("shape", [(6, 10), (7,), (2, 3, 4), ()])
def test_zero_task_vectors_give_the_base(solver, shape):
    base, _ = _problem(shape, 1, seed=13)
    out = _merge(base, torch.zeros(3, *shape), solver=solver)
    assert torch.equal(out, base) and torch.isfinite(out).all()


@pytest.mark.parametrize("shape", [(7,), (2, 3, 4), ()])
def test_other_tensors_get_the_mean_task_vector(shape):
    base, deltas = _problem(shape, 3, seed=14)
    weights = torch.tensor([1.0, 0.5, -2.0])
    expected = base + 1.5 * (weights.reshape(-1, *[1] * len(shape)) * deltas).mean(0)
    torch.testing.assert_close(_merge(base, deltas, weights, alpha=1.5), expected)


def test_solver_mean_on_a_matrix_is_the_mean_task_vector():
    base, deltas = _problem((6, 10), 3, seed=15)
    torch.testing.assert_close(_merge(base, deltas, solver="mean"), base + deltas.mean(0))


def test_deterministic():
    base, deltas = _problem((16, 24), 4, seed=16)
    for solver in ("adam", "closed_form"):
        assert torch.equal(_merge(base, deltas, solver=solver), _merge(base, deltas, solver=solver))


def test_registered_as_a_data_free_method():
    spec = get_method("wudi")
    assert spec.family == "data-free" and spec.needs == () and spec.output_scale == "alpha"
    assert spec.mergekit_name is None  # MergeKit has no such method
    assert {p.name: p.default for p in spec.params} == {
        "solver": "adam",
        "steps": 300,
        "lr": 1e-5,
        "alpha": 1.0,
    }


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("solver", "sgd", "must be one of adam, closed_form, mean"),
        ("steps", -1, "must be >= 0"),
        ("steps", 2.5, "must be an integer"),
        ("steps", 200_000, "must be <= 100000"),
        ("lr", -1e-5, "must be >= 0"),
        ("lr", "fast", "must be a number"),
    ],
)
def test_bad_parameters_are_named_errors(name, value, message):
    with pytest.raises(ParameterError, match=message):
        get_method("wudi").param(name).validate(value)
    sd = {"w": torch.zeros(3, 2)}
    with pytest.raises(ParameterError, match=message):
        merge_state_dicts(sd, [{"w": torch.ones(3, 2)}], "wudi", **{name: value})


def _state_dicts():
    g = torch.Generator().manual_seed(17)
    shapes = {"emb.weight": (20, 6), "layer.weight": (5, 8), "layer.bias": (5,)}
    base = {n: torch.randn(s, generator=g) for n, s in shapes.items()}
    models = [{n: t + 0.05 * torch.randn(t.shape, generator=g) for n, t in base.items()} for _ in range(3)]
    deltas = {n: torch.stack([m[n] - base[n] for m in models]) for n in shapes}
    return base, models, deltas


def test_merge_state_dicts_end_to_end():
    base, models, deltas = _state_dicts()
    weights = [1.0, 0.5, 0.8]
    w = torch.tensor(weights)
    got = merge_state_dicts(base, models, "wudi", solver="closed_form", weight=weights)
    for name in ("emb.weight", "layer.weight"):  # every matrix, the embedding included
        exact = base[name].double().numpy() + _lstsq_minimiser(deltas[name], w)
        np.testing.assert_allclose(got[name].numpy(), exact, rtol=0, atol=2e-6)
    torch.testing.assert_close(
        got["layer.bias"], base["layer.bias"] + (w[:, None] * deltas["layer.bias"]).mean(0)
    )

    default = merge_state_dicts(base, models, "wudi", weight=weights)  # adam
    for name in ("emb.weight", "layer.weight"):
        taus = (w[:, None, None] * deltas[name]).double().numpy()
        merged = (default[name] - base[name]).double().numpy()
        assert _objective(merged, taus) < _objective(taus.sum(0), taus)


def test_a_recipe_filter_routes_embeddings_to_the_mean(tmp_path):
    import yaml
    from safetensors.torch import load_file, save_file

    import transfuse

    base, models, deltas = _state_dicts()
    save_file(base, tmp_path / "base.safetensors")
    for i, m in enumerate(models):
        save_file(m, tmp_path / f"m{i}.safetensors")
    recipe = {
        "merge_method": "wudi",
        "base_model": str(tmp_path / "base.safetensors"),
        "models": [{"model": str(tmp_path / f"m{i}.safetensors")} for i in range(3)],
        "parameters": {"solver": [{"filter": "emb", "value": "mean"}, {"value": "closed_form"}]},
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    transfuse.merge(tmp_path / "recipe.yaml", tmp_path / "out", progress=False)
    got = load_file(tmp_path / "out" / "model.safetensors")
    torch.testing.assert_close(got["emb.weight"], base["emb.weight"] + deltas["emb.weight"].mean(0))
    exact = base["layer.weight"].double().numpy() + _lstsq_minimiser(deltas["layer.weight"], torch.ones(3))
    np.testing.assert_allclose(got["layer.weight"].numpy(), exact, rtol=0, atol=2e-6)
