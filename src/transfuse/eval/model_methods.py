"""Whole-model methods the benchmark runs beside the per-tensor merge methods: routed and test-time adaptive.

A per-tensor method (``transfuse.methods``) merges each tensor alone; the methods here need the whole model:
EMR-Merging keeps a shared model plus per-task masks and rescalers and picks the task's parameters by task id
(``routed``), AdaMerging learns merging coefficients on unlabeled test inputs (``test-time``).  Each entry says
what data it uses, so the report can mark it.  A method returns either one merged state dict or one state dict
per task (a routed method with the task id given), plus what it wants reported (e.g. storage per task).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from transfuse.data.task import Task
from transfuse.models.backbone import Encoder
from transfuse.models.head import TaskHead


@dataclass
class ModelMethodInputs:
    """What a whole-model method gets from the sweep."""

    tasks: list[Task]
    base: Mapping[str, torch.Tensor]
    experts: list[dict[str, torch.Tensor]]  # encoder state dicts, in task order
    heads: Mapping[str, TaskHead]
    architecture: Any  # the backbone dir (architecture and tokenizer)
    device: str
    max_length: int
    seed: int
    progress: bool
    statistics_examples: int = 256
    # test-time methods: at most this many optimizer steps, stopped after the step that exceeds the budget
    adaptive_steps: int = 100
    adaptive_budget_s: float | None = 600.0
    test_examples: int | None = None  # the unlabeled test inputs a test-time method adapts on (None: all)
    # AdaMerging's initial coefficient: the paper's 0.3, or task arithmetic's lambda chosen on validation
    adaptive_init: float = 0.3


@dataclass
class ModelMethodOutput:
    """A merged state dict for every task (``merged``) or one per task (``per_task``), and report extras."""

    merged: dict[str, torch.Tensor] | None = None
    per_task: dict[str, dict[str, torch.Tensor]] | None = None
    model: Encoder | None = None  # a routed encoder that picks per example, scored as it is (no task id)
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelMethod:
    name: str
    family: str  # "routed" or "test-time"
    paper: str
    data: str  # what it uses besides the weights, for the report
    run: Callable[[ModelMethodInputs], ModelMethodOutput]


def _storage_report(routed: Any) -> dict[str, Any]:
    """A routed model's bytes for the report: shared, per added task, one full expert, total vs K experts."""
    from transfuse.routed.storage import routed_storage

    storage = routed_storage(routed)
    k = max(len(routed.tasks), 1)
    return {
        "shared_bytes": storage.shared_bytes,
        "bytes_per_added_task": int(sum(storage.task_bytes.values()) / k),
        "full_expert_bytes": int(storage.full_experts_bytes / k),
        "ratio_to_full_experts": round(storage.ratio_to_full_experts, 4),
    }


def _emr(inputs: ModelMethodInputs) -> ModelMethodOutput:
    from transfuse.routed.emr import emr_merge

    names = [t.name for t in inputs.tasks]
    module = Encoder.from_state_dict(inputs.base, inputs.architecture).model
    routed = emr_merge(inputs.base, dict(zip(names, inputs.experts)), module)
    per_task = {}
    for name in names:
        state = {k: v.clone() for k, v in inputs.base.items()}
        state.update(routed.task_parameters(name))
        per_task[name] = state
    info = {"storage": _storage_report(routed)}
    return ModelMethodOutput(per_task=per_task, info=info)


def _regmean_plusplus(inputs: ModelMethodInputs) -> ModelMethodOutput:
    from transfuse.eval.expert_statistics import train_batches
    from transfuse.statistics.regmean_plusplus import regmean_plusplus

    encoder = Encoder.from_state_dict(inputs.base, inputs.architecture, device=inputs.device)
    batches = [
        [{k: v for k, v in b.items() if k != "labels"} for b in train_batches(
            encoder, task, inputs.statistics_examples, max_length=inputs.max_length, seed=inputs.seed
        )]
        for task in inputs.tasks
    ]  # fmt: skip
    merged = regmean_plusplus(
        encoder.model,
        inputs.base,
        inputs.experts,
        batches,
        alpha=0.9,
        forward=lambda m, b: m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]),
    )
    return ModelMethodOutput(merged=merged, info={"params": {"alpha": 0.9}})


