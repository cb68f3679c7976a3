"""Twin-Merging: the compression against numpy's SVD, the routed model against hand-built models, routing per
example, the router's training, saving and loading, storage and the named errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

import transfuse
from transfuse.errors import MissingTensorError, ParameterError, ShapeMismatchError
from transfuse.routed.errors import RoutedFormatError, TaskIdsMismatchError, UnknownTaskError
from transfuse.routed.model import RoutedModel
from transfuse.routed.storage import routed_storage
from transfuse.routed.store import save_routed
from transfuse.routed.twin import (
    MissingValidationDataError,
    RoutingWeightsError,
    TwinRankError,
    kept_rank,
    truncated_svd,
    twin_merge,
)
from transfuse.routed.twin_train import router_accuracy, train_twin_router

from .conftest import perturbed, tiny_bert


@pytest.fixture(autouse=True)
def one_thread():
    """These modules are tiny: a second intra-op thread only adds barrier waits on a busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Gate(nn.Module):
    """A 2-D parameter outside nn.Linear: routed per example with materialised low-rank weights (vmap)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(0.3 * torch.randn(width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight


class Block(nn.Module):
    """A parameter of its own and a routed child: run one example at a time."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(width))
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x) * self.scale


class Toy(nn.Module):
    """token ids [B, T] -> [B, 3]: every routed path (embedding, LayerNorm, custom matrix, nested, linear)."""

    def __init__(self, vocab: int = 11, width: int = 6) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.norm = nn.LayerNorm(width)
        self.gate = Gate(width)
        self.block = Block(width)
        self.head = nn.Linear(width, 3)
        self.register_buffer("version", torch.tensor([1]))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.gate(self.norm(self.embed(ids))))
        return self.head(self.block(h)).mean(dim=1)


def _toy(seed: int = 0) -> Toy:
    torch.manual_seed(seed)
    return Toy().double()


@pytest.fixture
def toy_experts():
    base = {k: v.clone() for k, v in _toy().state_dict().items()}
    return base, {name: perturbed(base, seed) for seed, name in enumerate("abc", start=1)}


IDS = torch.tensor([[1, 4, 2, 9], [3, 3, 0, 7], [10, 5, 6, 1], [2, 8, 8, 4], [0, 1, 2, 3]])


def _hand_shared(base, experts, lam=0.3):
    """theta_0 + lam * sum_i (theta_i - theta_0), tensor by tensor in a loop."""
    out = {}
    for name, b in base.items():
        if not b.is_floating_point():
            out[name] = b.clone()
            continue
        acc = torch.zeros_like(b)
        for e in experts.values():
            acc = acc + (e[name] - b)
        out[name] = b + lam * acc
    return out


def _numpy_truncation(matrix: torch.Tensor, rank: int) -> torch.Tensor:
    """The best rank-r approximation by numpy's SVD (an implementation independent of torch's)."""
    u, s, vh = np.linalg.svd(matrix.double().numpy(), full_matrices=False)
    r = min(rank, s.size)
    return torch.from_numpy((u[:, :r] * s[:r]) @ vh[:r])


def _hand_exclusive(base, experts, shared, rank):
    """{task: {name: v_i}}: v_i = theta_i - theta_*, 2-D tensors truncated to `rank` by numpy."""
    out = {}
    for task, e in experts.items():
        out[task] = {}
        for name, b in base.items():
            if not b.is_floating_point():
                continue
            v = e[name] - shared[name]
            out[task][name] = _numpy_truncation(v, rank) if v.dim() == 2 else v
    return out


def _run_hand_built(state, ids):
    model = Toy().double()
    model.load_state_dict(state)
    return model(ids)


# ------------------------------------------------------------------------------------------------ the compression


