"""WEMoE: the weight combination, the routed blocks against hand-built modules, the router's gradient, routing per
example, saving and loading, test-time training, storage and the named errors."""

from __future__ import annotations

import json
import re

import pytest
import torch
from torch import nn

import transfuse
from transfuse.adapt.adamerging import prediction_entropy
from transfuse.errors import MissingTensorError, NonFiniteTensorError, ParameterError, ShapeMismatchError
from transfuse.routed.emr import emr_merge
from transfuse.routed.errors import RoutedFormatError, TaskIdsMismatchError
from transfuse.routed.model import RoutedModel
from transfuse.routed.storage import routed_storage
from transfuse.routed.store import save_routed
from transfuse.routed.wemoe import (
    RoutingOrderError,
    UnknownSubmoduleError,
    ensemble_weights,
    feed_forward_blocks,
    routing_weights,
    wemoe_merge,
)
from transfuse.routed.wemoe_storage import wemoe_storage_estimate
from transfuse.routed.wemoe_train import train_wemoe_router

from .conftest import TinyMLP, perturbed, tiny_bert


@pytest.fixture(autouse=True)
def one_thread():
    """These modules are tiny: a second intra-op thread only adds barrier waits (x100 per step on a busy CPU)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Layer(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.norm(x))


class MLPStack(nn.Module):
    """[B, (T,) 4] -> [B, (T,) 3]: an input layer, two residual MLP layers, a head."""

    def __init__(self, width: int = 6) -> None:
        super().__init__()
        self.inp = nn.Linear(4, width)
        self.layers = nn.ModuleList(Layer(width) for _ in range(2))
        self.head = nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for layer in self.layers:
            h = layer(h)
        return self.head(h)


BLOCKS = ["layers.0.mlp", "layers.1.mlp"]


def _stack(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return MLPStack().to(dtype)


@pytest.fixture
def stack_experts():
    base = {k: v.clone() for k, v in _stack().state_dict().items()}
    return base, {name: perturbed(base, seed) for seed, name in enumerate("abc", start=1)}


def _hand_merge(base, experts, lam, routed=(), weights=None):
    """theta_0 + lam * sum_k tau_k everywhere, except the `routed` tensors: theta_0 + sum_k weights[k] tau_k."""
    out = {}
    tasks = list(experts)
    for name, b in base.items():
        if not b.is_floating_point():
            out[name] = b.clone()
            continue
        coefficients = weights if any(name.startswith(r + ".") for r in routed) else [lam] * len(tasks)
        acc = b.clone()
        for task, c in zip(tasks, coefficients):
            acc = acc + c * (experts[task][name] - b)
        out[name] = acc
    return out


def _set_router_output(model, weights):
    """Make every router output exactly `weights` (output weight 0, bias = weights)."""
    with torch.no_grad():
        for block in model.parts.blocks:
            if block.router.out_weight is not None:
                block.router.out_weight.zero_()
            block.router.out_bias.copy_(torch.tensor(weights, dtype=block.router.out_bias.dtype))


# ------------------------------------------------------------------------------------------------ the formulas


def test_ensemble_weights_and_routing_weights_follow_their_formulas():
    g = torch.Generator().manual_seed(0)
    base, taus, w = (
        torch.randn(3, 5, generator=g),
        torch.randn(4, 3, 5, generator=g),
        torch.randn(2, 4, generator=g),
    )
    got = ensemble_weights(base, taus, w)
    for b in range(2):
        expected = base.clone()
        for k in range(4):
            expected += w[b, k] * taus[k]
        torch.testing.assert_close(got[b], expected)
    torch.testing.assert_close(ensemble_weights(base, taus, w[0]), got[0])
    gate = torch.randn(2, 5, 4, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    r = routing_weights(gate, mask)
    torch.testing.assert_close(r[0], (gate[0, 0] + gate[0, 1] + gate[0, 2]) / 3)
    torch.testing.assert_close(r[1], sum(gate[1, t] for t in range(5)) / 5)
    torch.testing.assert_close(routing_weights(gate), gate.sum(1) / 5)


# ------------------------------------------------------------------------------ routed blocks vs hand-built modules


@pytest.mark.parametrize("layers", [0, 2])
def test_one_hot_routing_equals_the_block_of_base_plus_that_task_vector(stack_experts, layers):
    base, experts = stack_experts
    model = wemoe_merge(base, experts, _stack(), BLOCKS, init_lambda=0.4, router_layers=layers)
    x = torch.randn(5, 7, 4, generator=torch.Generator().manual_seed(1))
    for i in range(len(experts)):
        one_hot = [1.0 if j == i else 0.0 for j in range(3)]
        _set_router_output(model, one_hot)
        plain = MLPStack()
        plain.load_state_dict(_hand_merge(base, experts, 0.4, routed=BLOCKS, weights=one_hot))
        with torch.no_grad():
            torch.testing.assert_close(model(x), plain(x), rtol=1e-6, atol=1e-6)


def test_bert_with_one_hot_routing_equals_hand_built_bert(bert_experts):
    module, base, experts = bert_experts
    blocks = feed_forward_blocks(module)
    assert blocks == [
        ("encoder.layer.0.intermediate", "encoder.layer.0.output.dense"),
        ("encoder.layer.1.intermediate", "encoder.layer.1.output.dense"),
    ]
    model = wemoe_merge(base, experts, module, blocks, init_lambda=0.3).eval()
    _set_router_output(model, [0.0, 1.0])
    routed = [m for b in blocks for m in b]
    plain = tiny_bert()
    plain.load_state_dict(_hand_merge(base, experts, 0.3, routed=routed, weights=[0.0, 1.0]))
    ids = torch.randint(0, 40, (3, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(
            model(input_ids=ids).last_hidden_state,
            plain(input_ids=ids).last_hidden_state,
            rtol=1e-5,
            atol=1e-5,
        )


def test_exact_init_is_the_task_arithmetic_merge(stack_experts):
    base, experts = stack_experts
    base64 = {k: v.double() for k, v in base.items()}
    experts64 = {t: {k: v.double() for k, v in s.items()} for t, s in experts.items()}
    model = wemoe_merge(
        base64, experts64, _stack(torch.float64), BLOCKS, init_lambda=0.3, router_init="exact"
    )
    plain = MLPStack().double()
    plain.load_state_dict(_hand_merge(base64, experts64, 0.3))  # every tensor, the MLPs too
    x = torch.randn(4, 9, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(model(x), plain(x), rtol=1e-12, atol=1e-12)
        # FusionBench's init (N(0, 0.01) output weights) is close to it, not equal
        near = wemoe_merge(base64, experts64, _stack(torch.float64), BLOCKS, init_lambda=0.3)(x)
    assert not torch.allclose(near, plain(x), rtol=0, atol=1e-12)
    torch.testing.assert_close(near, plain(x), rtol=0, atol=1e-2)


# ------------------------------------------------------------------------------------------- gradient, per example


@pytest.mark.parametrize("batch_reduce", [False, True])
def test_router_gradient_matches_finite_differences(stack_experts, batch_reduce):
    base, experts = stack_experts
    base64 = {k: v.double() for k, v in base.items()}
    experts64 = {t: {k: v.double() for k, v in s.items()} for t, s in experts.items()}
    model = wemoe_merge(base64, experts64, _stack(torch.float64), BLOCKS, router_layers=2)
    with torch.no_grad():  # larger router weights than the init, so every path carries gradient
        for p in model.parts.router_parameters():
            p.copy_(torch.randn(p.shape, dtype=p.dtype, generator=torch.Generator().manual_seed(p.numel())))
    model.parts.batch_reduce = batch_reduce
    params = list(model.parts.router_parameters())
    for p in params:
        p.requires_grad_(True)
    x = torch.randn(3, 5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(4))

    def loss() -> torch.Tensor:
        return prediction_entropy(model(x).mean(1)).mean()

    model.zero_grad()
    loss().backward()
    for p in (params[0], params[-1], model.parts.blocks[1].router.out_weight):
        flat = p.data.view(-1)
        for i in (0, flat.numel() // 2, flat.numel() - 1):
            saved = flat[i].item()
            with torch.no_grad():
                flat[i] = saved + 1e-6
                up = loss().item()
                flat[i] = saved - 1e-6
                down = loss().item()
                flat[i] = saved
            assert p.grad.view(-1)[i].item() == pytest.approx((up - down) / 2e-6, rel=1e-6, abs=1e-9)


def test_mixed_batch_gives_what_single_examples_give(stack_experts, bert_experts):
    base, experts = stack_experts
    model = wemoe_merge(base, experts, _stack(), BLOCKS)
    _randomise_routers(model)
    x = torch.randn(6, 5, 4, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        batch = model(x)
        singles = torch.cat([model(x[i : i + 1]) for i in range(6)])
        torch.testing.assert_close(batch, singles, rtol=1e-6, atol=1e-6)
        model.parts.batch_reduce = True  # one routing vector for the batch: different outputs
        assert not torch.allclose(model(x), batch, atol=1e-4)
    module, bert_base, bert_expert_states = bert_experts
    bert = wemoe_merge(
        bert_base, bert_expert_states, module, feed_forward_blocks(module), token_mask_kwarg="attention_mask"
    )
    bert.eval()
    _randomise_routers(bert)
    g = torch.Generator().manual_seed(6)
    ids = torch.randint(0, 40, (4, 8), generator=g)
    mask = torch.ones(4, 8, dtype=torch.long)
    mask[1, 5:] = 0
    with torch.no_grad():
        batch = bert(input_ids=ids, attention_mask=mask).last_hidden_state
        for i in range(4):
            n = int(mask[i].sum())  # alone and unpadded: the masked token mean sees the same tokens
            alone = bert(input_ids=ids[i : i + 1, :n], attention_mask=mask[i : i + 1, :n]).last_hidden_state
            torch.testing.assert_close(batch[i, :n], alone[0], rtol=1e-5, atol=1e-5)


def _randomise_routers(model, scale=0.5):
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in model.parts.router_parameters():
            p.add_(scale * torch.randn(p.shape, dtype=p.dtype, generator=g))


# ------------------------------------------------------------------------------------------------- save / load


def test_save_load_round_trip_is_bit_identical(bert_experts, stack_experts, tmp_path):
    module, base, experts = bert_experts
    model = wemoe_merge(base, experts, module, feed_forward_blocks(module)).eval()
    _randomise_routers(model)
    directory = save_routed(model, tmp_path / "bert")
    manifest = json.loads((directory / "manifest.json").read_text())
    assert manifest["method"] == "wemoe" and manifest["saved_router"] is True and manifest["router"] is False
    assert manifest["format_version"] == 1 and manifest["settings"]["router_layers"] == 2
    task_file = manifest["files"]["task-000.safetensors"]["tensors"]
    assert task_file["tau.encoder.layer.0.intermediate.dense.weight"] == {
        "dtype": "float32",
        "shape": [32, 16],
    }
    assert task_file["router.encoder.layer.1.intermediate.out_weight"] == {"dtype": "float32", "shape": [16]}
    assert task_file["router.encoder.layer.1.intermediate.out_bias"] == {"dtype": "float32", "shape": [1]}
    shared = manifest["files"]["shared.safetensors"]["tensors"]
    assert shared["router.encoder.layer.0.intermediate.hidden.0.weight"]["shape"] == [16, 16]
    loaded = transfuse.load(directory).eval()  # rebuilt from its config in train mode, as transformers does
    assert isinstance(loaded, RoutedModel) and loaded.tasks == model.tasks
    for (name, a), (name_b, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert name == name_b and torch.equal(a, b), name
    ids = torch.randint(0, 40, (3, 7), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).last_hidden_state, model(input_ids=ids).last_hidden_state)
    # any torch module (router_layers=0: one weight vector per block) with module=
    stack_base, stack_experts_ = stack_experts
    small = wemoe_merge(stack_base, stack_experts_, _stack(), BLOCKS, router_layers=0)
    _randomise_routers(small)
    again = transfuse.load(save_routed(small, tmp_path / "stack"), module=_stack(seed=5))
    x = torch.randn(2, 3, 4)
    with torch.no_grad():
        assert torch.equal(again(x), small(x))


def test_format_stays_readable_and_refuses_lying_manifests(bert_experts, mlp_experts, tmp_path):
    # an EMR directory written before "saved_router" existed still loads
    mlp_base, mlp_experts_ = mlp_experts
    emr_dir = save_routed(emr_merge(mlp_base, mlp_experts_, TinyMLP()), tmp_path / "emr")
    manifest = json.loads((emr_dir / "manifest.json").read_text())
    assert manifest["saved_router"] is False
    del manifest["saved_router"]
    (emr_dir / "manifest.json").write_text(json.dumps(manifest))
    assert transfuse.load(emr_dir, module=TinyMLP()).method == "emr"

    module, base, experts = bert_experts
    directory = save_routed(wemoe_merge(base, experts, module, feed_forward_blocks(module)), tmp_path / "w")
    with pytest.raises(ValueError, match="without router="):
        transfuse.load(directory, router=lambda *a, **k: "sst")
    original = (directory / "manifest.json").read_text()

    def edited(edit):
        manifest = json.loads(original)
        edit(manifest)
        (directory / "manifest.json").write_text(json.dumps(manifest))

    edited(lambda m: m.__setitem__("saved_router", False))
    with pytest.raises(RoutedFormatError, match="saved_router=False"):
        transfuse.load(directory)
    edited(lambda m: m.__setitem__("saved_router", "yes"))
    with pytest.raises(RoutedFormatError, match="saved_router"):
        transfuse.load(directory)
    edited(lambda m: m["settings"].__setitem__("router_layers", 1))  # the shared hidden layers are left over
    with pytest.raises(RoutedFormatError, match="no wemoe router"):
        transfuse.load(directory)
    edited(lambda m: m["settings"].__setitem__("blocks", [["encoder.layer.0.attention"]]))
    with pytest.raises(RoutedFormatError, match="no task vectors"):
        transfuse.load(directory)


# ----------------------------------------------------------------------------------------------------- training


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 8)
        self.mlp = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.inp(x))
        return h + self.mlp(h)


def _task_data(task: str, n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Separable tasks in separate regions: a labels by x0 > 0 around x2 = +3, b by x1 > 0 around x2 = -3."""
    x = torch.randn(n, 4, generator=g)
    x[:, 2] += 3.0 if task == "a" else -3.0
    return x, (x[:, 0 if task == "a" else 1] > 0).long()