#: aTLAS's few-shot setting in the bench: this many labeled train examples per class of each task.
FEW_SHOT_PER_CLASS = 16


def few_shot_examples(task: Task, per_class: int, seed: int) -> tuple[list[str], list[int]]:
    """The first ``per_class`` examples of each class in a ``seed``-shuffled order of ``task``'s train split."""
    train = list(task.split("train"))
    random.Random(seed).shuffle(train)
    taken: dict[int, int] = {}
    chosen = []
    for example in train:
        if taken.get(example.label, 0) < per_class:
            taken[example.label] = taken.get(example.label, 0) + 1
            chosen.append(example)
    return [e.text for e in chosen], [e.label for e in chosen]


def _labeled_batches(
    encoder: Encoder, task: Task, inputs: ModelMethodInputs
) -> list[tuple[Any, torch.Tensor]]:
    texts, labels = few_shot_examples(task, FEW_SHOT_PER_CLASS, inputs.seed)
    tokens = encoder.tokenize(texts, inputs.max_length)
    y = torch.tensor(labels)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(inputs.seed))
    return [(tokens.select(i), y[i]) for i in order.split(16)]


def _adamerging(
    granularity: str, ties_density: float | None, objective: str = "entropy"
) -> Callable[[ModelMethodInputs], ModelMethodOutput]:
    def run(inputs: ModelMethodInputs) -> ModelMethodOutput:
        from transfuse.adapt import adamerge
        from transfuse.adapt.text_experts import text_adaptation

        encoder = Encoder.from_state_dict(inputs.base, inputs.architecture)
        texts = {
            t.name: encoder.tokenize(t.texts("test")[: inputs.test_examples], inputs.max_length)
            for t in inputs.tasks
        }
        adaptation = text_adaptation(
            dict(inputs.heads),
            texts,
            backbone_dir=inputs.architecture,
            seed=inputs.seed,
            device=inputs.device,
        )
        batches: Mapping[str, Any] = adaptation.batches
        if objective == "cross_entropy":  # few labeled train examples instead of the unlabeled test inputs
            batches = {t.name: _labeled_batches(encoder, t, inputs) for t in inputs.tasks}
        base = {k: v for k, v in adaptation.base.items() if k in inputs.base}
        vectors = {
            t.name: {n: e[n].float() - b.float() for n, b in base.items() if b.is_floating_point()}
            for t, e in zip(inputs.tasks, inputs.experts)
        }
        result = adamerge(
            base,
            vectors,
            adaptation.forward,
            batches,
            granularity=granularity,
            objective=objective,
            init=inputs.adaptive_init,
            steps=inputs.adaptive_steps,
            ties_density=ties_density,
            time_budget_s=inputs.adaptive_budget_s,
            progress=inputs.progress,
            seed=inputs.seed,
        )
        merged = result.merged_state_dict()
        coefficients = result.coefficients
        info = {
            "params": {
                "granularity": granularity,
                "init": inputs.adaptive_init,
                **(
                    {"objective": objective, "shots_per_class": FEW_SHOT_PER_CLASS}
                    if objective != "entropy"
                    else {}
                ),
                "steps": result.steps,
                **({"ties_density": ties_density} if ties_density is not None else {}),
            },
            "adaptation": {
                "entropy_first": result.entropy[0] if result.entropy else None,
                "entropy_last": result.entropy[-1] if result.entropy else None,
                "steps": result.steps,
                "stopped_by_time_budget": result.stopped_by_time_budget,
                "seconds": round(result.seconds, 1),
                "coefficients": len(coefficients),
                "coefficient_mean": round(float(coefficients.mean()), 4),
            },
        }
        return ModelMethodOutput(merged={**inputs.base, **merged}, info=info)

    return run


