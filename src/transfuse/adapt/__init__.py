"""Test-time adaptive merging: learn merging coefficients on unlabeled inputs (AdaMerging, AdaMerging++).

>>> from transfuse.adapt import adamerge, adamerging_recipe_yaml
>>> result = adamerge(base, task_vectors, forward, batches, granularity="layer", steps=500)
>>> merged = result.merged_state_dict()
>>> yaml_text = adamerging_recipe_yaml(result, "base_dir", {"task_a": "expert_a", ...})   # transfuse merge replays it

Architecture-generic: ``forward(params, task, batch) -> logits`` runs any torch module on the merged state dict.
:func:`text_adaptation` builds ``forward`` and the batches for transfuse's text experts.  See docs/adaptive.md.
Each name is imported from its module on first use.
"""

from __future__ import annotations

from transfuse._lazy import lazy_exports

# public name -> the module of this package that defines it
_DEFINED_IN = {
    "AdaMergingResult": "adamerging",
    "AdaptError": "errors",
    "AdaptParameterError": "errors",
    "CoefficientLayout": "coefficients",
    "EmptyBatchesError": "errors",
    "GRANULARITIES": "coefficients",
    "NonFiniteObjectiveError": "errors",
    "RecipeExportError": "errors",
    "TaskVectorMerge": "adamerging",
    "TaskVectorMismatchError": "errors",
    "TextAdaptation": "text_experts",
    "UnknownTaskError": "errors",
    "adamerge": "adamerging",
    "adamerging_recipe": "recipe_export",
    "adamerging_recipe_yaml": "recipe_export",
    "block_group": "coefficients",
    "entropy_objective": "adamerging",
    "merge_parameters": "adamerging",
    "objective_gradient": "adamerging",
    "prediction_entropy": "adamerging",
    "text_adaptation": "text_experts",
    "text_task_vectors": "text_experts",
    "ties_task_vectors": "ties_vectors",
    "weight_filters": "recipe_export",
    "write_adamerging_recipe": "recipe_export",
}
__all__ = sorted(_DEFINED_IN)
__getattr__, __dir__ = lazy_exports(__name__, _DEFINED_IN)
