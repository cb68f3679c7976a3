"""RegMean++: RegMean with each layer's inputs taken from the merged model's earlier layers.

RegMean (``transfuse.methods.regmean``) solves every linear layer from Gram matrices of each candidate model's
own inputs.  RegMean++ (Nguyen et al., "RegMean++: Enhancing Effectiveness and Generalization of Regression Mean
for Model Merging", arXiv:2508.03121, 2025) merges the model block by block instead: the input of block ``l`` for
task ``i`` is what the *merged* blocks ``< l`` make of task ``i``'s data, ``X_i^(l) = f_M^(l-1)(X_i^(l-1))``; within
block ``l`` the candidate's own block computes the inputs of its linear layers.  So the merged model's later
layers are fitted to the features its earlier, already merged layers produce.

Architecture-generic: the blocks are the entries of the module's longest ``nn.ModuleList`` (a transformer's
layers) unless named; parameters outside the blocks that are not linear maps (embeddings, norms) are averaged
first, linear maps outside the blocks (a pooler, an LM head) are solved last, on the fully merged blocks' features.
Cost: for every block, one forward pass of every task's data up to that block (each pass stops there).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from transfuse.methods.context import MethodContext
from transfuse.methods.regmean import regmean
from transfuse.statistics.gram import Batch, Forward, collect_gram, default_forward, linear_layers
from transfuse.statistics.store import ModelStatistics, StatisticsError


class _StopForward(Exception):
    """Raised by a hook after the block whose inputs were collected: the rest of the pass is not needed."""


def find_blocks(module: nn.Module) -> list[str]:
    """The names of the entries of ``module``'s longest ``nn.ModuleList`` (e.g. ``encoder.layer.0`` ...)."""
    best: tuple[int, str] | None = None
    for name, child in module.named_modules():
        if isinstance(child, nn.ModuleList) and len(child) > 0 and (best is None or len(child) > best[0]):
            best = (len(child), name)
    if best is None:
        raise StatisticsError(
            f"{type(module).__name__} has no nn.ModuleList of blocks; name the blocks (blocks=[...])"
        )
    return [f"{best[1]}.{i}" if best[1] else str(i) for i in range(best[0])]