def test_training_lowers_the_prediction_entropy():
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    base_module = Toy()
    base = {k: v.clone() for k, v in base_module.state_dict().items()}
    experts, heads = {}, {}
    for task in "ab":  # fine-tune one expert (trunk + its head) per task
        trunk, head = Toy(), nn.Linear(8, 2)
        trunk.load_state_dict(base)
        optimizer = torch.optim.Adam([*trunk.parameters(), *head.parameters()], lr=2e-2)
        for _ in range(40):
            x, y = _task_data(task, 64, g)
            optimizer.zero_grad()
            nn.functional.cross_entropy(head(trunk(x)), y).backward()
            optimizer.step()
        experts[task] = {k: v.detach().clone() for k, v in trunk.state_dict().items()}
        heads[task] = head.requires_grad_(False)
    model = wemoe_merge(base, experts, Toy(), ["mlp"], init_lambda=0.3)
    batches = {task: [_task_data(task, 32, g)[0] for _ in range(4)] for task in "ab"}

    def forward(m, task, x):
        return heads[task](m(x))

    result = train_wemoe_router(model, forward, batches, steps=40, lr=1e-2)
    assert result.steps == 40 and not result.stopped_by_time_budget
    first, last = sum(result.entropy[:3]) / 3, sum(result.entropy[-3:]) / 3
    print(f"entropy: first steps {first:.4f}, last steps {last:.4f}")
    assert last < 0.8 * first, (first, last)
    # afterwards it routes per example again, and the module stayed frozen
    assert model.parts.batch_reduce is False
    assert not any(p.requires_grad for p in [*model.module.parameters(), *model.parts.router_parameters()])
    with torch.no_grad():
        held_out = sum(prediction_entropy(forward(model, t, _task_data(t, 64, g)[0])).mean() for t in "ab")
    assert held_out < first


