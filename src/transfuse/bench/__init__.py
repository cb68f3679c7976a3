"""`transfuse bench`: experts, baselines and every merge method on a task pool, with a report and plots.

>>> from transfuse.bench import BenchConfig, run_bench, write_report
>>> report = run_bench(BenchConfig.preset_config("quick"))
>>> write_report(report, "bench-report")      # report.json, report.md, normalized.png, per_task.png

Each name is imported from its module on first use, so importing one module of this package loads only that one.
"""

from __future__ import annotations

from transfuse._lazy import lazy_exports

# public name -> the module of this package that defines it
_DEFINED_IN = {
    "PRESETS": "config",
    "REPORT_SCHEMA": "report",
    "SMALL_GRID_VALUES": "config",
    "small_grids": "config",
    "BenchConfig": "config",
    "BenchConfigError": "config",
    "build_report": "report",
    "default_cache_dir": "runner",
    "render_markdown": "report",
    "run_bench": "runner",
    "write_report": "report",
}
__all__ = sorted(_DEFINED_IN)
__getattr__, __dir__ = lazy_exports(__name__, _DEFINED_IN)
