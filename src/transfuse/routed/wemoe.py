"""WEMoE: weight-ensembling mixture of experts (Tang et al., "Merging Multi-Task Models via Weight-Ensembling
Mixture of Experts", ICML 2024, arXiv:2402.00433).

With task vectors ``tau_k = theta_k - theta_0`` (k = 1..K) and a scaling ``lambda`` (``init_lambda``):

- every tensor outside the chosen blocks is merged by task arithmetic: ``theta_0 + lambda * sum_k tau_k``;
- each chosen block (an MLP: BERT's ``intermediate`` + ``output.dense``, Llama's ``mlp``) keeps the base's
  weights and its experts' task vectors, and runs every example ``b`` with its own weights
  ``W_b = W_0 + sum_k r_bk tau_k``, where ``r_b = mean_t router(h_bt)`` is the block's router (a small MLP) on
  the block's input hidden states ``h_bt``, averaged over the example's tokens ``t``;
- router with L layers (``router_layers``, FusionBench's ``router_hidden_layers``): ``L = 0`` a learned vector
  ``r = b``; ``L = 1`` ``r = W h + b``; ``L = 2`` ``r = W_2 relu(W_1 h + b_1) + b_2`` (the default; L > 2 adds
  ``H x H`` ReLU layers).  No softmax: the weights are free scalars, initialised so that ``r ~= lambda``
  (``router_init="fusionbench"``: every weight ~ N(0, 0.01^2), hidden biases 0, output bias ``lambda``) or
  ``r = lambda`` exactly (``"exact"``: the output weight is 0, so at init the model IS the task-arithmetic merge);
- the routers are trained on unlabeled test inputs of every task by minimising the prediction entropy (see
  :mod:`transfuse.routed.wemoe_train`).

Checked with the `search` tool against FusionBench (github.com/tanganke/fusion_bench:
``fusion_bench/models/we_moe.py``, ``fusion_bench/method/we_moe/{we_moe,clip_we_moe}.py``,
``config/method/wemoe/weight_ensembling_moe.yaml``): the gate constructors and their init (std 0.01 normal
weights, zero hidden bias, output bias ``init_lambda``); no normalisation of the gate's output; the token-wise gate
outputs averaged over the sequence dimension (padding included: FusionBench passes no mask; here
``token_mask_kwarg="attention_mask"`` averages over real tokens only, an option); the rest of the model merged by
task arithmetic with ``scaling_factor = init_lambda`` and the MLPs built from the *base* model's MLPs; every
parameter of the MLP routed (weights and biases); one merge per batch (``batch_reduce``: the gate weights also
averaged over the batch) during test-time training and one merge per example afterwards; defaults
``init_lambda = 0.3``, 2 router layers, Adam, lr 1e-4, 1000 steps, batch 16 per task.

Architecture-generic: a block is a tuple of submodule paths (``("encoder.layer.0.intermediate",
"encoder.layer.0.output.dense")``); the router reads the first member's first input, every member's parameters
are routed with the same weights.  The module keeps its own structure and state dict (the merged weights, the
blocks' base weights); the routed members are swapped in only while :meth:`WEMoEParts.run` runs it, so
``save_routed`` writes an ordinary state dict and ``transfuse.load`` rebuilds a transformers model from its
config.  Per example means ``torch.func.vmap`` over the examples of ``functional_call(member, W_b, x_b)``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import torch
from torch import Tensor, nn

from transfuse.errors import (
    DtypeMismatchError,
    MissingTensorError,
    NonFiniteTensorError,
    NotSameBaseError,
    ParameterError,
    ShapeMismatchError,
)
from transfuse.routed.errors import ModuleMismatchError, RoutedError, RoutedFormatError
from transfuse.routed.model import RoutedModel

RouterInit = Literal["fusionbench", "exact"]
ROUTER_INITS: tuple[str, ...] = ("fusionbench", "exact")
#: FusionBench's init standard deviation of every router weight.
ROUTER_INIT_STD = 0.01


class WEMoEError(RoutedError):
    """Base class of the errors a WEMoE model raises on purpose."""


class UnknownSubmoduleError(WEMoEError):
    """A WEMoE block names a submodule the module does not have (or one without parameters)."""


class RoutingInputError(WEMoEError):
    """A routed block got an input the router cannot read (no tensor, wrong width, a mask of another shape)."""


class RoutingOrderError(WEMoEError):
    """A later member of a block ran before the block's first member computed the routing weights."""


