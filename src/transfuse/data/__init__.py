"""Task suites: labelled text tasks with fixed splits and provenance.

>>> from transfuse.data import load_task_suite
>>> suite = load_task_suite("text8")          # the eight TEXT-8 tasks, from the committed prepared copy
>>> task = suite["kjv_section"]
>>> task.label_names, len(task.train), task.train[0].text, task.train[0].label

- :func:`load_task_suite` -- a built-in suite, a prepared directory, or one user file;
- :func:`load_task_file` -- a user's CSV / TSV / JSONL / JSON task;
- :func:`load_hf_task` -- a Hugging Face ``datasets`` dataset (optional dependency);
- :func:`build_text8` -- regenerate the TEXT-8 prepared copy from the Debian packages (needs ``rdata``).
"""

from __future__ import annotations

from transfuse.data.splits import (
    DedupReport,
    SplitSizes,
    dedup_examples,
    normalize_text,
    split_balanced,
    split_stratified,
)
from transfuse.data.task import (
    Example,
    Task,
    TaskDataError,
    TaskSuite,
    UnknownTaskError,
    load_hf_task,
    load_prepared_suite,
    load_task_file,
    load_task_suite,
)
from transfuse.data.text8 import PREPARED_DIR as TEXT8_PREPARED_DIR
from transfuse.data.text8 import TEXT8_PACKAGES, TEXT8_TASKS, build_text8

__all__ = [
    "DedupReport",
    "Example",
    "SplitSizes",
    "TEXT8_PACKAGES",
    "TEXT8_PREPARED_DIR",
    "TEXT8_TASKS",
    "Task",
    "TaskDataError",
    "UnknownTaskError",
    "TaskSuite",
    "build_text8",
    "dedup_examples",
    "load_hf_task",
    "load_prepared_suite",
    "load_task_file",
    "load_task_suite",
    "normalize_text",
    "split_balanced",
    "split_stratified",
]