def regmean_plusplus(
    module: nn.Module,
    base: Mapping[str, torch.Tensor],
    experts: Sequence[Mapping[str, torch.Tensor]],
    batches: Sequence[Iterable[Batch]],
    *,
    alpha: float = 0.9,
    weights: Sequence[float] | None = None,
    blocks: Sequence[str] | None = None,
    forward: Forward = default_forward,
    token_mask: Callable[[Batch], torch.Tensor | None] | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, torch.Tensor]:
    """Merge ``experts`` (state dicts of ``module``'s architecture, fine-tuned from ``base``) with RegMean++.

    ``batches[i]``: task ``i``'s inputs (re-iterable, e.g. a list), run with ``forward(module, batch)``;
    ``alpha`` and ``weights`` as RegMean's.  Returns the merged state dict (the base's keys and dtypes).
    """
    k = len(experts)
    if k == 0 or len(batches) != k:
        raise StatisticsError(
            f"{k} experts and {len(batches)} batch lists: give one list of batches per expert"
        )
    weight_list = list(weights) if weights is not None else [1.0] * k
    if len(weight_list) != k:
        raise StatisticsError(f"{len(weight_list)} weights for {k} experts")
    w = torch.tensor(weight_list, dtype=torch.float32)
    block_names = list(blocks) if blocks is not None else find_blocks(module)
    modules = dict(module.named_modules())
    missing = [b for b in block_names if b not in modules]
    if missing:
        raise StatisticsError(f"no submodule {missing[0]!r} in {type(module).__name__}")
    params = {n: p for n, p in base.items()}
    for i, expert in enumerate(experts):
        if set(expert) != set(base):
            raise StatisticsError(f"expert {i} does not have the base's tensors")
    linear = linear_layers(module)
    extra = {} if token_mask is None else {"token_mask": token_mask}

    def in_block(name: str, block: str) -> bool:
        return name.startswith(block + ".")

    def block_of(name: str) -> str | None:
        return next((b for b in block_names if in_block(name, b)), None)

    def merge_tensor(name: str, grams: list[torch.Tensor] | None, input_dim: int) -> torch.Tensor:
        b = base[name].float()
        deltas = torch.stack([e[name].float() - b for e in experts])
        stats = {} if grams is None else {
            "gram": torch.stack(grams),
            "gram_input_dim": torch.full((k,), input_dim, dtype=torch.int64),
        }  # fmt: skip
        return regmean(b, deltas, w, alpha=alpha, ctx=MethodContext(name=name, statistics=stats)).to(
            base[name].dtype
        )

    def grams_for(names: list[str], stop_after: str | None, task: int, mixed: Mapping[str, torch.Tensor]):
        """Gram matrices of the linear layers ``names`` for task ``task`` with parameters ``mixed``."""
        wanted = set(names)
        handle = None
        if stop_after is not None:

            def stop(_module: nn.Module, _args: Any, _out: Any) -> None:
                raise _StopForward

            handle = modules[stop_after].register_forward_hook(stop)

        def run(m: nn.Module, batch: Batch) -> Any:
            try:
                return forward(_Functional(m, mixed), batch)
            except _StopForward:
                return None

        try:
            stats = collect_gram(module, batches[task], forward=run, include=lambda n: n in wanted, **extra)
        finally:
            if handle is not None:
                handle.remove()
        return stats

    merged: dict[str, torch.Tensor] = {}
    # 1. Outside the blocks, tensors that are not linear maps (embeddings, norms): the weighted mean.
    for name in params:
        if block_of(name) is None and name not in linear and base[name].is_floating_point():
            merged[name] = merge_tensor(name, None, 1)
        elif not base[name].is_floating_point():
            merged[name] = base[name]
    # 2. Block by block, on the merged model's features so far.
    for block in block_names:
        if progress is not None:
            progress(block)
        names = [n for n in linear if in_block(n, block)]
        per_task: list[ModelStatistics] = []
        for i, expert in enumerate(experts):
            mixed = {n: merged.get(n, expert[n]) if block_of(n) != block else expert[n] for n in params}
            # blocks after this one are never reached (the pass stops), so any values do
            per_task.append(grams_for(names, block, i, mixed))
        for name in [n for n in params if in_block(n, block) and base[n].is_floating_point()]:
            if name in linear and all(name in s.tensors.get("gram", {}) for s in per_task):
                grams = [s.tensors["gram"][name] for s in per_task]
                merged[name] = merge_tensor(name, grams, linear[name][1])
            else:
                merged[name] = merge_tensor(name, None, 1)
        for name in params:
            if in_block(name, block) and name not in merged:
                merged[name] = base[name]
    # 3. Linear maps outside the blocks, on the fully merged blocks' features.
    rest = [n for n in linear if n in params and block_of(n) is None]
    if rest:
        per_task = []
        for i, expert in enumerate(experts):
            mixed = {n: merged.get(n, expert[n]) if n not in rest else expert[n] for n in params}
            per_task.append(grams_for(rest, None, i, mixed))
        for name in rest:
            if all(name in s.tensors.get("gram", {}) for s in per_task):
                merged[name] = merge_tensor(
                    name, [s.tensors["gram"][name] for s in per_task], linear[name][1]
                )
            else:
                merged[name] = merge_tensor(name, None, 1)
    return {n: merged[n] for n in base}


class _Functional(nn.Module):
    """``module`` run with the parameters and buffers ``tensors`` (torch.func.functional_call), looking like the
    module to a forward function."""

    def __init__(self, module: nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
        super().__init__()
        self._wrapped = [module]  # not a submodule: hooks stay on the real module
        self._tensors = dict(tensors)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return functional_call(self._wrapped[0], self._tensors, args, kwargs, strict=False)