# ---------------------------------------------------------------------------------------------------------------
# the math: small pure functions over tensors


def routing_weights(gate: Tensor, token_mask: Tensor | None = None) -> Tensor:
    """Per-example routing weights ``r [B, K]`` from the router's outputs ``gate``.

    ``gate [B, T, K]`` (one output per token): ``r_b = mean_t gate_bt`` (FusionBench), or with ``token_mask
    [B, T]`` (1 = real token) ``r_b = sum_t m_bt gate_bt / max(sum_t m_bt, 1)``.  ``gate [B, K]`` (inputs without
    a token axis) is returned as it is."""
    if gate.dim() == 2:
        return gate
    if gate.dim() != 3:
        raise RoutingInputError(
            f"router outputs must be [batch, tokens, K] or [batch, K], got {tuple(gate.shape)}"
        )
    if token_mask is None:
        return gate.mean(dim=1)
    if tuple(token_mask.shape) != tuple(gate.shape[:2]):
        raise RoutingInputError(
            f"the token mask is {tuple(token_mask.shape)} but the block's input is {tuple(gate.shape[:2])} "
            "(batch, tokens); pass a [batch, tokens] mask or build the model with token_mask_kwarg=None"
        )
    m = token_mask.to(gate.dtype).unsqueeze(-1)
    return (gate * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)


def ensemble_weights(base: Tensor, task_vectors: Tensor, weights: Tensor) -> Tensor:
    """Weight ensembling: ``W_b = W_0 + sum_k weights[b, k] * tau_k``.

    ``base [*shape]``, ``task_vectors [K, *shape]``, ``weights [B, K]`` -> ``[B, *shape]`` (or ``weights [K]`` ->
    ``[*shape]``), in the dtype of ``task_vectors``; differentiable in ``weights``."""
    k = task_vectors.shape[0]
    if weights.shape[-1] != k or weights.dim() not in (1, 2):
        raise ShapeMismatchError(f"routing weights {tuple(weights.shape)} do not match {k} task vectors")
    flat = task_vectors.reshape(k, -1)
    combined = weights.to(flat.dtype) @ flat
    out = base.to(flat.dtype).reshape(-1) + combined
    return out.reshape(*weights.shape[:-1], *base.shape)


def task_arithmetic_tensor(base: Tensor, task_vectors: Tensor, scaling: float) -> Tensor:
    """Task arithmetic (Ilharco et al., ICLR 2023), the merge of every tensor outside the blocks:
    ``theta_0 + scaling * sum_k tau_k`` computed in the dtype of ``task_vectors``, returned in the base's."""
    return (base.to(task_vectors.dtype) + scaling * task_vectors.sum(0)).to(base.dtype)


# ---------------------------------------------------------------------------------------------------------------
# the router and one routed block