def test_time_budget_stops_after_one_step(stack_experts):
    base, experts = stack_experts
    model = wemoe_merge(base, experts, _stack(), BLOCKS)
    batches = {t: [torch.randn(2, 4)] for t in experts}
    result = train_wemoe_router(model, lambda m, t, x: m(x), batches, steps=50, time_budget_s=1e-9)
    assert result.steps == 1 and result.stopped_by_time_budget


# ------------------------------------------------------------------------------------------------------ storage


def test_storage_estimate_matches_the_counted_bytes(bert_experts):
    module, base, experts = bert_experts
    model = wemoe_merge(base, experts, module, feed_forward_blocks(module))
    counted = routed_storage(model)
    n = sum(t.numel() for t in base.values())
    routed = sum(
        t.numel()
        for name, t in base.items()
        if re.match(r"encoder\.layer\.\d\.(intermediate|output)\.dense\.", name)
    )
    estimate = wemoe_storage_estimate(n, routed, 2, 16, 2)
    assert counted.shared_bytes == estimate.shared_bytes == 4 * n + 2 * (16 * 16 + 16) * 4
    per_task = 4 * routed + 2 * (16 + 1) * 4
    assert counted.task_bytes == {"sst": per_task, "nli": per_task}
    assert estimate.task_bytes == {"task0": per_task, "task1": per_task}
    assert counted.full_experts_bytes == 2 * 4 * n


