"""Task embeddings for intermediate-task selection: describe a labelled text task by a vector from one fixed
reference encoder, then rank source tasks by the similarity of their vectors to the target's.

- :func:`text_embedding` (TextEmb, Vu et al., EMNLP 2020): the mean of the encoder's text vectors.  Ignores
  labels: it says whether two tasks talk about the same things.
- :func:`fisher_embedding` (TaskEmb, Vu et al., EMNLP 2020; after Task2Vec, Achille et al., ICCV 2019): the
  diagonal of the empirical Fisher information of the reference encoder's last-layer parameters, with a
  linear head fitted to the task on the frozen features::

      F_j = 1/N * sum_n (d log p(y_n | x_n) / d theta_j)^2

  It says which parameters the task's decisions depend on, so it also sees the labels.  Differences from the
  papers: TaskEmb fine-tunes BERT on the task first and takes every parameter; Task2Vec samples ``y`` from the
  model (the true Fisher) and smooths it.  Here the encoder stays frozen (only a head is fitted, by L-BFGS) and
  only the last transformer layer is embedded: one backward pass per example through that layer only, a few
  seconds per task for MiniLM-L6 on a CPU.
- :func:`embedding_similarity`: cosine similarity, the score both papers rank by (higher = more similar).

The source tasks' data must be available: these rank *tasks* (e.g. intermediate tasks, or the tasks of a pool
of experts), not bare checkpoints.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch

from transfuse.models.backbone import Encoder
from transfuse.select._validate import DTYPE, SelectionInputError, as_labels

_LAYER_INDEX = re.compile(r"\.(\d+)\.")


def text_embedding(encoder: Encoder, texts: Sequence[str], *, max_length: int = 48) -> torch.Tensor:
    """TextEmb: the mean of ``encoder``'s vectors of ``texts`` -> ``[H]`` float64."""
    if len(texts) == 0:
        raise SelectionInputError("texts: no texts given; a task embedding needs at least one example")
    return encoder.encode(list(texts), max_length=max_length).to(DTYPE).mean(0).cpu()


def last_layer_parameters(model: torch.nn.Module) -> list[str]:
    """Names of the parameters of ``model``'s highest-numbered layer (``...layer.5....`` in a BERT), or all of
    its parameters if none carries a layer number."""
    names = [name for name, p in model.named_parameters() if p.is_floating_point()]
    indices = {name: [int(i) for i in _LAYER_INDEX.findall(name)] for name in names}
    numbered = [max(v) for v in indices.values() if v]
    if not numbered:
        return names
    last = max(numbered)
    return [name for name, v in indices.items() if v and max(v) == last]


def fit_linear_head(
    features: torch.Tensor, labels: torch.Tensor, num_classes: int, *, l2: float = 1e-3, max_iter: int = 200
) -> torch.nn.Linear:
    """Multinomial logistic regression ``features [N, H] -> num_classes`` by L-BFGS from zero (deterministic),
    minimising mean cross-entropy + ``l2 / 2 * |W|^2``; fitted and returned in float64.

    Float64 because the fit must not depend on the order of the classes (a task embedding is the same for any
    naming of its labels).  On nearly separable features the loss is flat along the separating direction (only
    the small ``l2`` curves it), so in float32 the loss stops resolving changes of about 1e-3 in ``W`` and where
    L-BFGS stops depends on rounding, which differs when the classes are permuted (the rows of ``W`` swap, so
    sums run in another order).  Float64 puts that noise near 1e-14.
    """
    # a copy, so that an encoder's inference-mode output can enter autograd
    features = features.detach().to(DTYPE, copy=True)
    head = torch.nn.Linear(features.shape[1], num_classes, device=features.device, dtype=DTYPE)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    optimizer = torch.optim.LBFGS(
        head.parameters(), lr=1.0, max_iter=max_iter, tolerance_grad=1e-9, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = (
            torch.nn.functional.cross_entropy(head(features), labels) + 0.5 * l2 * head.weight.square().sum()
        )
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return head.requires_grad_(False)


def fisher_embedding(
    encoder: Encoder,
    texts: Sequence[str],
    labels: Sequence[object] | torch.Tensor,
    *,
    parameters: Sequence[str] | None = None,
    max_length: int = 48,
    l2: float = 1e-3,
) -> torch.Tensor:
    """TaskEmb-style: the diagonal empirical Fisher of ``encoder``'s ``parameters`` (default: its last layer,
    :func:`last_layer_parameters`) for the task ``(texts, labels)`` -> ``[P]`` float64, concatenated in the
    order of ``parameters``.

    A linear head is fitted to the frozen encoder's vectors (:func:`fit_linear_head`); then for each example
    the gradient of ``log p(y | x)`` w.r.t. the chosen parameters is squared and averaged.  Runs in eval mode
    (no dropout); the encoder is left as it was.
    """
    texts = list(texts)
    target = as_labels(labels, len(texts))
    model = encoder.model
    named = dict(model.named_parameters())
    chosen = list(parameters) if parameters is not None else last_layer_parameters(model)
    unknown = [name for name in chosen if name not in named]
    if not chosen or unknown:
        raise SelectionInputError(
            f"parameters: {unknown[:3] if unknown else 'none'} are not parameters of the encoder; "
            f"pick names from encoder.model.named_parameters() (e.g. {next(iter(named), '?')!r})"
        )
    tokens = encoder.tokenize(texts, max_length)
    features = encoder.embed(tokens).to(torch.float32)
    head = fit_linear_head(features, target.index.to(features.device), target.num_classes, l2=l2)

    was_training = model.training
    requires = {name: p.requires_grad for name, p in named.items()}
    model.eval()
    for name, p in named.items():
        p.requires_grad_(name in chosen)  # backward stops at the chosen layer: the cost of one layer, not all
    params = [named[name] for name in chosen]
    fisher = [torch.zeros(p.numel(), dtype=DTYPE) for p in params]
    device = encoder.device
    try:
        with torch.enable_grad():
            for i in range(len(tokens)):
                one = tokens.select([i])
                pooled = encoder(one.input_ids.to(device), one.attention_mask.to(device))
                log_p = torch.log_softmax(head.to(pooled.dtype)(pooled), dim=-1)[0, int(target.index[i])]
                grads = torch.autograd.grad(log_p, params)
                for total, g in zip(fisher, grads, strict=True):
                    total.add_(g.detach().reshape(-1).to(DTYPE).cpu().square())
    finally:
        for name, p in named.items():
            p.requires_grad_(requires[name])
        model.train(was_training)
    return torch.cat(fisher) / len(tokens)


def embedding_similarity(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine similarity of two task embeddings (0 if either is all zeros)."""
    a, b = a.to(DTYPE).reshape(-1), b.to(DTYPE).reshape(-1)
    if a.shape != b.shape:
        raise SelectionInputError(
            f"task embeddings of different sizes ({a.numel()} vs {b.numel()}): embed both tasks with the same "
            "encoder and parameters"
        )
    norm = float(a.norm() * b.norm())
    return float(a @ b) / norm if norm > 0 else 0.0
