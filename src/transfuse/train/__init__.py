"""Fine-tune task experts and a multi-task reference model with one fixed, seeded recipe.

>>> from transfuse.train import train_experts, train_multitask
>>> experts = train_experts(load_task_suite("text8"), "cache/")      # {task: Expert}, cached by recipe
>>> experts["kjv_section"].path, experts["kjv_section"].test_accuracy
"""

from __future__ import annotations

from transfuse.train.experts import (
    Expert,
    ExpertRecipe,
    TrainingError,
    expert_dir,
    load_expert,
    recipe_hash,
    task_fingerprint,
    train_expert,
    train_experts,
    train_multitask,
)

__all__ = [
    "Expert",
    "ExpertRecipe",
    "TrainingError",
    "expert_dir",
    "load_expert",
    "recipe_hash",
    "task_fingerprint",
    "train_expert",
    "train_experts",
    "train_multitask",
]
