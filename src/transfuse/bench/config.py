"""What a `transfuse bench` run does: the task pool, the experts' budget, the evaluation sizes and the grids.

Three presets (``BenchConfig.preset_config(name)``); any field can be overridden:

=========  ======================  ======  ===========  ==================  =====  ==================================
preset     tasks                   steps   train / task test / validation  grid   for
                                   /expert              examples per task
=========  ======================  ======  ===========  ==================  =====  ==================================
quick      3 short-text tasks      40      200          60 / 30             none   CI and a first look (minutes)
default    all 8 TEXT-8 tasks      40      all          100 / 40            small  the main job (<= 15 min cold on 2 cores)
full       all 8 TEXT-8 tasks      150     all          all / all           full   docs/results.md
=========  ======================  ======  ===========  ==================  =====  ==================================

The experts' recipe is the one of :mod:`transfuse.train.experts` (batch 16, length 48, AdamW, encoder LR 3e-5,
head LR 2e-3); only the number of steps differs between presets.  The multi-task baseline gets the same total
budget as all the experts together (``steps x tasks``).  Test and validation subsets are the first N examples of
each split (the stored order is shuffled, class-balanced in expectation).

Grids (the candidates besides each method's registry defaults, chosen on validation):
``full`` is :data:`transfuse.eval.DEFAULT_GRIDS`; ``small`` is :func:`small_grids`, derived from it (two values of
the main knob, :data:`SMALL_GRID_VALUES`, around what the full grid chose on validation for TEXT-8); ``none``
evaluates the defaults only.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from transfuse.errors import TransfuseError


class BenchConfigError(TransfuseError, ValueError):
    """A benchmark option is invalid."""


#: The small grid's two values of each method's main knob: the last knob of its full grid
#: (:data:`transfuse.eval.DEFAULT_GRIDS`), which says which knob that is.  The values bracket what the ``full`` grid
#: chose ON VALIDATION for eight TEXT-8 experts (docs/results.md); the sum-style methods (DARE, breadcrumbs,
#: della_linear) tune lambda at their first full-grid density, 0.2, and need a small lambda when eight task
#: vectors are added up.  Two candidates per method besides its registry defaults: three validation evaluations.
SMALL_GRID_VALUES: dict[str, tuple[float, float]] = {
    "task_arithmetic": (0.15, 0.3),
    "magmax": (0.5, 0.7),
    "consensus": (0.3, 0.5),
    "ties": (0.1, 0.2),
    "della": (0.5, 0.7),
    "pcb": (0.05, 0.2),
    "dare_linear": (0.15, 0.3),
    "dare_ties": (0.15, 0.3),
    "breadcrumbs": (0.15, 0.3),
    "breadcrumbs_ties": (0.15, 0.3),
    "della_linear": (0.15, 0.3),
    "tsv": (0.5, 1.5),
    "iso_c": (1.5, 2.0),
    "iso_cts": (1.5, 2.0),
    "slerp": (0.25, 0.75),
    "nearswap": (1e-4, 1e-3),  # t on the scale of |delta| (the full grid's 1e-4 ... 1e-2)
    "regmean": (0.5, 1.0),  # alpha around its default 0.9
    "wudi": (0.75, 1.25),  # alpha (output scale) around 1, with the paper's Adam solver
}


def small_grids() -> dict[str, dict[str, tuple[Any, ...]]]:
    """The ``small`` grid, derived from the full one (:data:`transfuse.eval.DEFAULT_GRIDS`): per method, its last
    knob takes the two values of :data:`SMALL_GRID_VALUES` and every other knob its first full-grid value.  A
    method with an empty full grid (linear, model_stock) has an empty one here; a method without small values
    keeps its full grid."""
    from transfuse.eval.sweep import DEFAULT_GRIDS  # imported here: loading the sweep loads torch and methods

    grids: dict[str, dict[str, tuple[Any, ...]]] = {}
    for method, full in DEFAULT_GRIDS.items():
        if not full or method not in SMALL_GRID_VALUES:
            grids[method] = dict(full)
            continue
        *held, main = full
        grids[method] = {**{knob: tuple(full[knob][:1]) for knob in held}, main: SMALL_GRID_VALUES[method]}
    return grids


GRID_CHOICES = ("none", "small", "full")

#: Tasks of the quick preset: short texts (cheap to embed) with different label sets.
QUICK_TASKS = ("fortunes_language", "wordnet_pos", "bing_sentiment")


@dataclass(frozen=True)
class BenchConfig:
    """Options of one benchmark run (see the module docstring for the presets)."""

    preset: str = "default"
    pool: str = "text8"
    tasks: tuple[str, ...] | None = None
    methods: tuple[str, ...] | None = None  # None: every data-free method (the only family the bench runs)
    steps: int = 40
    max_train: int | None = None
    test_examples: int | None = 100
    validation_examples: int | None = 40
    grid: str = "small"
    batch_size: int = 16
    max_length: int = 48
    seed: int = 0
    device: str = "cpu"
    backbone: str | None = None
    # statistics-based methods: train examples per task for each expert's statistics
    statistics_examples: int = 256
    # test-time methods (AdaMerging): at most this many steps, or this many seconds (None: no limit)
    adaptive_steps: int = 100
    adaptive_budget_s: float | None = 600.0

    def __post_init__(self) -> None:
        if self.grid not in GRID_CHOICES:
            raise BenchConfigError(f"grid must be one of {', '.join(GRID_CHOICES)}, got {self.grid!r}")
        for name in ("steps", "batch_size", "max_length", "statistics_examples", "adaptive_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise BenchConfigError(f"{name} must be a positive integer, got {value!r}")
        for name in ("max_train", "test_examples", "validation_examples"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise BenchConfigError(f"{name} must be a positive integer or None (all), got {value!r}")
        if self.tasks is not None and len(self.tasks) == 0:
            raise BenchConfigError("tasks is empty: name at least one task, or leave it unset for all")
        if self.methods is not None and len(self.methods) == 0:
            raise BenchConfigError(
                "methods is empty: name at least one method, or leave it unset for every data-free method"
            )

    @classmethod
    def preset_config(cls, name: str, **overrides: Any) -> BenchConfig:
        """The preset `name` (quick, default, full) with `overrides` replacing its fields."""
        if name not in PRESETS:
            raise BenchConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(cls)} - {"preset"})
        if unknown:
            raise BenchConfigError(f"unknown benchmark option(s): {', '.join(unknown)}")
        return cls(preset=name, **{**PRESETS[name], **overrides})

    def grids(self) -> dict[str, Any] | None:
        """The `grids` argument of :func:`~transfuse.eval.run_method_sweep` (None: its default grids)."""
        return small_grids() if self.grid == "small" else None

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["tasks"] = list(self.tasks) if self.tasks is not None else None
        out["methods"] = list(self.methods) if self.methods is not None else None
        return out


PRESETS: dict[str, dict[str, Any]] = {
    "quick": dict(
        tasks=QUICK_TASKS, steps=40, max_train=200, test_examples=60, validation_examples=30, grid="none"
    ),
    "default": dict(steps=40, test_examples=100, validation_examples=40, grid="small"),
    "full": dict(steps=150, test_examples=None, validation_examples=None, grid="full"),
}