def test_truncated_svd_is_numpys_best_rank_r_approximation():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(9, 5, generator=g, dtype=torch.float64)
    u, s, vh = truncated_svd(a, rank=3)
    assert u.shape == (9, 3) and s.shape == (3,) and vh.shape == (3, 5)
    torch.testing.assert_close((u * s) @ vh, _numpy_truncation(a, 3), rtol=0, atol=1e-12)
    full = np.linalg.svd(a.numpy(), compute_uv=False)
    assert np.allclose(s.numpy(), full[:3], atol=1e-12)
    # Eckart-Young: the squared error is the energy of the dropped singular values
    err = float(((a - (u * s) @ vh) ** 2).sum())
    assert err == pytest.approx(float((full[3:] ** 2).sum()), rel=1e-10)
    torch.testing.assert_close(u.T @ u, torch.eye(3, dtype=torch.float64), rtol=0, atol=1e-12)
    # a rank above min(m, n) keeps the matrix whole
    u, s, vh = truncated_svd(a, rank=40)
    assert s.shape == (5,)
    torch.testing.assert_close((u * s) @ vh, a, rtol=0, atol=1e-12)


def test_kept_rank_by_energy_and_by_default_follow_a_loop():
    s = torch.tensor([5.0, 3.0, 2.0, 1.0, 0.5, 0.1], dtype=torch.float64)
    total = float((s**2).sum())
    for energy in (0.1, 0.7, 0.9, 0.97, 0.999, 1.0):
        k, acc = 0, 0.0
        while k < s.numel() and acc < energy * total - 1e-15:
            acc += float(s[k] ** 2)
            k += 1
        assert kept_rank(s, energy=energy) == max(k, 1), energy
    assert kept_rank(s) == 1  # floor(0.1 * 6) = 0 -> at least 1
    assert kept_rank(torch.ones(384)) == 38  # the authors' 10% of a 384-wide matrix
    assert kept_rank(s, rank=4) == 4 and kept_rank(s, rank=10) == 6


def test_factors_in_the_model_are_the_truncated_svd_of_theta_i_minus_shared(toy_experts):
    base, experts = toy_experts
    model = twin_merge(base, experts, _toy(), rank=2)
    shared = _hand_shared(base, experts)
    for name, t in model.module.state_dict().items():
        torch.testing.assert_close(t, shared[name], rtol=0, atol=1e-14)
    hand = _hand_exclusive(base, experts, shared, rank=2)
    for task in experts:
        saved = model.parts.task_tensors(task)
        for name in ("embed.weight", "gate.weight", "block.proj.weight", "head.weight"):
            u, s, vh = saved[f"u.{name}"], saved[f"s.{name}"], saved[f"vh.{name}"]
            assert s.shape == (2,)
            torch.testing.assert_close((u * s) @ vh, hand[task][name], rtol=0, atol=1e-12)
        for name in ("norm.weight", "norm.bias", "block.scale", "block.proj.bias", "head.bias"):
            torch.testing.assert_close(saved[f"delta.{name}"], hand[task][name], rtol=0, atol=0)
        assert "version" not in str(sorted(saved))  # integer buffers stay shared


def test_energy_keeps_per_task_ranks_that_numpy_agrees_with(toy_experts):
    base, experts = toy_experts
    model = twin_merge(base, experts, _toy(), energy=0.8)
    shared = _hand_shared(base, experts)
    for task, e in experts.items():
        s_np = np.linalg.svd((e["gate.weight"] - shared["gate.weight"]).numpy(), compute_uv=False)
        share = np.cumsum(s_np**2) / np.sum(s_np**2)
        expected = int(np.argmax(share >= 0.8 - 1e-12)) + 1
        assert model.parts.task_tensors(task)["s.gate.weight"].shape == (expected,)


# ------------------------------------------------------------------------------------------------ the routed model


def test_full_rank_one_hot_routing_reproduces_each_expert(toy_experts):
    base, experts = toy_experts
    model = twin_merge(base, experts, _toy(), rank=6).eval()  # 6 = every matrix's smallest dimension or more
    for task, state in experts.items():
        expected = _run_hand_built(state, IDS)
        torch.testing.assert_close(model(IDS, routing_tasks=task), expected, rtol=0, atol=1e-12)
        # the same through materialise (RoutedModel.task_parameters)
        for name, t in model.task_parameters(task).items():
            torch.testing.assert_close(t, state[name], rtol=0, atol=1e-12)


