"""Task suites: labelled text tasks with fixed splits and provenance.

>>> from transfuse.data import load_task_suite
>>> suite = load_task_suite("text8")          # the eight TEXT-8 tasks, from the committed prepared copy
>>> task = suite["kjv_section"]
>>> task.label_names, len(task.train), task.train[0].text, task.train[0].label

- :func:`load_task_suite` -- a built-in suite, a prepared directory, or one user file;
- :func:`load_task_file` -- a user's CSV / TSV / JSONL / JSON task;
- :func:`load_hf_task` -- a Hugging Face ``datasets`` dataset (optional dependency);
- :func:`build_text8` -- regenerate the TEXT-8 prepared copy from the Debian packages (needs ``rdata``).

Each name is imported from its module on first use, so importing one module of this package loads only that one.
"""

from __future__ import annotations

from transfuse._lazy import lazy_exports

# public name -> the module of this package that defines it
_DEFINED_IN = {
    "DedupReport": "splits",
    "Example": "task",
    "SplitSizes": "splits",
    "TEXT8_PACKAGES": "text8",
    "TEXT8_PREPARED_DIR": "text8:PREPARED_DIR",
    "TEXT8_TASKS": "text8",
    "Task": "task",
    "TaskDataError": "task",
    "UnknownTaskError": "task",
    "TaskSuite": "task",
    "build_text8": "text8",
    "dedup_examples": "splits",
    "load_hf_task": "task",
    "load_prepared_suite": "task",
    "load_task_file": "task",
    "load_task_suite": "task",
    "normalize_text": "splits",
    "split_balanced": "splits",
    "split_stratified": "splits",
}
__all__ = sorted(_DEFINED_IN)
__getattr__, __dir__ = lazy_exports(__name__, _DEFINED_IN)
