"""Mixtures of experts from dense fine-tunes of one base (``transfuse moe``, MergeKit's ``mergekit-moe`` recipes).

- :mod:`transfuse.moe.recipe`: the YAML recipe (``MoeRecipe``), validated before any model is opened;
- :mod:`transfuse.moe.gates`: the router rows of each gate mode (formulas in its docstring and docs/moe.md);
- :mod:`transfuse.moe.build`: the checks, the Mixtral config and the streamed, atomic build (``build_moe``).
"""

from __future__ import annotations

from transfuse._lazy import lazy_exports

__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "build_moe": "build",
        "plan_moe": "build",
        "MoePlan": "build",
        "MoeResult": "build",
        "MoeRecipe": "recipe",
        "load_moe_recipe": "recipe",
        "GATE_MODES": "recipe",
    },
)

__all__ = ["GATE_MODES", "MoePlan", "MoeRecipe", "MoeResult", "build_moe", "load_moe_recipe", "plan_moe"]