def test_full_rank_one_hot_bert_reproduces_each_expert():
    module = tiny_bert().double()
    base = {k: v.clone() for k, v in module.state_dict().items()}
    experts = {name: perturbed(base, seed) for seed, name in enumerate(("sst", "nli"), start=10)}
    model = twin_merge(
        base, experts, tiny_bert().double().eval(), rank=16, feature_mask_kwarg="attention_mask"
    )
    ids = torch.tensor([[1, 5, 9, 2, 0, 0], [3, 3, 7, 8, 4, 1]])
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    for task, state in experts.items():
        expert = tiny_bert().double()
        expert.load_state_dict(state)
        expected = expert(input_ids=ids, attention_mask=mask).last_hidden_state
        got = model(input_ids=ids, attention_mask=mask, routing_tasks=task).last_hidden_state
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)


def test_explicit_weights_per_example_equal_hand_built_models(toy_experts):
    base, experts = toy_experts
    model = twin_merge(base, experts, _toy(), rank=2).eval()
    shared = _hand_shared(base, experts)
    hand = _hand_exclusive(base, experts, shared, rank=2)
    g = torch.Generator().manual_seed(3)
    weights = torch.softmax(torch.randn(IDS.shape[0], 3, generator=g, dtype=torch.float64), dim=-1)
    weights[1] = torch.tensor([1.7, -0.4, 0.2])  # any weights, not only a softmax
    got = model(IDS, routing_weights=weights)
    for b in range(IDS.shape[0]):
        state = {k: v.clone() for k, v in shared.items()}
        for i, task in enumerate(experts):
            for name, v in hand[task].items():
                state[name] = state[name] + weights[b, i] * v
        torch.testing.assert_close(got[b], _run_hand_built(state, IDS[b : b + 1])[0], rtol=0, atol=1e-12)
    # one weight vector for the batch
    state = {k: v.clone() for k, v in shared.items()}
    for i, task in enumerate(experts):
        for name, v in hand[task].items():
            state[name] = state[name] + weights[0, i] * v
    torch.testing.assert_close(
        model(IDS, routing_weights=weights[0]), _run_hand_built(state, IDS), rtol=0, atol=1e-12
    )


def test_without_task_ids_the_weights_are_the_softmax_of_the_router_on_shared_features(toy_experts):
    base, experts = toy_experts
    model = twin_merge(base, experts, _toy(), rank=2, seed=4).eval()
    shared_out = _run_hand_built(_hand_shared(base, experts), IDS)  # [B, 3]: the features of a [B, D] output
    router = model.parts.router.eval()
    with torch.no_grad():
        h = nn.functional.leaky_relu(router.norm1(router.inp(shared_out)))
        h = nn.functional.leaky_relu(router.norm2(router.hidden(h)))
        weights = torch.softmax(router.out(h), dim=-1)
    assert not torch.allclose(weights[0], weights[1])
    torch.testing.assert_close(model(IDS), model(IDS, routing_weights=weights), rtol=0, atol=1e-14)


def test_mixed_batch_gives_what_single_examples_and_single_task_batches_give(toy_experts):
    base, experts = toy_experts
    model = twin_merge(base, experts, _toy(), rank=2).eval()
    batch = model(IDS)
    for b in range(IDS.shape[0]):
        torch.testing.assert_close(batch[b : b + 1], model(IDS[b : b + 1]), rtol=0, atol=1e-13)
    tasks = ["c", "a", "a", "b", "c"]
    mixed = model(IDS, routing_tasks=tasks)
    for task in "abc":
        rows = [i for i, t in enumerate(tasks) if t == task]
        torch.testing.assert_close(mixed[rows], model(IDS[rows], routing_tasks=task), rtol=0, atol=1e-13)
    # BERT in float32: a mixed batch against single examples, routed by the router
    module = tiny_bert()
    bert_base = {k: v.clone() for k, v in module.state_dict().items()}
    bert_experts = {n: perturbed(bert_base, s) for s, n in enumerate(("sst", "nli"), start=10)}
    bert = twin_merge(bert_base, bert_experts, module, rank=4).eval()
    ids = torch.randint(0, 40, (4, 7), generator=torch.Generator().manual_seed(1))
    out = bert(input_ids=ids).last_hidden_state
    for b in range(4):
        single = bert(input_ids=ids[b : b + 1]).last_hidden_state
        torch.testing.assert_close(out[b : b + 1], single, rtol=0, atol=2e-5)


# ------------------------------------------------------------------------------------------------ the router