# -------------------------------------------------------------------------------------------------------- errors


def test_named_errors_for_bad_inputs(stack_experts):
    base, experts = stack_experts
    with pytest.raises(UnknownSubmoduleError, match="no submodule 'layers.2.mlp'"):
        wemoe_merge(base, experts, _stack(), ["layers.2.mlp"])
    with pytest.raises(UnknownSubmoduleError, match="no parameters"):
        wemoe_merge(base, experts, _stack(), ["layers.0.mlp.1"])  # the GELU
    bad = {**experts, "c": {**experts["c"], "layers.0.mlp.0.weight": torch.zeros(3, 3)}}
    with pytest.raises(ShapeMismatchError, match="layers.0.mlp.0.weight"):
        wemoe_merge(base, bad, _stack(), BLOCKS)
    missing = {**experts, "c": {k: v for k, v in experts["c"].items() if k != "head.bias"}}
    with pytest.raises(MissingTensorError, match="head.bias"):
        wemoe_merge(base, missing, _stack(), BLOCKS)
    nan = {**experts, "b": {**experts["b"], "head.weight": torch.full((3, 6), float("nan"))}}
    with pytest.raises(NonFiniteTensorError, match="head.weight holds NaN/Inf in task 'b'"):
        wemoe_merge(base, nan, _stack(), BLOCKS)
    with pytest.raises(ParameterError, match="K >= 1"):
        wemoe_merge(base, {}, _stack(), BLOCKS)
    with pytest.raises(ParameterError, match="router_layers"):
        wemoe_merge(base, experts, _stack(), BLOCKS, router_layers=-1)
    with pytest.raises(ParameterError, match="router_init"):
        wemoe_merge(base, experts, _stack(), BLOCKS, router_init="zeros")
    with pytest.raises(ParameterError, match="two blocks"):
        wemoe_merge(base, experts, _stack(), ["layers.0.mlp", "layers.0.mlp.0"])
    with pytest.raises(UnknownSubmoduleError, match="pass blocks="):
        feed_forward_blocks(TinyMLP())
    # a later member listed first: it runs before the router has weights for the batch
    wrong_order = wemoe_merge(base, experts, _stack(), [("layers.0.mlp.2", "layers.0.mlp.0")])
    with pytest.raises(RoutingOrderError, match="routed this batch"):
        wrong_order(torch.randn(2, 4))

    model = wemoe_merge(base, experts, _stack(), BLOCKS)
    with pytest.raises(TaskIdsMismatchError, match="without task_ids"):
        model(torch.randn(2, 4), task_ids="a")
    with pytest.raises(ValueError, match="router="):
        RoutedModel(model.module, model.parts, router=lambda *a: "a")
    forward = lambda m, t, x: m(x)  # noqa: E731
    batches = {t: [torch.randn(2, 4)] for t in experts}
    for kwargs, match in [
        ({"steps": 0}, "steps"),
        ({"steps": 1.5}, "steps"),
        ({"lr": 0.0}, "lr"),
        ({"time_budget_s": -1.0}, "time_budget_s"),
    ]:
        with pytest.raises(ParameterError, match=match):
            train_wemoe_router(model, forward, batches, **kwargs)
    with pytest.raises(ParameterError, match="missing \\['c'\\]"):
        train_wemoe_router(model, forward, {"a": batches["a"], "b": batches["b"]})
    with pytest.raises(ParameterError, match="empty"):
        train_wemoe_router(model, forward, {**batches, "a": []})
    with pytest.raises(ParameterError, match="wemoe_merge"):
        train_wemoe_router(emr_merge(base, experts, _stack()), forward, batches)
    with pytest.raises(ParameterError, match="integers >= 1"):
        wemoe_storage_estimate(10, 5, 0, 4, 2)
