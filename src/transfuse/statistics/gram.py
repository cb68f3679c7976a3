"""Input Gram matrices of a model's linear layers, collected with forward hooks (RegMean's statistics).

For each linear map ``y = W x`` (``torch.nn.Linear``, weight ``[out, in]``; transformers' GPT-2 ``Conv1D``,
weight ``[in, out]``) the collector accumulates ``G = (1/n) sum_t x_t x_t^T`` over the ``n`` input rows
(tokens) the layer sees, skipping padding when the batch has an attention mask.  Averaging over rows, as the
RegMean authors' code does, gives every task the same weight whatever the amount of data.  The Gram matrices are
keyed by the layer's weight name in ``model.state_dict()``, so they line up with the checkpoint the model was
loaded from.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from transfuse.statistics.store import ModelStatistics, StatisticsError

Batch = Any
#: Runs the model on one batch (the default: ``model(**batch)`` for a mapping, ``model(*batch)`` for a tuple).
Forward = Callable[[nn.Module, Batch], Any]


def default_forward(model: nn.Module, batch: Batch) -> Any:
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def default_token_mask(batch: Batch) -> torch.Tensor | None:
    """The batch's ``attention_mask`` (1 = a real token), if it is a mapping that has one."""
    if isinstance(batch, Mapping):
        mask = batch.get("attention_mask")
        return mask if isinstance(mask, torch.Tensor) else None
    return None


def linear_layers(model: nn.Module) -> dict[str, tuple[nn.Module, int]]:
    """``{weight name: (module, input dim of the weight)}`` for every linear map of ``model``: ``nn.Linear``
    (input dim 1) and transformers' ``Conv1D`` (input dim 0), by the name ``state_dict`` gives the weight."""
    found: dict[str, tuple[nn.Module, int]] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            dim = 1
        elif type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None:
            dim = 0
        else:
            continue
        found[f"{name}.weight" if name else "weight"] = (module, dim)
    return found


@torch.no_grad()
def collect_gram(
    model: nn.Module,
    batches: Iterable[Batch],
    *,
    forward: Forward = default_forward,
    token_mask: Callable[[Batch], torch.Tensor | None] = default_token_mask,
    include: Callable[[str], bool] | None = None,
    statistics: ModelStatistics | None = None,
    progress: Callable[[int], None] | None = None,
) -> ModelStatistics:
    """Run ``model`` over ``batches`` and return the mean input Gram matrix of each linear layer.

    ``include(weight_name)`` picks layers (default: all).  ``token_mask(batch)`` gives a ``[batch, tokens]``
    mask of the rows to count (default: the batch's ``attention_mask``), applied to every layer input whose
    leading dims have that shape; other inputs count every row.  Adds ``gram`` and ``gram_input_dim`` to
    ``statistics`` (a new ``ModelStatistics`` by default) and returns it.  ``progress(n)`` is called after
    each batch with its number of examples.
    """
    layers = {n: v for n, v in linear_layers(model).items() if include is None or include(n)}
    if not layers:
        raise StatisticsError(
            f"{type(model).__name__} has no linear layers (nn.Linear or Conv1D) to collect Gram matrices for"
        )
    sums: dict[str, torch.Tensor] = {}
    rows: dict[str, int] = dict.fromkeys(layers, 0)
    current_mask: list[torch.Tensor | None] = [None]

    def hook_for(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0].detach()
            mask = current_mask[0]
            if mask is not None and tuple(x.shape[:-1]) == tuple(mask.shape):
                x = x[mask.to(device=x.device, dtype=torch.bool)]
            x = x.reshape(-1, x.shape[-1]).float()
            gram = x.T @ x
            if name in sums:
                sums[name] += gram.double()
            else:
                sums[name] = gram.double()
            rows[name] += x.shape[0]

        return hook

    handles = [module.register_forward_pre_hook(hook_for(name)) for name, (module, _) in layers.items()]
    was_training = model.training
    model.eval()
    examples = tokens = 0
    try:
        for batch in batches:
            mask = token_mask(batch)
            current_mask[0] = mask
            forward(model, batch)
            n = _batch_size(batch, mask)
            examples += n
            tokens += int(mask.sum()) if mask is not None else n
            if progress is not None:
                progress(n)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if examples == 0:
        raise StatisticsError("no batches were given: the Gram matrices need at least one example")
    out = statistics if statistics is not None else ModelStatistics()
    for name, (_, dim) in layers.items():
        if rows[name] == 0:
            continue  # a layer the forward pass never reached (e.g. an unused head)
        out.add("gram", name, (sums[name] / rows[name]).float())
        out.add("gram_input_dim", name, torch.tensor(dim, dtype=torch.int64))
    out.examples = max(out.examples, examples)
    out.tokens = max(out.tokens, tokens)
    return out


def _batch_size(batch: Batch, mask: torch.Tensor | None) -> int:
    if mask is not None:
        return int(mask.shape[0])
    first = next(iter(batch.values())) if isinstance(batch, Mapping) else batch
    if isinstance(first, (tuple, list)):
        first = first[0]
    return int(first.shape[0]) if isinstance(first, torch.Tensor) and first.dim() > 0 else 1