def _clusters(n_per_task: int, seed: int):
    """Three tasks whose token ids come from disjoint parts of the vocabulary (separable inputs)."""
    g = torch.Generator().manual_seed(seed)
    return {
        task: [torch.randint(lo, lo + 3, (n_per_task, 4), generator=g)] for task, lo in zip("abc", (0, 4, 8))
    }


def test_router_training_learns_each_inputs_task(toy_experts):
    base, experts = toy_experts
    model = twin_merge(base, experts, _toy(), rank=2, router_hidden=32, router_dropout=0.1)
    train = _clusters(60, seed=0)
    before, _ = router_accuracy(model, train)
    result = train_twin_router(model, train, epochs=60, lr=1e-2, batch_size=32)
    assert result.epochs == 60 and result.examples == {"a": 60, "b": 60, "c": 60}
    assert result.loss[-1] < 0.5 * result.loss[0]
    # the reported accuracy, recounted from the routing weights the model uses
    features = torch.cat([v[0] for v in train.values()])
    labels = torch.repeat_interleave(torch.arange(3), 60)
    predicted = model.parts.route(model.module, (features,), {}).argmax(-1)
    assert result.accuracy == pytest.approx(float((predicted == labels).double().mean()))
    assert result.accuracy >= 0.95 > before + 0.2
    # on fresh inputs of the same tasks
    fresh, _ = router_accuracy(model, _clusters(30, seed=1))
    assert fresh >= 0.9
    assert not any(p.requires_grad for p in model.parts.router.parameters())


def test_router_needs_data_for_every_task(toy_experts):
    base, experts = toy_experts
    model = twin_merge(base, experts, _toy(), rank=2)
    data = _clusters(5, seed=0)
    with pytest.raises(MissingValidationDataError, match="'c'"):
        train_twin_router(model, {"a": data["a"], "b": data["b"]})
    with pytest.raises(MissingValidationDataError, match="'b'"):
        train_twin_router(model, {**data, "b": []})
    with pytest.raises(ParameterError, match="lacks"):
        train_twin_router(model, {**data, "z": data["a"]})
    with pytest.raises(ParameterError, match="epochs"):
        train_twin_router(model, data, epochs=0)


# ------------------------------------------------------------------------------------------------ save / load


