"""`transfuse bench`: experts, baselines and every merge method on a task pool, with a report and plots.

>>> from transfuse.bench import BenchConfig, run_bench, write_report
>>> report = run_bench(BenchConfig.preset_config("quick"))
>>> write_report(report, "bench-report")      # report.json, report.md, normalized.png, per_task.png
"""

from __future__ import annotations

from transfuse.bench.config import PRESETS, SMALL_GRIDS, BenchConfig, BenchConfigError
from transfuse.bench.report import REPORT_SCHEMA, build_report, render_markdown, write_report
from transfuse.bench.runner import default_cache_dir, run_bench

__all__ = [
    "PRESETS",
    "REPORT_SCHEMA",
    "SMALL_GRIDS",
    "BenchConfig",
    "BenchConfigError",
    "build_report",
    "default_cache_dir",
    "render_markdown",
    "run_bench",
    "write_report",
]
