"""The bench's small grid is derived from the sweep's full grid: same methods, same knobs, two values each."""

from __future__ import annotations

import itertools

from transfuse.bench.config import SMALL_GRID_VALUES, BenchConfig, small_grids
from transfuse.eval.sweep import DEFAULT_GRIDS


def test_every_tuned_method_has_two_small_values_on_its_main_knob():
    small = small_grids()
    assert list(small) == list(DEFAULT_GRIDS)
    assert set(SMALL_GRID_VALUES) == {m for m, grid in DEFAULT_GRIDS.items() if grid}
    for method, grid in small.items():
        assert list(grid) == list(DEFAULT_GRIDS[method])  # the full grid's knobs, in its order
        points = list(itertools.product(*grid.values()))
        assert len(points) == (2 if grid else 1)


def test_the_sum_style_methods_tune_lambda_at_density_0_2():
    assert small_grids()["dare_ties"] == {"density": (0.2,), "lambda": (0.15, 0.3)}
    assert small_grids()["ties"] == {"density": (0.1, 0.2)}
    assert BenchConfig.preset_config("default").grids() == small_grids()
    assert BenchConfig.preset_config("full").grids() is None  # the sweep's own DEFAULT_GRIDS