class WEMoERouter(nn.Module):
    """``layers`` Linear layers from the block's input width ``in_features`` to ``num_experts`` outputs:
    ``(layers - 1)`` hidden ``Linear(in, in)`` + ReLU, then ``out_weight [K, in]`` / ``out_bias [K]``
    (``layers = 0``: ``out_bias`` alone, one weight vector for every input)."""

    def __init__(
        self,
        in_features: int,
        num_experts: int,
        *,
        layers: int = 2,
        init_lambda: float = 0.3,
        init: RouterInit = "fusionbench",
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.in_features, self.num_experts, self.layers = in_features, num_experts, layers
        self.hidden = nn.ModuleList(
            nn.Linear(in_features, in_features, dtype=dtype) for _ in range(max(layers - 1, 0))
        )
        self.out_weight = (
            nn.Parameter(torch.empty(num_experts, in_features, dtype=dtype)) if layers > 0 else None
        )
        self.out_bias = nn.Parameter(torch.empty(num_experts, dtype=dtype))
        with torch.no_grad():
            for linear in self.hidden:
                linear.weight.normal_(0.0, ROUTER_INIT_STD, generator=generator)
                linear.bias.zero_()
            if self.out_weight is not None:
                if init == "exact":
                    self.out_weight.zero_()
                else:
                    self.out_weight.normal_(0.0, ROUTER_INIT_STD, generator=generator)
            self.out_bias.fill_(init_lambda)
        # inference builds no graph; train_wemoe_router switches the gradients on while it trains
        self.requires_grad_(False)

    def forward(self, hidden_states: Tensor) -> Tensor:
        """``[..., in] -> [..., K]``."""
        if self.out_weight is None:
            return self.out_bias.expand(*hidden_states.shape[:-1], self.num_experts)
        h = hidden_states.to(self.out_bias.dtype)
        for linear in self.hidden:
            h = torch.relu(linear(h))
        return nn.functional.linear(h, self.out_weight, self.out_bias)


class WEMoEBlock(nn.Module):
    """One routed block: its member submodules (paths in the module), their routed parameters' task vectors
    ``tau_j [K, *shape]`` (buffers, in the compute dtype) and the router.  While the module runs, the first
    member stores the routing weights of the current batch here and every member reads them."""

    def __init__(
        self,
        members: tuple[str, ...],
        param_names: tuple[tuple[int, str], ...],
        task_vectors: Sequence[Tensor],
        router: WEMoERouter,
    ) -> None:
        super().__init__()
        self.members = members
        self.param_names = param_names  # (member index, name inside the member)
        for j, tau in enumerate(task_vectors):
            self.register_buffer(f"tau_{j}", tau)
        self.router = router
        self.weights: Tensor | None = None
        self.token_mask: Tensor | None = None
        self.batch_reduce = False

    def full_name(self, j: int) -> str:
        member, local = self.param_names[j]
        return f"{self.members[member]}.{local}"

    def task_vector(self, j: int) -> Tensor:
        return getattr(self, f"tau_{j}")

    def route(self, hidden_states: Tensor) -> None:
        """Compute and keep this batch's routing weights from the first member's input."""
        width_ok = self.router.layers == 0 or hidden_states.shape[-1] == self.router.in_features
        if hidden_states.dim() < 2 or not width_ok:
            raise RoutingInputError(
                f"block {self.members[0]!r}: its input is {tuple(hidden_states.shape)}, the router reads "
                f"[batch, (tokens,) {self.router.in_features}]"
            )
        if hidden_states.dim() > 3:
            raise RoutingInputError(
                f"block {self.members[0]!r}: input {tuple(hidden_states.shape)} has more than one token axis"
            )
        weights = routing_weights(self.router(hidden_states), self.token_mask)
        self.weights = weights.mean(0) if self.batch_reduce else weights


class _RoutedMember(nn.Module):
    """Stands in for a block member while the module runs: ``member(x)`` with ``W_b`` per example."""

    def __init__(self, inner: nn.Module, block: WEMoEBlock, index: int) -> None:
        super().__init__()
        # kept out of _modules, so the module's parameter names do not change while this stands in
        object.__setattr__(self, "inner", inner)
        object.__setattr__(self, "block", block)
        self.index = index
        self.locals = [(j, local) for j, (m, local) in enumerate(block.param_names) if m == index]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        block: WEMoEBlock = self.block
        if self.index == 0:
            if not args or not isinstance(args[0], Tensor):
                raise RoutingInputError(
                    f"block {block.members[0]!r} was called without a tensor as its first argument: the router "
                    "reads the first member's hidden states"
                )
            block.route(args[0])
        weights = block.weights
        if weights is None:
            raise RoutingOrderError(
                f"{block.members[self.index]!r} ran before {block.members[0]!r} routed this batch; list a "
                "block's members in the order the module calls them"
            )
        own = dict(self.inner.named_parameters())
        params = {
            local: ensemble_weights(own[local], block.task_vector(j), weights).to(own[local].dtype)
            for j, local in self.locals
        }
        if weights.dim() == 1:  # one merge for the batch
            return torch.func.functional_call(self.inner, params, args, kwargs)
        batch = weights.shape[0]
        dims = tuple(
            0 if isinstance(a, Tensor) and a.dim() > 0 and a.shape[0] == batch else None for a in args
        )
        if dims[0] != 0:
            raise RoutingInputError(
                f"{block.members[self.index]!r}: its first input has no batch dimension of {batch} rows"
            )
        inner = self.inner

        def one_example(p: dict[str, Tensor], *xs: Any) -> Any:
            xs = tuple(x.unsqueeze(0) if d == 0 else x for x, d in zip(xs, dims))
            out = torch.func.functional_call(inner, p, xs, kwargs)
            return torch.utils._pytree.tree_map(lambda t: t.squeeze(0) if isinstance(t, Tensor) else t, out)

        return torch.func.vmap(one_example, in_dims=(0, *dims), randomness="different")(params, *args)


# ---------------------------------------------------------------------------------------------------------------
# the parts beside the module (what RoutedModel and save_routed see)


class WEMoEParts(nn.Module):
    """WEMoE's parts beside the shared module: one :class:`WEMoEBlock` per block (task vectors + router).

    ``routes_examples = True``: the model picks each example's weights itself, so :class:`RoutedModel` calls
    :meth:`run` without task ids.  Saved as: shared = the routers' hidden layers, per task k = its task vectors of
    the routed tensors (``tau.<name>``) and its router rows (``router.<block>.out_weight`` ``[in]``,
    ``router.<block>.out_bias`` ``[1]``), ``<block>`` being the first member's path."""

    method = "wemoe"
    routes_examples = True

    def __init__(
        self,
        tasks: tuple[str, ...],
        blocks: Sequence[WEMoEBlock],
        *,
        init_lambda: float,
        router_init: str,
        token_mask_kwarg: str | None,
    ) -> None:
        super().__init__()
        self.tasks = tuple(tasks)
        self.blocks = nn.ModuleList(blocks)
        self.init_lambda = float(init_lambda)
        self.router_init = router_init
        self.token_mask_kwarg = token_mask_kwarg
        self.routed_names = tuple(b.full_name(j) for b in blocks for j in range(len(b.param_names)))

    # -- running -----------------------------------------------------------------------------------------------
    @property
    def batch_reduce(self) -> bool:
        return bool(self.blocks[0].batch_reduce)

    @batch_reduce.setter
    def batch_reduce(self, value: bool) -> None:
        for block in self.blocks:
            block.batch_reduce = bool(value)

    def router_parameters(self) -> Iterator[nn.Parameter]:
        for block in self.blocks:
            yield from block.router.parameters()

    def run(self, module: nn.Module, args: tuple, kwargs: dict) -> Any:
        """``module(*args, **kwargs)`` with every block's members routed (swapped in for this call only)."""
        mask = kwargs.get(self.token_mask_kwarg) if self.token_mask_kwarg else None
        with self._installed(module):
            for block in self.blocks:
                block.token_mask = mask
            try:
                return module(*args, **kwargs)
            finally:
                for block in self.blocks:
                    block.weights = None
                    block.token_mask = None

    @contextmanager
    def _installed(self, module: nn.Module) -> Iterator[None]:
        swapped: list[tuple[nn.Module, str, nn.Module]] = []
        try:
            for block in self.blocks:
                for i, path in enumerate(block.members):
                    parent_path, _, leaf = path.rpartition(".")
                    parent = module.get_submodule(parent_path) if parent_path else module
                    inner = getattr(parent, leaf)
                    setattr(parent, leaf, _RoutedMember(inner, block, i))
                    swapped.append((parent, leaf, inner))
            yield
        finally:
            for parent, leaf, inner in reversed(swapped):
                setattr(parent, leaf, inner)

    def materialise(self, task: str, base: Mapping[str, Tensor]) -> dict[str, Tensor]:
        raise RoutedError(
            "wemoe routes every example itself; there are no per-task parameters to materialise"
        )

    # -- saving ------------------------------------------------------------------------------------------------
    def shared_tensors(self) -> dict[str, Tensor]:
        out = {}
        for block in self.blocks:
            for name, t in block.router.hidden.named_parameters():
                out[f"router.{block.members[0]}.hidden.{name}"] = t.detach()
        return out

    def task_tensors(self, task: str) -> dict[str, Tensor]:
        k = self.tasks.index(task)
        out = {}
        for block in self.blocks:
            for j in range(len(block.param_names)):
                out[f"tau.{block.full_name(j)}"] = block.task_vector(j)[k]
            router = block.router
            if router.out_weight is not None:
                out[f"router.{block.members[0]}.out_weight"] = router.out_weight.detach()[k]
            out[f"router.{block.members[0]}.out_bias"] = router.out_bias.detach()[k : k + 1]
        return out

    def settings(self) -> dict[str, Any]:
        return {
            "blocks": [list(b.members) for b in self.blocks],
            "router_layers": self.blocks[0].router.layers,
            "init_lambda": self.init_lambda,
            "router_init": self.router_init,
            "token_mask_kwarg": self.token_mask_kwarg,
        }

    @classmethod
    def from_saved(
        cls,
        tasks: tuple[str, ...],
        shared: Mapping[str, Tensor],
        per_task: Mapping[str, Mapping[str, Tensor]],
        settings: Mapping[str, Any],
        base: Mapping[str, Tensor],
    ) -> WEMoEParts:
        """Rebuild from what :meth:`shared_tensors` / :meth:`task_tensors` wrote, checking every piece against the
        settings, the others and the base (a :class:`RoutedFormatError` names the first that does not fit)."""
        blocks_setting = settings.get("blocks")
        layers = settings.get("router_layers")
        mask_kwarg = settings.get("token_mask_kwarg")
        if (
            not isinstance(blocks_setting, list)
            or not blocks_setting
            or not all(
                isinstance(b, list) and b and all(isinstance(m, str) for m in b) for b in blocks_setting
            )
        ):
            raise RoutedFormatError(f"wemoe blocks {blocks_setting!r} are not lists of submodule paths")
        if isinstance(layers, bool) or not isinstance(layers, int) or layers < 0:
            raise RoutedFormatError(f"wemoe router_layers {layers!r} is not an integer >= 0")
        if mask_kwarg is not None and not isinstance(mask_kwarg, str):
            raise RoutedFormatError(f"wemoe token_mask_kwarg {mask_kwarg!r} is not a name or null")
        init_lambda = settings.get("init_lambda")
        if not isinstance(init_lambda, (int, float)) or isinstance(init_lambda, bool):
            raise RoutedFormatError(f"wemoe init_lambda {init_lambda!r} is not a number")
        k = len(tasks)
        expected_shared: set[str] = set()
        blocks = []
        for members in blocks_setting:
            members = tuple(members)
            key = members[0]
            saved = [n.removeprefix("tau.") for n in per_task[tasks[0]] if n.startswith("tau.")]
            names = sorted(
                (i, n.removeprefix(m + "."))
                for i, m in enumerate(members)
                for n in saved
                if n.startswith(m + ".")
            )
            if not names:
                raise RoutedFormatError(f"wemoe block {members} has no task vectors in the task files")
            for i, local in names:
                if f"{members[i]}.{local}" not in base:
                    raise RoutedFormatError(
                        f"tau.{members[i]}.{local} routes a tensor base.safetensors lacks"
                    )
            taus = []
            for i, local in names:
                full = f"{members[i]}.{local}"
                rows = [_saved(per_task, t, f"tau.{full}") for t in tasks]
                for t, row in zip(tasks, rows):
                    if tuple(row.shape) != tuple(base[full].shape) or not row.is_floating_point():
                        raise RoutedFormatError(
                            f"task {t!r}: tau.{full} is {row.dtype} {tuple(row.shape)}, expected a float tensor of "
                            f"the base's shape {tuple(base[full].shape)}"
                        )
                taus.append(torch.stack(rows))
            dtype = taus[0].dtype
            bias_rows = [_saved(per_task, t, f"router.{key}.out_bias") for t in tasks]
            weight_rows = [_saved(per_task, t, f"router.{key}.out_weight") for t in tasks] if layers else []
            in_features = int(weight_rows[0].shape[0]) if weight_rows else 0
            router = WEMoERouter(in_features, k, layers=layers, dtype=dtype)
            with torch.no_grad():
                for h, linear in enumerate(router.hidden):
                    for pname in ("weight", "bias"):
                        name = f"router.{key}.hidden.{h}.{pname}"
                        expected_shared.add(name)
                        t = shared.get(name)
                        p = getattr(linear, pname)
                        if t is None or tuple(t.shape) != tuple(p.shape):
                            raise RoutedFormatError(
                                f"shared tensor {name} is {None if t is None else tuple(t.shape)}, expected "
                                f"{tuple(p.shape)}"
                            )
                        p.copy_(t)
                _copy_rows(router.out_bias, bias_rows, f"router.{key}.out_bias", (1,))
                if router.out_weight is not None:
                    _copy_rows(router.out_weight, weight_rows, f"router.{key}.out_weight", (in_features,))
            blocks.append(WEMoEBlock(members, tuple(names), taus, router))
        extra = sorted(set(shared) - expected_shared)
        if extra:
            raise RoutedFormatError(f"shared.safetensors holds {extra[:3]}, which no wemoe router has")
        parts = cls(
            tasks,
            blocks,
            init_lambda=float(init_lambda),
            router_init=str(settings.get("router_init", "fusionbench")),
            token_mask_kwarg=mask_kwarg,
        )
        for t in tasks:
            unused = sorted(set(per_task[t]) - set(parts.task_tensors(t)))
            if unused:
                raise RoutedFormatError(f"task {t!r} holds {unused[:3]}, which the wemoe blocks do not use")
        return parts


def _saved(per_task: Mapping[str, Mapping[str, Tensor]], task: str, name: str) -> Tensor:
    t = per_task[task].get(name)
    if t is None:
        raise RoutedFormatError(f"task {task!r} lacks {name}, which its wemoe block needs")
    return t


def _copy_rows(param: Tensor, rows: list[Tensor], name: str, shape: tuple[int, ...]) -> None:
    for k, row in enumerate(rows):
        if tuple(row.shape) != shape or not row.is_floating_point():
            raise RoutedFormatError(
                f"{name} is {row.dtype} {tuple(row.shape)} in a task file, expected float {shape}"
            )
        param[k : k + 1].copy_(row.reshape(param[k : k + 1].shape))


# ---------------------------------------------------------------------------------------------------------------
# building a WEMoE model


def feed_forward_blocks(module: nn.Module) -> list[tuple[str, ...]]:
    """The feed-forward blocks of a transformer, by module names: BERT-style ``<layer>.intermediate`` with its
    sibling ``<layer>.output.dense`` (one block of two members), and every ``<...>.mlp`` (Llama, Mistral, Qwen,
    GPT-2, CLIP).  Raises :class:`UnknownSubmoduleError` when there is none (then name the blocks yourself)."""
    names = dict(module.named_modules())
    blocks: list[tuple[str, ...]] = []
    for name in names:
        parent, _, leaf = name.rpartition(".")
        prefix = f"{parent}." if parent else ""
        if leaf == "intermediate" and f"{prefix}output.dense" in names:
            blocks.append((name, f"{prefix}output.dense"))
        elif leaf == "mlp" and not any(name.startswith(b[0] + ".") for b in blocks):
            blocks.append((name,))
    if not blocks:
        raise UnknownSubmoduleError(
            f"{type(module).__name__} has no '<layer>.intermediate' + 'output.dense' or '<layer>.mlp' submodules; "
            "pass blocks=[(path, ...), ...] naming each feed-forward block's submodules"
        )
    return blocks


def _resolve_blocks(
    module: nn.Module, blocks: Sequence[str | Sequence[str]]
) -> list[tuple[tuple[str, ...], list[tuple[int, str]]]]:
    if isinstance(blocks, str) or not isinstance(blocks, Sequence) or not blocks:
        raise ParameterError(
            "blocks must be a non-empty list of blocks, each a submodule path or a tuple of paths "
            "(e.g. feed_forward_blocks(module))"
        )
    modules = dict(module.named_modules())
    params = dict(module.named_parameters(remove_duplicate=False))
    seen: dict[str, str] = {}
    resolved = []
    for spec in blocks:
        members = (spec,) if isinstance(spec, str) else tuple(spec)
        if not members or not all(isinstance(m, str) and m for m in members):
            raise ParameterError(f"block {spec!r} must be a submodule path or a non-empty tuple of paths")
        names: list[tuple[int, str]] = []
        for i, path in enumerate(members):
            if path not in modules:
                close = [n for n in modules if n.endswith(path.rpartition(".")[2])][:3]
                raise UnknownSubmoduleError(
                    f"the module has no submodule {path!r}"
                    + (f" (similar: {close})" if close else "")
                    + "; name submodules as module.named_modules() does"
                )
            own = [n for n in params if n.startswith(path + ".")]
            if not own:
                raise UnknownSubmoduleError(f"submodule {path!r} has no parameters to route")
            for n in own:
                if n in seen:
                    raise ParameterError(
                        f"{n} is in two blocks ({seen[n]!r} and {members[0]!r}); blocks must not overlap"
                    )
                seen[n] = members[0]
                names.append((i, n.removeprefix(path + ".")))
        resolved.append((members, sorted(names)))  # sorted: the order from_saved rebuilds from the files
    return resolved


def _router_width(module: nn.Module, first_member: str) -> int:
    for m in module.get_submodule(first_member).modules():
        if isinstance(m, nn.Linear):
            return m.in_features
    raise UnknownSubmoduleError(
        f"block {first_member!r} has no nn.Linear whose input width the router could take; make the block's first "
        "member a module that starts with a Linear layer"
    )


def _check_experts(base_state: Mapping[str, Tensor], experts: Mapping[str, Mapping[str, Tensor]]) -> None:
    if not isinstance(experts, Mapping) or not experts:
        raise ParameterError("wemoe_merge needs at least one expert (K >= 1): {task name: state dict}")
    for task, state in experts.items():
        if not isinstance(task, str) or not task:
            raise ParameterError(f"task names must be non-empty strings, got {task!r}")
        missing = [n for n in base_state if n not in state]
        if missing:
            raise MissingTensorError(
                f"task {task!r} lacks {missing[0]!r} (and {len(missing) - 1} more) of the base; every expert "
                "must have the base's tensors"
            )
        extra = sorted(set(state) - set(base_state))
        if extra:
            raise NotSameBaseError(f"task {task!r} has tensors the base lacks ({extra[:3]}): drop them")
        for name, b in base_state.items():
            t = state[name]
            if not isinstance(t, Tensor):
                raise DtypeMismatchError(f"task {task!r}: {name} is a {type(t).__name__}, not a tensor")
            if t.shape != b.shape:
                raise ShapeMismatchError(
                    f"task {task!r}: {name} has shape {tuple(t.shape)}, the base {tuple(b.shape)}"
                )
            if t.is_floating_point() != b.is_floating_point():
                raise DtypeMismatchError(f"task {task!r}: {name} is {t.dtype}, the base {b.dtype}")
            if not b.is_floating_point() and not torch.equal(t, b):
                raise NotSameBaseError(f"task {task!r}: the non-float tensor {name} differs from the base's")


def wemoe_merge(
    base_state: Mapping[str, Tensor],
    task_state_dicts: Mapping[str, Mapping[str, Tensor]],
    module: nn.Module,
    blocks: Sequence[str | Sequence[str]],
    *,
    init_lambda: float = 0.3,
    router_layers: int = 2,
    router_init: RouterInit = "fusionbench",
    token_mask_kwarg: str | None = None,
    seed: int = 0,
) -> RoutedModel:
    """Build a WEMoE :class:`RoutedModel` over `module` (which must have the base's structure) from the experts
    ``task_state_dicts`` (task name -> state dict) of ``base_state``.

    ``blocks``: the routed blocks, each a submodule path or a tuple of paths run in that order (the first one's
    first input feeds the router), e.g. :func:`feed_forward_blocks`.  Every parameter of a block's members is
    routed; every other float tensor becomes ``theta_0 + init_lambda * sum_k tau_k``.  The module receives those
    tensors (``load_state_dict(assign=True)``) and is frozen (``requires_grad_(False)``); only the routers train
    (:func:`transfuse.routed.wemoe_train.train_wemoe_router`).  ``token_mask_kwarg``: the forward keyword whose
    ``[batch, tokens]`` mask limits the token mean to real tokens (``"attention_mask"``), None for FusionBench's
    plain mean.  Task vectors and routers are kept in float32 (float64 for a float64 base).

    Errors, before any work: :class:`ParameterError` (no expert, bad options or block specs),
    :class:`UnknownSubmoduleError`, :class:`MissingTensorError` / :class:`ShapeMismatchError` /
    :class:`DtypeMismatchError` / :class:`NotSameBaseError` / :class:`NonFiniteTensorError` for experts that do
    not fit the base, :class:`ModuleMismatchError` for a module of another structure."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch nn.Module, got {type(module).__name__}")
    if (
        isinstance(init_lambda, bool)
        or not isinstance(init_lambda, (int, float))
        or not math.isfinite(init_lambda)
    ):
        raise ParameterError(f"init_lambda must be a finite number (0.3 in FusionBench), got {init_lambda!r}")
    if isinstance(router_layers, bool) or not isinstance(router_layers, int) or router_layers < 0:
        raise ParameterError(
            f"router_layers must be an integer >= 0 (2 in FusionBench), got {router_layers!r}"
        )
    if router_init not in ROUTER_INITS:
        raise ParameterError(f"router_init must be one of {ROUTER_INITS}, got {router_init!r}")
    if token_mask_kwarg is not None and not isinstance(token_mask_kwarg, str):
        raise ParameterError(f"token_mask_kwarg must be a keyword name or None, got {token_mask_kwarg!r}")
    _check_experts(base_state, task_state_dicts)
    resolved = _resolve_blocks(module, blocks)
    state_names = set(module.state_dict())
    if state_names != set(base_state):
        diff = sorted(state_names ^ set(base_state))
        raise ModuleMismatchError(
            f"the module's tensors differ from the base's ({diff[:3]}); pass a module of the base's architecture"
        )
    tasks = tuple(task_state_dicts)
    experts = [task_state_dicts[t] for t in tasks]
    routed = {f"{members[i]}.{local}" for members, names in resolved for i, local in names}
    generator = torch.Generator().manual_seed(seed)

    merged: dict[str, Tensor] = {}
    with torch.no_grad():
        for name, b in base_state.items():
            if not b.is_floating_point() or name in routed:
                merged[name] = b.detach().clone()
                continue
            taus = _task_vectors(name, b.detach(), experts, tasks)
            merged[name] = task_arithmetic_tensor(b.detach(), taus, float(init_lambda))
        built = []
        for members, names in resolved:
            taus = []
            for i, local in names:
                full = f"{members[i]}.{local}"
                taus.append(_task_vectors(full, base_state[full].detach(), experts, tasks))
            router = WEMoERouter(
                _router_width(module, members[0]),
                len(tasks),
                layers=router_layers,
                init_lambda=float(init_lambda),
                init=router_init,
                generator=generator,
                dtype=taus[0].dtype,
            )
            built.append(WEMoEBlock(members, tuple(names), taus, router))
    try:
        module.load_state_dict(merged, strict=True, assign=True)
    except RuntimeError as exc:
        raise ModuleMismatchError(
            f"the module does not have the base's structure: {exc}; pass a module of the base's architecture"
        ) from exc
    module.requires_grad_(False)
    parts = WEMoEParts(
        tasks,
        built,
        init_lambda=float(init_lambda),
        router_init=router_init,
        token_mask_kwarg=token_mask_kwarg,
    )
    return RoutedModel(module, parts)


def _compute_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _task_vectors(
    name: str, base: Tensor, experts: Sequence[Mapping[str, Tensor]], tasks: tuple[str, ...]
) -> Tensor:
    """``[K, *shape]`` stack of ``theta_k - theta_0`` for one tensor, in the compute dtype, checked finite by one
    reduction (a full scan only to name the expert when it is not: 10.9 s -> 0.5 s of a MiniLM x 8 build)."""
    taus = torch.stack([e[name].detach() for e in experts]).to(_compute_dtype(base))
    taus.sub_(base.to(taus.dtype))
    if not bool(torch.isfinite(taus.sum())):
        bad = [t for t, e in zip(tasks, experts) if not bool(torch.isfinite(e[name]).all())]
        where = f"task {bad[0]!r}" if bad else "the base"
        raise NonFiniteTensorError(f"{name} holds NaN/Inf in {where}; fix that model")
    return taus