def test_save_load_round_trip_is_bit_identical(toy_experts, tmp_path):
    base, experts = toy_experts
    model = twin_merge(base, experts, _toy(), energy=0.9)
    train_twin_router(model, _clusters(10, seed=0), epochs=3, batch_size=8)  # BatchNorm statistics moved
    model.eval()
    directory = save_routed(model, tmp_path / "toy")
    manifest = json.loads((directory / "manifest.json").read_text())
    assert manifest["method"] == "twin" and manifest["saved_router"] is True
    assert manifest["settings"]["energy"] == 0.9
    loaded = transfuse.load(directory, module=_toy(seed=7))
    assert isinstance(loaded, RoutedModel) and loaded.tasks == ("a", "b", "c")
    assert torch.equal(loaded(IDS), model(IDS))
    assert torch.equal(loaded(IDS, routing_tasks=list("abcab")), model(IDS, routing_tasks=list("abcab")))

    module = tiny_bert()
    bert_base = {k: v.clone() for k, v in module.state_dict().items()}
    bert = twin_merge(
        bert_base,
        {n: perturbed(bert_base, s) for s, n in enumerate(("sst", "nli"), start=10)},
        module,
        rank=3,
        feature_mask_kwarg="attention_mask",
    ).eval()
    bert_dir = save_routed(bert, tmp_path / "bert")
    again = transfuse.load(bert_dir).eval()  # rebuilt from its config.json
    ids = torch.tensor([[1, 5, 9, 2, 0], [3, 3, 7, 8, 4]])
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    assert torch.equal(
        again(input_ids=ids, attention_mask=mask).last_hidden_state,
        bert(input_ids=ids, attention_mask=mask).last_hidden_state,
    )
    tensors = json.loads((bert_dir / "manifest.json").read_text())["files"]["task-000.safetensors"]["tensors"]
    assert tensors["u.encoder.layer.0.intermediate.dense.weight"]["shape"] == [32, 3]
    assert tensors["vh.encoder.layer.0.intermediate.dense.weight"]["shape"] == [3, 16]
    assert tensors["delta.encoder.layer.0.output.LayerNorm.weight"]["shape"] == [16]

    # a task file whose factors disagree with the base is refused by name
    manifest = json.loads((directory / "manifest.json").read_text())
    from safetensors.torch import load_file, save_file

    task_file = directory / "task-001.safetensors"
    tensors = load_file(str(task_file))
    tensors["u.gate.weight"] = tensors["u.gate.weight"][:5].contiguous()
    save_file(tensors, str(task_file))
    manifest["files"]["task-001.safetensors"] = {
        "bytes": task_file.stat().st_size,
        "tensors": {k: {"dtype": "float64", "shape": list(v.shape)} for k, v in tensors.items()},
    }
    (directory / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(RoutedFormatError, match="factors of gate.weight"):
        transfuse.load(directory, module=_toy())


def test_storage_per_task_is_the_factors(toy_experts):
    base, experts = toy_experts
    model = twin_merge(base, experts, _toy(), rank=2)
    storage = routed_storage(model)
    per_task = 0
    for t in base.values():
        if not t.is_floating_point():
            continue
        if t.dim() == 2:
            m, n = t.shape
            per_task += 8 * 2 * (m + n + 1)  # float64 u [m, 2], s [2], vh [2, n]
        else:
            per_task += 8 * t.numel()
    assert storage.task_bytes == {"a": per_task, "b": per_task, "c": per_task}
    router_bytes = sum(t.numel() * t.element_size() for t in model.parts.router.state_dict().values())
    module_bytes = sum(t.numel() * t.element_size() for t in base.values())
    assert storage.shared_bytes == module_bytes + router_bytes


# ------------------------------------------------------------------------------------------------ named errors


def test_named_errors_before_any_work(toy_experts):
    base, experts = toy_experts
    module = _toy(seed=9)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    bad_shape = {**experts, "b": {**experts["b"], "head.weight": torch.zeros(4, 6, dtype=torch.float64)}}
    with pytest.raises(ShapeMismatchError, match="head.weight"):
        twin_merge(base, bad_shape, module)
    missing = {**experts, "c": {k: v for k, v in experts["c"].items() if k != "norm.bias"}}
    with pytest.raises(MissingTensorError, match="norm.bias"):
        twin_merge(base, missing, module)
    with pytest.raises(ParameterError, match="at least one expert"):
        twin_merge(base, {}, module)
    with pytest.raises(ParameterError, match="svd_threads"):
        twin_merge(base, experts, module, svd_threads=0)
    for kwargs, message in (
        ({"rank": 0}, "rank must be"),
        ({"rank": 7}, "exceeds every matrix"),
        ({"energy": 0.0}, "energy"),
        ({"energy": 1.5}, "energy"),
        ({"rank": 2, "energy": 0.5}, "not both"),
    ):
        with pytest.raises(TwinRankError, match=message):
            twin_merge(base, experts, module, **kwargs)
    for name, t in module.state_dict().items():
        assert torch.equal(t, before[name])  # nothing was loaded into the module

    model = twin_merge(base, experts, module, rank=2).eval()
    with pytest.raises(UnknownTaskError, match="'z'"):
        model(IDS, routing_tasks="z")
    with pytest.raises(UnknownTaskError, match="'z'"):
        model(IDS, routing_tasks=["a", "z", "a", "a", "a"])
    with pytest.raises(TaskIdsMismatchError, match="5"):
        model(IDS, routing_tasks=["a", "b"])
    with pytest.raises(
        TaskIdsMismatchError
    ):  # RoutedModel's task_ids are for methods that materialise a task
        model(IDS, task_ids="a")
    with pytest.raises(RoutingWeightsError, match=r"\[5, 3\]"):
        model(IDS, routing_weights=torch.ones(5, 2, dtype=torch.float64))
    with pytest.raises(RoutingWeightsError, match="NaN"):
        model(IDS, routing_weights=torch.tensor([0.5, float("nan"), 0.5], dtype=torch.float64))
    with pytest.raises(RoutingWeightsError, match="not both"):
        model(IDS, routing_tasks="a", routing_weights=torch.ones(3, dtype=torch.float64))
