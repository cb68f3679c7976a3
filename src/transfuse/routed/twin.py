"""Twin-Merging (Lu et al., "Twin-Merging: Dynamic Integration of Modular Expertise in Model Merging", NeurIPS
2024, arXiv:2406.15479): a shared expert plus each task's compressed exclusive knowledge, mixed per input by a
router.

With experts ``theta_i`` (i = 1..K) fine-tuned from ``theta_0``:

- **shared expert** ``theta_* = theta_0 + lambda * sum_i (theta_i - theta_0)`` (task arithmetic, ``lambda =
  scaling``, 0.3), or any merge the caller gives as ``shared_state`` (e.g. TIES);
- **exclusive knowledge** ``v_i = theta_i - theta_*``, per tensor; a 2-D tensor keeps its truncated SVD
  ``v_i ~= U_i S_i V_i^T`` (``U_i [m, r]``, ``S_i [r]``, ``V_i^T [r, n]``), with ``r = rank`` (at most
  ``min(m, n)``: smaller matrices are kept whole), or the fewest singular values whose squares keep a share
  ``energy`` of ``sum_j s_j^2``, or by default the authors' ``floor(0.1 * min(m, n))`` (at least 1); every other
  tensor (biases, LayerNorm weights, conv kernels) keeps ``v_i`` exactly;
- **router**: the authors' MLP ``Linear(D, H) - BatchNorm - LeakyReLU - Dropout(0.5) - Linear(H, H) - BatchNorm -
  LeakyReLU - Dropout(0.5) - Linear(H, K)`` (``H = 2D``) on the shared model's features of the input (its last
  hidden state averaged over the tokens), trained by cross-entropy to name the input's task
  (:mod:`transfuse.routed.twin_train`);
- **inference**, per example b: ``w_b = softmax(router(features_b))`` and
  ``theta_b = theta_* + sum_i w_bi * U_i S_i V_i^T`` (``+ sum_i w_bi v_i`` for the tensors kept whole).

Checked with the `search` tool against the authors' code (github.com/LZY-the-boys/Twin-Merging:
``discriminative/{twin_merge.py,sparsify.py,router.py,run.sh,scripts.sh,config/twin_merge.yml}`` and
``generative/eval_twin.py``): the shared expert is task arithmetic (scaling 0.29 for GLUE); the twin vector is
``model - merged`` per tensor; ``sparsify.svd`` keeps ``int(density * len(S))`` singular values of each 2-D tensor
(density ``1 - mask_rate = 0.1``) and returns 1-D tensors unchanged; the router is the MLP above (hidden
``2 * embed_dims``), fed the mean over the tokens of the shared model's last hidden state, trained with
cross-entropy (lr 5e-4, batch 1024, 50 epochs); the weights are a plain ``softmax`` of the router's logits (no
temperature, no top-k).  Departures: the authors exclude biases (and the classifier) from the merge with
``exclude_param ".*bias.*"`` and then take them from the fine-tuned model of the example's own task, which needs
the task id; here biases are routed like the other 1-D tensors, so no task id is needed.  They train the router
on up to 5,500 train examples per task and keep the epoch that scores best on the test set; here the router is
trained on data the caller gives (the bench: validation splits) for a fixed number of epochs.  Rank at least 1
(``int(0.1 * min(m, n))`` is 0 for a matrix narrower than 10, where the authors keep nothing).

Per example without materialising ``theta_b``: every ``nn.Linear`` holding routed tensors adds
``sum_i w_bi U_i (S_i (V_i^T x))`` (+ ``w_b @ [v_i(bias)]``) to its output, every ``nn.Embedding``
``sum_i w_bi U_i[ids] S_i V_i^T``, both exact: one matmul against the K tasks' factors stacked to
``[R, in]`` / ``[out, R]`` (``R = sum_i r_i``), each column scaled by its task's weight.  Any other submodule
holding routed tensors (LayerNorm, conv, a custom module) runs per example with its own ``theta_b`` by
``torch.func.vmap`` (or a loop over the examples when routed submodules lie inside it).  Inputs are batch-first:
an input whose first dimension is the batch size is split per example, one with first dimension 1 (BERT's
position ids) is shared by every example.  The routed pass runs after a pass through the shared model that
computes ``w`` (the router reads the shared model's output), as the authors do: about 2-3x a plain forward.

Without task ids the router picks the weights.  :class:`~transfuse.routed.model.RoutedModel` reserves
``task_ids=`` for methods that materialise one task at a time, so the task of each example, or explicit weights,
are given as ``model(..., routing_tasks="sst2" | ["sst2", "mnli", ...])`` (one-hot weights: ``theta_* +
U_i S_i V_i^T``) or ``model(..., routing_weights=w)`` (``w [K]`` for the batch or ``[B, K]``, used as given).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from transfuse.errors import NonFiniteTensorError, ParameterError
from transfuse.routed.emr import _check_experts
from transfuse.routed.errors import (
    ModuleMismatchError,
    RoutedError,
    RoutedFormatError,
    TaskIdsMismatchError,
    UnknownTaskError,
)
from transfuse.routed.model import RoutedModel, _scatter_rows, _take_rows

#: The authors' default share of each matrix's singular values (``mask_rate = 0.9`` in their scripts).
DEFAULT_RANK_SHARE = 0.1
#: The authors' router: hidden width ``2 * D``, dropout 0.5 after each hidden layer.
ROUTER_WIDTH_FACTOR = 2
ROUTER_DROPOUT = 0.5
#: Keywords of ``model(...)`` that give each example's task or weights instead of the router.
ROUTING_TASKS_KWARG = "routing_tasks"
ROUTING_WEIGHTS_KWARG = "routing_weights"


class TwinError(RoutedError):
    """Base class of the errors a Twin-Merging model raises on purpose."""


class TwinRankError(TwinError, ParameterError):
    """The compression is invalid: a rank below 1 or above every matrix's smallest dimension, an energy share
    outside (0, 1], or both given."""


class MissingValidationDataError(TwinError, ParameterError):
    """The router's training data lacks a task (or a task's data is empty)."""


class RoutingWeightsError(TwinError):
    """Explicit routing weights are not ``[K]`` or ``[batch, K]`` finite floats, or come with ``routing_tasks``."""


class TwinInputError(TwinError):
    """An input the router or a routed submodule cannot read (no features, another width, no batch dimension)."""


# ---------------------------------------------------------------------------------------------------------------
# the math: small pure functions over tensors


def kept_rank(singular_values: Tensor, *, rank: int | None = None, energy: float | None = None) -> int:
    """How many of ``singular_values`` (descending) a truncation keeps: ``min(rank, len)``; with ``energy`` the
    smallest k with ``sum_{j<k} s_j^2 >= energy * sum_j s_j^2``; by default ``max(1, floor(0.1 * len))``."""
    full = int(singular_values.numel())
    if rank is not None:
        return max(1, min(rank, full))
    if energy is not None:
        squares = singular_values.double().square()
        total = float(squares.sum())
        if total == 0.0:
            return 1
        share = squares.cumsum(0) / total
        return max(1, min(int((share < energy).sum()) + 1, full))
    return max(1, int(DEFAULT_RANK_SHARE * full))


def truncated_svd(
    matrix: Tensor, *, rank: int | None = None, energy: float | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """``(U [m, r], S [r], V^T [r, n])``: the top-r singular triplets of ``matrix [m, n]``
    (``torch.linalg.svd``, thin), r by :func:`kept_rank`.  ``U diag(S) V^T`` is the best rank-r approximation
    in the Frobenius norm (Eckart-Young)."""
    if matrix.dim() != 2:
        raise ValueError(f"truncated_svd takes a 2-D matrix, got shape {tuple(matrix.shape)}")
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    k = kept_rank(s, rank=rank, energy=energy)
    return u[:, :k].contiguous(), s[:k].contiguous(), vh[:k].contiguous()


def shared_features(output: Any, token_mask: Tensor | None = None) -> Tensor:
    """The router's input ``[B, D]`` from the shared model's output: its last hidden state (``last_hidden_state``,
    or the output tensor, or a tuple's first tensor) averaged over the tokens, ``sum_t m_bt h_bt / sum_t m_bt``
    with ``token_mask [B, T]`` (1 = real token), over every token without; a ``[B, D]`` output as it is."""
    hidden = getattr(output, "last_hidden_state", None)
    if hidden is None:
        if isinstance(output, Tensor):
            hidden = output
        elif isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
            hidden = output[0]
    if not isinstance(hidden, Tensor):
        raise TwinInputError(
            f"the shared model returned a {type(output).__name__}, which holds no hidden states for the router; "
            "make it return a tensor, a tuple starting with one, or an output with last_hidden_state"
        )
    if hidden.dim() == 2:
        return hidden
    if hidden.dim() != 3:
        raise TwinInputError(
            f"the shared model's hidden states are {tuple(hidden.shape)}; the router reads [batch, dim] or "
            "[batch, tokens, dim]"
        )
    if token_mask is None:
        return hidden.mean(dim=1)
    if tuple(token_mask.shape) != tuple(hidden.shape[:2]):
        raise TwinInputError(
            f"the token mask is {tuple(token_mask.shape)} but the hidden states are {tuple(hidden.shape[:2])} "
            "(batch, tokens)"
        )
    m = token_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)


# ---------------------------------------------------------------------------------------------------------------
# one routed tensor's exclusive knowledge, and the router


class TwinVector(nn.Module):
    """One routed tensor's exclusive knowledge for the K tasks: the factors of its 2-D truncated SVDs, stacked
    along the rank (``u [m, R]``, ``s [R]``, ``vh [R, n]``, ``columns [R]`` the task of each rank column,
    ``R = sum_i r_i``), or the exact differences ``dense [K, *shape]`` of any other tensor."""

    def __init__(
        self,
        shape: Sequence[int],
        *,
        factors: Sequence[tuple[Tensor, Tensor, Tensor]] | None = None,
        dense: Tensor | None = None,
    ) -> None:
        super().__init__()
        if (factors is None) == (dense is None):
            raise ValueError("a TwinVector holds either low-rank factors or dense differences")
        self.shape = tuple(int(d) for d in shape)
        if factors is not None:
            self.ranks = tuple(int(s.numel()) for _, s, _ in factors)
            self.register_buffer("u", torch.cat([u for u, _, _ in factors], dim=1))
            self.register_buffer("s", torch.cat([s for _, s, _ in factors]))
            self.register_buffer("vh", torch.cat([vh for _, _, vh in factors], dim=0))
            self.register_buffer(
                "columns", torch.repeat_interleave(torch.arange(len(self.ranks)), torch.tensor(self.ranks))
            )
            self.offsets = tuple(int(o) for o in torch.tensor((0, *self.ranks)).cumsum(0))
            self.dense = None
        else:
            self.ranks = ()
            self.register_buffer("dense", dense)

    @property
    def lowrank(self) -> bool:
        return self.dense is None

    @property
    def dtype(self) -> torch.dtype:
        return self.s.dtype if self.lowrank else self.dense.dtype

    def task_factors(self, k: int) -> tuple[Tensor, Tensor, Tensor]:
        lo, hi = self.offsets[k], self.offsets[k + 1]
        return self.u[:, lo:hi], self.s[lo:hi], self.vh[lo:hi]

    def task_delta(self, k: int) -> Tensor:
        """Task k's (compressed) ``v_k``: ``U_k diag(S_k) V_k^T`` or the exact difference."""
        if not self.lowrank:
            return self.dense[k]
        u, s, vh = self.task_factors(k)
        return (u * s) @ vh

    def column_scale(self, weights: Tensor) -> Tensor:
        """``s_j * w[task(j)]`` for every rank column j: ``[R]`` for ``weights [K]``, ``[B, R]`` for ``[B, K]``."""
        return self.s * weights.to(self.s.dtype)[..., self.columns]

    def active_factors(self, weights: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(u, column_scale(weights), vh)`` restricted to the rank columns of the tasks some example weighs
        non-zero (one-hot weights from a task id: that task's r columns instead of all R; exact, the dropped
        columns add zeros)."""
        scale = self.column_scale(weights)
        used = weights != 0 if weights.dim() == 1 else (weights != 0).any(dim=0)
        if bool(used.all()):
            return self.u, scale, self.vh
        keep = used.to(self.columns.device)[self.columns].nonzero().squeeze(1)
        return self.u[:, keep], scale[..., keep], self.vh[keep]

    def combined(self, weights: Tensor) -> Tensor:
        """``sum_i w_i v_i``: ``[*shape]`` for ``weights [K]``, ``[B, *shape]`` for ``[B, K]``."""
        if self.lowrank:
            scale = self.column_scale(weights)
            return (self.u * scale.unsqueeze(-2)) @ self.vh
        flat = self.dense.reshape(self.dense.shape[0], -1)
        return (weights.to(flat.dtype) @ flat).reshape(*weights.shape[:-1], *self.shape)


class TwinRouter(nn.Module):
    """The authors' router: ``Linear(D, H) - BatchNorm1d - LeakyReLU - Dropout(p) - Linear(H, H) - BatchNorm1d -
    LeakyReLU - Dropout(p) - Linear(H, K)``, H = 2D, p = 0.5, torch's default initialisation; ``[B, D] -> [B, K]``
    logits."""

    def __init__(
        self,
        in_features: int,
        num_tasks: int,
        *,
        hidden_features: int | None = None,
        dropout: float = ROUTER_DROPOUT,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        hidden = hidden_features or ROUTER_WIDTH_FACTOR * in_features
        self.in_features, self.num_tasks, self.hidden_features = in_features, num_tasks, hidden
        self.dropout = float(dropout)
        self.inp = nn.Linear(in_features, hidden, dtype=dtype)
        self.norm1 = nn.BatchNorm1d(hidden, dtype=dtype)
        self.hidden = nn.Linear(hidden, hidden, dtype=dtype)
        self.norm2 = nn.BatchNorm1d(hidden, dtype=dtype)
        self.out = nn.Linear(hidden, num_tasks, dtype=dtype)
        # inference builds no graph; train_twin_router switches the gradients on while it trains
        self.requires_grad_(False)
        self.eval()

    def forward(self, features: Tensor) -> Tensor:
        x = features.to(self.out.weight.dtype)
        x = F.dropout(F.leaky_relu(self.norm1(self.inp(x))), self.dropout, self.training)
        x = F.dropout(F.leaky_relu(self.norm2(self.hidden(x))), self.dropout, self.training)
        return self.out(x)


# ---------------------------------------------------------------------------------------------------------------
# running: the routed submodules swapped in for one call


class _Routing:
    """The weights of the batch that is running (``[B, K]``, or ``[K]`` for every example)."""

    def __init__(self, weights: Tensor) -> None:
        self.weights = weights

    def for_input(self, first: Tensor, where: str) -> tuple[Tensor, int | None]:
        """``(weights, batch)`` for a submodule input whose first dimension is the batch (``batch = B``), 1 (shared
        by every example: ``batch = None``), or anything when one weight vector covers the batch."""
        w = self.weights
        if w.dim() == 1:
            return w, None
        b = w.shape[0]
        rows = first.shape[0] if first.dim() > 0 else None
        if rows == b:
            return w, b
        if rows == 1:
            return w, None
        raise TwinInputError(
            f"{where}: its input is {tuple(first.shape)} but the batch has {b} examples; routed submodules need "
            "batch-first inputs (first dimension the batch, or 1 for an input every example shares)"
        )


def _per_example_view(t: Tensor, ndim: int) -> Tensor:
    """``[B, X]`` -> ``[B, 1, ..., 1, X]`` broadcasting over an ``ndim``-dimensional batch-first tensor."""
    return t.reshape(t.shape[0], *([1] * (ndim - 2)), t.shape[-1]) if t.dim() == 2 else t


def _linear_delta(x: Tensor, vector: TwinVector, weights: Tensor) -> Tensor:
    """``sum_i w_i U_i S_i V_i^T x`` for the rows of ``x [.., in]``: two matmuls against the stacked factors."""
    u, scale, vh = vector.active_factors(weights)
    projected = x.to(vh.dtype) @ vh.T
    return (projected * _per_example_view(scale, x.dim())) @ u.T


class _RoutedSubmodule(nn.Module):
    """Stands in for a submodule that holds routed tensors while the module runs: the submodule with
    ``theta_* + sum_i w_bi v_i`` per example (``kind``: ``"linear"`` / ``"embedding"`` exact low-rank corrections,
    ``"vmap"`` / ``"loop"`` the submodule run with materialised per-example tensors)."""

    def __init__(
        self, inner: nn.Module, path: str, vectors: dict[str, TwinVector], routing: _Routing, kind: str
    ) -> None:
        super().__init__()
        # kept out of _modules, so the module's parameter names do not change while this stands in
        object.__setattr__(self, "inner", inner)
        object.__setattr__(self, "vectors", vectors)
        object.__setattr__(self, "routing", routing)
        self.path, self.kind = path, kind

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        first = args[0] if args else next(iter(kwargs.values()), None)
        if not isinstance(first, Tensor):
            raise TwinInputError(
                f"{self.path!r} was called without a tensor input; it cannot be routed per example"
            )
        weights, batch = self.routing.for_input(first, repr(self.path))
        if self.kind == "linear":
            out = self.inner(*args, **kwargs)
            if "weight" in self.vectors:
                out = out + _linear_delta(first, self.vectors["weight"], weights).to(out.dtype)
            if "bias" in self.vectors:
                bias = self.vectors["bias"].combined(weights)
                out = out + _per_example_view(bias, out.dim()).to(out.dtype)
            return out
        if self.kind == "embedding":
            out = self.inner(*args, **kwargs)
            u, scale, vh = self.vectors["weight"].active_factors(weights)
            rows = F.embedding(first, u)
            return out + ((rows * _per_example_view(scale, rows.dim())) @ vh).to(out.dtype)
        own = {
            **dict(self.inner.named_parameters(recurse=False)),
            **dict(self.inner.named_buffers(recurse=False)),
        }
        params = {
            local: (own[local].to(v.dtype) + v.combined(weights)).to(own[local].dtype)
            for local, v in self.vectors.items()
        }
        if weights.dim() == 1:
            return torch.func.functional_call(self.inner, params, args, kwargs)
        if self.kind == "loop":
            return self._loop(params, weights, args, kwargs)
        return self._vmap(params, weights.shape[0], args, kwargs)

    def _vmap(self, params: dict[str, Tensor], batch: int, args: tuple, kwargs: dict) -> Any:
        dims = tuple(
            0 if isinstance(a, Tensor) and a.dim() > 0 and a.shape[0] == batch else None for a in args
        )
        inner = self.inner

        def one_example(p: dict[str, Tensor], *xs: Any) -> Any:
            xs = tuple(x.unsqueeze(0) if d == 0 else x for x, d in zip(xs, dims))
            out = torch.func.functional_call(inner, p, xs, kwargs)
            return torch.utils._pytree.tree_map(
                lambda t: t.squeeze(0) if isinstance(t, Tensor) and t.dim() > 0 and t.shape[0] == 1 else t,
                out,
            )

        return torch.func.vmap(one_example, in_dims=(0, *dims), randomness="different")(params, *args)

    def _loop(self, params: dict[str, Tensor], weights: Tensor, args: tuple, kwargs: dict) -> Any:
        """One example at a time, the routing narrowed to it, so routed submodules inside see batch-1 inputs."""
        batch = weights.shape[0]
        results = []
        try:
            for b in range(batch):
                index = torch.tensor([b], dtype=torch.long)
                sub_args, sub_kwargs = _take_rows((args, kwargs), index, batch)
                self.routing.weights = weights[b : b + 1]
                one = {k: v[b] for k, v in params.items()}
                results.append((index, torch.func.functional_call(self.inner, one, sub_args, sub_kwargs)))
        finally:
            self.routing.weights = weights
        return _scatter_rows(results, batch, path=self.path)


def _submodule_kind(sub: nn.Module, locals_: set[str], nested: bool) -> str:
    if (
        type(sub).forward is nn.Linear.forward
        and isinstance(sub, nn.Linear)
        and locals_ <= {"weight", "bias"}
    ):
        return "linear"
    if (
        type(sub).forward is nn.Embedding.forward
        and isinstance(sub, nn.Embedding)
        and locals_ == {"weight"}
        and sub.max_norm is None
    ):
        return "embedding"
    return "loop" if nested else "vmap"


# ---------------------------------------------------------------------------------------------------------------
# the parts beside the module (what RoutedModel and save_routed see)


class TwinParts(nn.Module):
    """Twin-Merging's parts beside the shared module (which holds ``theta_*``): one :class:`TwinVector` per
    routed tensor and the :class:`TwinRouter`.

    ``routes_examples = True``: :class:`RoutedModel` calls :meth:`run`, which takes each example's weights from
    the router, from ``routing_tasks=`` (one-hot) or from ``routing_weights=``.  Saved as: shared = the router's
    state (``router.<name>``, BatchNorm statistics included); task i = ``u.<name>`` ``[m, r_i]``, ``s.<name>``
    ``[r_i]``, ``vh.<name>`` ``[r_i, n]`` of each 2-D routed tensor and ``delta.<name>`` of each other one."""

    method = "twin"
    routes_examples = True

    def __init__(
        self,
        tasks: tuple[str, ...],
        vectors: Mapping[str, TwinVector],
        router: TwinRouter,
        *,
        settings: Mapping[str, Any],
    ) -> None:
        super().__init__()
        self.tasks = tuple(tasks)
        self.routed_names = tuple(vectors)
        self.vectors = nn.ModuleList(vectors.values())
        self._index = {name: j for j, name in enumerate(vectors)}
        self.router = router
        self.feature_mask_kwarg: str | None = settings.get("feature_mask_kwarg")
        self._settings = dict(settings)

    def vector(self, name: str) -> TwinVector:
        return self.vectors[self._index[name]]

    # -- routing -----------------------------------------------------------------------------------------------
    def features(self, module: nn.Module, args: tuple, kwargs: Mapping[str, Any]) -> Tensor:
        """The router's input: the shared model's output on ``(args, kwargs)`` averaged over the tokens
        (:func:`shared_features`, masked by ``kwargs[feature_mask_kwarg]`` when that is set), without gradients."""
        mask = kwargs.get(self.feature_mask_kwarg) if self.feature_mask_kwarg else None
        with torch.no_grad():
            features = shared_features(module(*args, **kwargs), mask)
        if features.shape[-1] != self.router.in_features:
            raise TwinInputError(
                f"the shared model's features are {features.shape[-1]} wide, the router reads "
                f"{self.router.in_features}; build the model with feature_dim={features.shape[-1]}"
            )
        return features

    def router_logits(self, features: Tensor) -> Tensor:
        """``router(features)`` in eval mode (BatchNorm's running statistics, no dropout): ``[B, K]``."""
        was_training = self.router.training
        self.router.eval()
        try:
            with torch.no_grad():
                return self.router(features)
        finally:
            self.router.train(was_training)

    def route(self, module: nn.Module, args: tuple, kwargs: Mapping[str, Any]) -> Tensor:
        """Each example's weights ``softmax(router(features)) [B, K]``."""
        return torch.softmax(self.router_logits(self.features(module, args, kwargs)), dim=-1)

    def one_hot(self, tasks: str | Sequence[str], batch: int | None) -> Tensor:
        """``[K]`` one-hot weights for one task name, ``[B, K]`` for one name per example."""
        names = [tasks] if isinstance(tasks, str) else list(tasks)
        for t in names:
            if not isinstance(t, str) or t not in self.tasks:
                raise UnknownTaskError(f"unknown task {t!r}; this twin model has tasks {list(self.tasks)}")
        rows = torch.zeros(len(names), len(self.tasks), dtype=self.router.out.weight.dtype)
        rows[torch.arange(len(names)), torch.tensor([self.tasks.index(t) for t in names])] = 1.0
        if isinstance(tasks, str):
            return rows[0]
        if not names or len(names) != batch:
            raise TaskIdsMismatchError(
                f"routing_tasks has {len(names)} entries for a batch of {batch}; give one task per example, or "
                "one name for the batch"
            )
        return rows

    def _checked_weights(self, weights: Any, batch: int | None) -> Tensor:
        k = len(self.tasks)
        if not isinstance(weights, Tensor) or not weights.is_floating_point():
            raise RoutingWeightsError(f"routing_weights must be a float tensor [K] or [batch, K] (K = {k})")
        shape_ok = (weights.dim() == 1 and weights.shape[0] == k) or (
            weights.dim() == 2 and weights.shape[1] == k and weights.shape[0] == batch
        )
        if not shape_ok:
            raise RoutingWeightsError(
                f"routing_weights is {tuple(weights.shape)}; expected [{k}] or [{batch}, {k}] (batch, tasks)"
            )
        if not bool(torch.isfinite(weights).all()):
            raise RoutingWeightsError("routing_weights holds NaN/Inf")
        return weights

    def run(self, module: nn.Module, args: tuple, kwargs: dict) -> Any:
        """``module(*args, **kwargs)`` with each example's ``theta_* + sum_i w_bi v_i``; ``w`` from the router, or
        from ``routing_tasks=`` / ``routing_weights=`` in ``kwargs`` (removed before the module sees them)."""
        kwargs = dict(kwargs)
        tasks = kwargs.pop(ROUTING_TASKS_KWARG, None)
        weights = kwargs.pop(ROUTING_WEIGHTS_KWARG, None)
        if tasks is not None and weights is not None:
            raise RoutingWeightsError("give routing_tasks or routing_weights, not both")
        batch = _batch_size(args, kwargs)
        if tasks is not None:
            weights = self.one_hot(tasks, batch)
        elif weights is not None:
            weights = self._checked_weights(weights, batch)
        else:
            weights = self.route(module, args, kwargs)
        reference = self.router.out.weight
        weights = weights.to(device=reference.device, dtype=reference.dtype)
        with self._installed(module, weights):
            return module(*args, **kwargs)

    @contextmanager
    def _installed(self, module: nn.Module, weights: Tensor) -> Iterator[None]:
        routing = _Routing(weights)
        owners: dict[str, dict[str, TwinVector]] = {}
        for name in self.routed_names:
            path, _, local = name.rpartition(".")
            owners.setdefault(path, {})[local] = self.vector(name)
        if "" in owners:
            raise TwinError(
                f"the module's own tensors {sorted(owners[''])} are routed; wrap it so they belong to a submodule"
            )
        # every submodule and its parent looked up before any is swapped (a swapped parent hides its children)
        sites = []
        for path, vectors in owners.items():
            parent_path, _, leaf = path.rpartition(".")
            parent = module.get_submodule(parent_path) if parent_path else module
            nested = any(p.startswith(path + ".") for p in owners)
            sites.append((parent, leaf, module.get_submodule(path), path, vectors, nested))
        swapped: list[tuple[nn.Module, str, nn.Module]] = []
        try:
            for parent, leaf, sub, path, vectors, nested in sites:
                kind = _submodule_kind(sub, set(vectors), nested)
                setattr(parent, leaf, _RoutedSubmodule(sub, path, vectors, routing, kind))
                swapped.append((parent, leaf, sub))
            yield
        finally:
            for parent, leaf, inner in reversed(swapped):
                setattr(parent, leaf, inner)

    def materialise(self, task: str, base: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Task `task`'s full tensors with one-hot weights: ``theta_* + U_i S_i V_i^T`` (``base`` = the module's
        state, which holds ``theta_*``)."""
        k = self.tasks.index(task)
        out = {}
        for name in self.routed_names:
            b = base[name]
            delta = self.vector(name).task_delta(k)
            out[name] = (b.to(delta.dtype) + delta.to(b.device)).to(b.dtype)
        return out

    # -- saving ------------------------------------------------------------------------------------------------
    def shared_tensors(self) -> dict[str, Tensor]:
        return {f"router.{name}": t.detach() for name, t in self.router.state_dict().items()}

    def task_tensors(self, task: str) -> dict[str, Tensor]:
        k = self.tasks.index(task)
        out = {}
        for name in self.routed_names:
            v = self.vector(name)
            if v.lowrank:
                u, s, vh = v.task_factors(k)
                out[f"u.{name}"], out[f"s.{name}"], out[f"vh.{name}"] = u, s, vh
            else:
                out[f"delta.{name}"] = v.dense[k]
        return out

    def settings(self) -> dict[str, Any]:
        return dict(self._settings)

    @classmethod
    def from_saved(
        cls,
        tasks: tuple[str, ...],
        shared: Mapping[str, Tensor],
        per_task: Mapping[str, Mapping[str, Tensor]],
        settings: Mapping[str, Any],
        base: Mapping[str, Tensor],
    ) -> TwinParts:
        """Rebuild from what :meth:`shared_tensors` / :meth:`task_tensors` wrote, checking every piece against the
        others and the base (a :class:`RoutedFormatError` names the first that does not fit)."""
        mask_kwarg = settings.get("feature_mask_kwarg")
        if mask_kwarg is not None and not isinstance(mask_kwarg, str):
            raise RoutedFormatError(f"twin feature_mask_kwarg {mask_kwarg!r} is not a name or null")
        dropout = settings.get("router_dropout")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise RoutedFormatError(f"twin router_dropout {dropout!r} is not a number in [0, 1)")
        first = per_task[tasks[0]]
        names = sorted(
            {key.split(".", 1)[1] for key in first if key.split(".", 1)[0] in ("u", "s", "vh", "delta")}
        )
        vectors: dict[str, TwinVector] = {}
        for name in names:
            if name not in base:
                raise RoutedFormatError(f"task files route {name!r}, which base.safetensors lacks")
            shape = tuple(base[name].shape)
            if f"delta.{name}" in first:
                rows = [_saved(per_task, t, f"delta.{name}") for t in tasks]
                for t, row in zip(tasks, rows):
                    if tuple(row.shape) != shape or not row.is_floating_point():
                        raise RoutedFormatError(
                            f"task {t!r}: delta.{name} is {row.dtype} {tuple(row.shape)}, expected float {shape}"
                        )
                vectors[name] = TwinVector(shape, dense=torch.stack(rows))
                continue
            if len(shape) != 2:
                raise RoutedFormatError(f"{name} has factors but the base's tensor is {shape}, not a matrix")
            factors = []
            for t in tasks:
                u, s, vh = (_saved(per_task, t, f"{p}.{name}") for p in ("u", "s", "vh"))
                r = s.shape[0] if s.dim() == 1 else -1
                if (
                    r < 1
                    or tuple(u.shape) != (shape[0], r)
                    or tuple(vh.shape) != (r, shape[1])
                    or not (u.dtype == s.dtype == vh.dtype)
                    or not s.is_floating_point()
                ):
                    raise RoutedFormatError(
                        f"task {t!r}: the factors of {name} are u {tuple(u.shape)}, s {tuple(s.shape)}, vh "
                        f"{tuple(vh.shape)}; expected [{shape[0]}, r], [r], [r, {shape[1]}] of one float dtype"
                    )
                factors.append((u, s, vh))
            vectors[name] = TwinVector(shape, factors=factors)
        if not vectors:
            raise RoutedFormatError("the twin task files hold no routed tensors")
        router_state = {k.removeprefix("router."): v for k, v in shared.items() if k.startswith("router.")}
        if (
            len(router_state) != len(shared)
            or "inp.weight" not in router_state
            or "out.weight" not in router_state
        ):
            raise RoutedFormatError(
                f"shared.safetensors holds {sorted(shared)[:3]}..., not a twin router's state (router.<name>)"
            )
        hidden, in_features = router_state["inp.weight"].shape
        if router_state["out.weight"].shape[0] != len(tasks):
            raise RoutedFormatError(
                f"the router has {router_state['out.weight'].shape[0]} outputs for {len(tasks)} tasks"
            )
        router = TwinRouter(
            int(in_features),
            len(tasks),
            hidden_features=int(hidden),
            dropout=float(dropout),
            dtype=router_state["inp.weight"].dtype,
        )
        try:
            router.load_state_dict(router_state, strict=True)
        except RuntimeError as exc:
            raise RoutedFormatError(
                f"shared.safetensors does not hold the twin router's state: {exc}"
            ) from exc
        parts = cls(tasks, vectors, router, settings=settings)
        for t in tasks:
            unused = sorted(set(per_task[t]) - set(parts.task_tensors(t)))
            if unused:
                raise RoutedFormatError(f"task {t!r} holds {unused[:3]}, which the twin parts do not use")
        return parts


def _saved(per_task: Mapping[str, Mapping[str, Tensor]], task: str, name: str) -> Tensor:
    t = per_task[task].get(name)
    if t is None:
        raise RoutedFormatError(f"task {task!r} lacks {name}, which the twin parts need")
    return t


def _batch_size(args: tuple, kwargs: Mapping[str, Any]) -> int | None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, Tensor) and value.dim() > 0:
            return int(value.shape[0])
    return None


# ---------------------------------------------------------------------------------------------------------------
# building a Twin-Merging model


@contextmanager
def _intra_op_threads(threads: int | None) -> Iterator[None]:
    """torch's intra-op thread count set to `threads` for the block (None: unchanged), restored afterwards."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _compute_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _feature_width(module: nn.Module, feature_dim: int | None) -> int:
    if feature_dim is not None:
        return feature_dim
    hidden = getattr(getattr(module, "config", None), "hidden_size", None)
    if isinstance(hidden, int) and hidden > 0:
        return hidden
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    if linears:
        return linears[-1].out_features
    raise ParameterError(
        f"cannot tell how wide {type(module).__name__}'s output features are (no config.hidden_size, no "
        "nn.Linear); pass feature_dim="
    )


def _check_options(
    scaling: Any,
    rank: Any,
    energy: Any,
    feature_dim: Any,
    router_hidden: Any,
    router_dropout: Any,
    feature_mask_kwarg: Any,
) -> None:
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)) or not math.isfinite(scaling):
        raise ParameterError(f"scaling must be a finite number (the authors' 0.3), got {scaling!r}")
    if rank is not None and energy is not None:
        raise TwinRankError("give rank or energy, not both")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise TwinRankError(f"rank must be an integer >= 1, got {rank!r}")
    if energy is not None and (
        isinstance(energy, bool) or not isinstance(energy, (int, float)) or not 0 < energy <= 1
    ):
        raise TwinRankError(
            f"energy must be a share of the singular values' energy in (0, 1], got {energy!r}"
        )
    for label, value in (("feature_dim", feature_dim), ("router_hidden", router_hidden)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ParameterError(f"{label} must be an integer >= 1 or None, got {value!r}")
    if (
        isinstance(router_dropout, bool)
        or not isinstance(router_dropout, (int, float))
        or not 0 <= router_dropout < 1
    ):
        raise ParameterError(f"router_dropout must be in [0, 1) (the authors' 0.5), got {router_dropout!r}")
    if feature_mask_kwarg is not None and not isinstance(feature_mask_kwarg, str):
        raise ParameterError(f"feature_mask_kwarg must be a keyword name or None, got {feature_mask_kwarg!r}")


def twin_merge(
    base_state: Mapping[str, Tensor],
    task_state_dicts: Mapping[str, Mapping[str, Tensor]],
    module: nn.Module,
    *,
    scaling: float = 0.3,
    shared_state: Mapping[str, Tensor] | None = None,
    rank: int | None = None,
    energy: float | None = None,
    feature_dim: int | None = None,
    router_hidden: int | None = None,
    router_dropout: float = ROUTER_DROPOUT,
    feature_mask_kwarg: str | None = None,
    seed: int = 0,
    svd_threads: int | None = 1,
) -> RoutedModel:
    """Build a Twin-Merging :class:`RoutedModel` over `module` (of the base's structure) from the experts
    ``task_state_dicts`` (task name -> state dict) of ``base_state``; train its router with
    :func:`transfuse.routed.twin_train.train_twin_router` before routing without task ids.

    - ``theta_*``: ``theta_0 + scaling * sum_i tau_i`` over every float tensor, or ``shared_state`` (any merge of
      the experts, e.g. ``merge_state_dicts(base, experts, "ties")``); the module receives it
      (``load_state_dict(assign=True)``) and is frozen.
    - ``v_i = theta_i - theta_*`` for every float tensor some ``v_i`` is non-zero in; 2-D tensors keep
      ``U_i S_i V_i^T`` (``rank``, ``energy`` or by default 10% of ``min(m, n)``; module docstring), the others
      ``v_i``.  Factors in float32 (float64 for a float64 base).
    - The router reads ``feature_dim``-wide features (default: ``module.config.hidden_size``, else the last
      ``nn.Linear``'s width), hidden width ``router_hidden`` (default ``2 * feature_dim``); with
      ``feature_mask_kwarg="attention_mask"`` the token mean skips padding.  ``seed`` seeds its initialisation.
    - ``svd_threads``: torch's intra-op threads while the SVDs run on the CPU (None: leave torch's setting).  One
      by default: LAPACK's SVD of these sizes gains little from more threads and stalls when another process
      holds a core (MiniLM x 8 experts, 2 busy cores: 368 s with 2 threads, 16.8 s with 1).

    Errors, before any work: :class:`ParameterError` (no expert, bad options), :class:`TwinRankError` (rank < 1,
    a rank above every matrix's smallest dimension, energy outside (0, 1], both), :class:`MissingTensorError` /
    :class:`ShapeMismatchError` / :class:`DtypeMismatchError` / :class:`NotSameBaseError` /
    :class:`NonFiniteTensorError` for experts (or a ``shared_state``) that do not fit the base,
    :class:`ModuleMismatchError` for a module of another structure."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch nn.Module, got {type(module).__name__}")
    _check_options(scaling, rank, energy, feature_dim, router_hidden, router_dropout, feature_mask_kwarg)
    if svd_threads is not None and (
        isinstance(svd_threads, bool) or not isinstance(svd_threads, int) or svd_threads < 1
    ):
        raise ParameterError(f"svd_threads must be an integer >= 1 or None, got {svd_threads!r}")
    if not isinstance(task_state_dicts, Mapping) or not task_state_dicts:
        raise ParameterError("twin_merge needs at least one expert (K >= 1): {task name: state dict}")
    _check_experts(base_state, task_state_dicts)
    if shared_state is not None:
        _check_experts(base_state, {"<shared_state>": shared_state})
    state_names = set(module.state_dict())
    if state_names != set(base_state):
        diff = sorted(state_names ^ set(base_state))
        raise ModuleMismatchError(
            f"the module's tensors differ from the base's ({diff[:3]}); pass a module of the base's architecture"
        )
    matrices = [min(t.shape) for t in base_state.values() if t.is_floating_point() and t.dim() == 2]
    if rank is not None and matrices and rank > max(matrices):
        raise TwinRankError(
            f"rank {rank} exceeds every matrix's smallest dimension (at most {max(matrices)}): nothing would be "
            f"compressed; give a rank in [1, {max(matrices)}]"
        )
    width = _feature_width(module, feature_dim)
    tasks = tuple(task_state_dicts)
    # routing swaps the submodule that holds a routed tensor; the root module itself cannot be swapped
    at_root = [
        n
        for n, b in base_state.items()
        if "." not in n
        and b.is_floating_point()
        and any(not torch.equal(e[n], b) for e in task_state_dicts.values())
    ]
    if at_root:
        raise TwinError(
            f"the experts change {at_root[:3]}, tensors of the module itself rather than of a submodule; wrap the "
            "module so that every tensor the experts change belongs to a submodule"
        )
    experts = [task_state_dicts[t] for t in tasks]

    shared: dict[str, Tensor] = {}
    vectors: dict[str, TwinVector] = {}
    on_cpu = all(t.device.type == "cpu" for t in base_state.values())
    with torch.no_grad(), _intra_op_threads(svd_threads if on_cpu else None):
        for name, b in base_state.items():
            b = b.detach()
            if not b.is_floating_point():
                shared[name] = b.clone()
                continue
            dtype = _compute_dtype(b)
            if shared_state is None:
                total = torch.zeros(b.shape, dtype=dtype)
                base_c = b.to(dtype)
                for e in experts:
                    total.add_(e[name].detach().to(dtype) - base_c)
                merged = base_c + scaling * total
            else:
                merged = shared_state[name].detach().to(dtype)
            if not bool(torch.isfinite(merged).all()):
                bad = [t for t, e in zip(tasks, experts) if not bool(torch.isfinite(e[name]).all())]
                where = (
                    f"task {bad[0]!r}" if bad else ("the base" if shared_state is None else "shared_state")
                )
                raise NonFiniteTensorError(f"{name} holds NaN/Inf in {where}; fix that model")
            shared[name] = merged.to(b.dtype)
            star = shared[name].to(dtype)  # v_i against what the module holds, so theta_* + v_i = theta_i
            deltas = [e[name].detach().to(dtype) - star for e in experts]
            if not any(bool(d.any()) for d in deltas):
                continue
            if b.dim() == 2:
                vectors[name] = TwinVector(
                    b.shape, factors=[truncated_svd(d, rank=rank, energy=energy) for d in deltas]
                )
            else:
                vectors[name] = TwinVector(b.shape, dense=torch.stack(deltas))
    if not vectors:
        raise ParameterError("no expert differs from the shared model in any float tensor: nothing to route")
    try:
        module.load_state_dict(shared, strict=True, assign=True)
    except RuntimeError as exc:
        raise ModuleMismatchError(
            f"the module does not have the base's structure: {exc}; pass a module of the base's architecture"
        ) from exc
    module.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        router = TwinRouter(
            width,
            len(tasks),
            hidden_features=router_hidden,
            dropout=router_dropout,
            dtype=next(iter(vectors.values())).dtype,
        )
    settings = {
        "shared": "task_arithmetic" if shared_state is None else "given",
        "scaling": float(scaling) if shared_state is None else None,
        "rank": rank,
        "energy": None if energy is None else float(energy),
        "router_dropout": float(router_dropout),
        "feature_mask_kwarg": feature_mask_kwarg,
    }
    return RoutedModel(module, TwinParts(tasks, vectors, router, settings=settings))