def _wemoe(inputs: ModelMethodInputs) -> ModelMethodOutput:
    from transfuse.models.backbone import mean_pool
    from transfuse.routed.wemoe import feed_forward_blocks, wemoe_merge
    from transfuse.routed.wemoe_train import train_wemoe_router

    names = [t.name for t in inputs.tasks]
    encoder = Encoder.from_state_dict(inputs.base, inputs.architecture, device=inputs.device)
    module = encoder.model
    routed = wemoe_merge(
        inputs.base,
        dict(zip(names, inputs.experts)),
        module,
        feed_forward_blocks(module),
        init_lambda=inputs.adaptive_init,
        token_mask_kwarg="attention_mask",
        seed=inputs.seed,
    )
    batches = {}
    for task in inputs.tasks:
        tokens = encoder.tokenize(task.texts("test")[: inputs.test_examples], inputs.max_length)
        batches[task.name] = [
            {"input_ids": b.input_ids.to(inputs.device), "attention_mask": b.attention_mask.to(inputs.device)}
            for b in tokens.batches(16)
        ]
    heads = {n: h.eval().requires_grad_(False) for n, h in inputs.heads.items()}

    def forward(model: torch.nn.Module, task: str, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        hidden = model(**batch).last_hidden_state
        return heads[task](mean_pool(hidden, batch["attention_mask"]))

    training = train_wemoe_router(
        routed,
        forward,
        batches,
        steps=inputs.adaptive_steps,
        lr=1e-4,
        time_budget_s=inputs.adaptive_budget_s,
        progress=inputs.progress,
        seed=inputs.seed,
    )
    routed.eval()
    routed.config = (
        module.config
    )  # what Encoder reads of its model (hidden size) when it scores the routed one
    curve = list(getattr(training, "entropy", []) or [])
    info = {
        "params": {"init_lambda": inputs.adaptive_init, "steps": len(curve)},
        "adaptation": {
            "entropy_first": curve[0] if curve else None,
            "entropy_last": curve[-1] if curve else None,
            "steps": len(curve),
        },
        "storage": _storage_report(routed),
    }
    return ModelMethodOutput(model=Encoder(routed, encoder.tokenizer, "<wemoe>"), info=info)


#: Twin-Merging's rank for the bench: 32 of the 384 singular values of MiniLM's 384x384 / 384x1536 matrices
#: (the authors keep 10%: 38 of 384).
TWIN_RANK = 32


def _twin(inputs: ModelMethodInputs, *, rank: int = TWIN_RANK) -> ModelMethodOutput:
    from transfuse.routed.twin import twin_merge
    from transfuse.routed.twin_train import router_accuracy, train_twin_router

    names = [t.name for t in inputs.tasks]
    encoder = Encoder.from_state_dict(inputs.base, inputs.architecture, device=inputs.device)
    module = encoder.model
    # the shared expert is task arithmetic at the lambda the sweep chose on validation (0.3 when it did not run)
    routed = twin_merge(
        inputs.base,
        dict(zip(names, inputs.experts)),
        module,
        scaling=inputs.adaptive_init,
        rank=rank,
        feature_mask_kwarg="attention_mask",
        seed=inputs.seed,
    ).to(inputs.device)

    def batches(split: str, limit: int | None) -> dict[str, list[dict[str, torch.Tensor]]]:
        out = {}
        for task in inputs.tasks:
            tokens = encoder.tokenize(task.texts(split)[:limit], inputs.max_length)
            out[task.name] = [
                {
                    "input_ids": b.input_ids.to(inputs.device),
                    "attention_mask": b.attention_mask.to(inputs.device),
                }
                for b in tokens.batches(64)
            ]
        return out

    # the router learns each input's task on the validation splits (labels = the task), as the paper does
    training = train_twin_router(routed, batches("validation", None), seed=inputs.seed)
    # how often it names the right task on the test inputs the bench scores (the task is not given to the model)
    test_accuracy, test_per_task = router_accuracy(routed, batches("test", inputs.test_examples))
    routed.eval()
    # what Encoder reads of its model (hidden size) when it scores the routed one
    routed.config = module.config
    info = {
        "params": {"scaling": inputs.adaptive_init, "rank": rank, "router_epochs": training.epochs},
        "router": {
            "validation_accuracy": round(training.accuracy, 4),
            "validation_examples": sum(training.examples.values()),
            "test_accuracy": round(test_accuracy, 4),
            "test_per_task_accuracy": {t: round(a, 4) for t, a in test_per_task.items()},
            "loss_first": training.loss[0],
            "loss_last": training.loss[-1],
            "seconds": round(training.seconds, 1),
        },
        "storage": _storage_report(routed),
    }
    return ModelMethodOutput(model=Encoder(routed, encoder.tokenizer, "<twin>"), info=info)


_ADA_PAPER = "Yang et al., 'AdaMerging: Adaptive Model Merging for Multi-Task Learning', ICLR 2024"
_UNLABELED = "the unlabeled test inputs of every task (entropy minimization: test-time adaptation)"

MODEL_METHODS: dict[str, ModelMethod] = {
    "wemoe": ModelMethod(
        "wemoe",
        "routed",
        "Tang et al., 'Merging Multi-Task Models via Weight-Ensembling Mixture of Experts', ICML 2024",
        "the unlabeled test inputs of every task (router trained by entropy minimization; no task id at test)",
        _wemoe,
    ),
    "adamerging": ModelMethod(
        "adamerging", "test-time", _ADA_PAPER + " (layer-wise)", _UNLABELED, _adamerging("layer", None)
    ),
    "adamerging_task": ModelMethod(
        "adamerging_task", "test-time", _ADA_PAPER + " (task-wise)", _UNLABELED, _adamerging("task", None)
    ),
    "adamerging_block": ModelMethod(
        "adamerging_block",
        "test-time",
        _ADA_PAPER + " (block-wise coefficients, as aTLAS groups them)",
        _UNLABELED,
        _adamerging("block", None),
    ),
    "atlas": ModelMethod(
        "atlas",
        "needs-statistics",
        "Zhang et al., 'Knowledge Composition using Task Vectors with Learned Anisotropic Scaling', NeurIPS 2024 "
        "(block-wise coefficients, few-shot labeled)",
        f"{FEW_SHOT_PER_CLASS} labeled train examples per class of every task (cross-entropy)",
        _adamerging("block", None, "cross_entropy"),
    ),
    "adamerging_plusplus": ModelMethod(
        "adamerging_plusplus",
        "test-time",
        _ADA_PAPER + " (layer-wise AdaMerging++ on TIES-trimmed vectors)",
        _UNLABELED,
        _adamerging("layer", 0.2),
    ),
    "regmean_plusplus": ModelMethod(
        name="regmean_plusplus",
        family="needs-statistics",
        paper="Nguyen et al., 'RegMean++: Enhancing Effectiveness and Generalization of Regression Mean for "
        "Model Merging', arXiv:2508.03121, 2025",
        data="Gram matrices of each task's train examples, block by block through the merged model",
        run=_regmean_plusplus,
    ),
    "twin": ModelMethod(
        name="twin",
        family="routed",
        paper="Lu et al., 'Twin-Merging: Dynamic Integration of Modular Expertise in Model Merging', NeurIPS 2024",
        data="the validation inputs of every task with their task (router trained to name the task; no task id "
        "at test)",
        run=_twin,
    ),
    "emr": ModelMethod(
        name="emr",
        family="routed",
        paper="Huang et al., 'EMR-Merging: Tuning-Free High-Performance Model Merging', NeurIPS 2024",
        data="the task id of each test example (per-task masks and rescalers)",
        run=_emr,
    ),
}


def model_method(name: str) -> ModelMethod | None:
    return MODEL_METHODS.get(name)


def split_methods(methods: Sequence[str] | None) -> tuple[list[str] | None, list[str]]:
    """(per-tensor method names or None for the default, whole-model method names)."""
    if methods is None:
        return None, []
    whole = [m for m in methods if m in MODEL_METHODS]
    rest = [m for m in methods if m not in MODEL_METHODS]
    return rest, whole
