"""Tasks and task suites: labelled text with fixed train / validation / test splits and their provenance.

A :class:`Task` holds the three splits as lists of :class:`Example` ``(text, label)`` pairs, label ids
``0..K-1`` naming ``label_names[id]``. A :class:`TaskSuite` is an ordered collection of tasks, looked up by
name or position.

Loaders:

- :func:`load_task_suite` reads a prepared suite: the built-in ``"text8"`` (committed in the package, read
  with the standard library only) or a directory written by :func:`transfuse.data.build_text8`, or wraps one
  user task file as a suite of one;
- :func:`load_task_file` reads a user's own CSV / TSV / JSONL / JSON file;
- :func:`load_hf_task` converts a Hugging Face ``datasets`` dataset (needs the optional ``datasets`` package).

Prepared format: a directory with ``manifest.json`` and one gzipped JSON-lines file per task, one line per
example, ``{"label": 3, "split": "train", "text": "..."}``, splits in the order train, validation, test.
The manifest lists, per task, the file, its sha256, the label names, the split counts, the provenance and
the licence.
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import hashlib
import io
import json
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, NamedTuple

from transfuse.errors import TransfuseError

SPLIT_NAMES = ("train", "validation", "test")

#: Accepted spellings of the split names in a user's split column.
SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "validation": "validation",
    "valid": "validation",
    "val": "validation",
    "dev": "validation",
    "test": "test",
    "testing": "test",
}

#: Format version of prepared suites (manifest ``format_version``).
PREPARED_FORMAT_VERSION = 1

#: Built-in prepared suites shipped inside the package.
BUILTIN_SUITES = ("text8",)


class TaskDataError(TransfuseError, ValueError):
    """A task file or suite is unusable: missing column, empty file, a single class, bad split names,
    or a prepared file whose checksum does not match its manifest."""


class UnknownTaskError(TaskDataError, KeyError):
    """A task name the suite does not have (a KeyError too, as for a dict)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class Example(NamedTuple):
    """One labelled text. ``label`` is an id into the task's ``label_names``."""

    text: str
    label: int


def _as_examples(split: str, rows: Iterable[Any], num_classes: int) -> list[Example]:
    out = []
    for row in rows:
        text, label = row
        if not isinstance(text, str):
            raise TaskDataError(f"{split}: text {text!r} is not a string")
        label = int(label)
        if not 0 <= label < num_classes:
            raise TaskDataError(f"{split}: label id {label} is outside 0..{num_classes - 1}")
        out.append(Example(text, label))
    return out


@dataclass(frozen=True)
class Task:
    """A text-classification task with fixed splits.

    ``train``, ``validation`` and ``test`` are lists of :class:`Example` (any ``(text, label_id)`` pairs are
    converted). ``validation`` may be empty (then choose hyperparameters on a part of ``train``).
    """

    name: str
    label_names: list[str]
    train: list[Example]
    validation: list[Example]
    test: list[Example]
    provenance: str = ""
    licence: str = ""
    description: str = ""
    metadata: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not self.name:
            raise TaskDataError("a task needs a name")
        names = [str(n) for n in self.label_names]
        if len(names) < 2:
            raise TaskDataError(f"task {self.name!r}: needs at least two classes, got {names}")
        if len(set(names)) != len(names):
            raise TaskDataError(f"task {self.name!r}: label names repeat: {names}")
        object.__setattr__(self, "label_names", names)
        for split in SPLIT_NAMES:
            object.__setattr__(self, split, _as_examples(split, getattr(self, split), len(names)))
        if not self.train:
            raise TaskDataError(f"task {self.name!r}: the train split is empty")

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    def split(self, name: str) -> list[Example]:
        """The examples of split `name` (``train``, ``validation`` or ``test``; ``val``/``dev`` accepted)."""
        canonical = SPLIT_ALIASES.get(name)
        if canonical is None:
            raise KeyError(f"unknown split {name!r}; splits are {', '.join(SPLIT_NAMES)}")
        return getattr(self, canonical)

    def texts(self, split: str) -> list[str]:
        return [e.text for e in self.split(split)]

    def labels(self, split: str) -> list[int]:
        return [e.label for e in self.split(split)]

    def class_counts(self, split: str) -> list[int]:
        """Number of examples of each label id in `split`."""
        counts = [0] * self.num_classes
        for e in self.split(split):
            counts[e.label] += 1
        return counts

    def with_max_train(self, max_train: int | None) -> Task:
        """This task with at most `max_train` training examples, as class-balanced as possible.

        Classes take turns in the stored (seeded) order, so a smaller `max_train` gives a subset of a
        larger one. Validation and test are unchanged.
        """
        if max_train is None or max_train >= len(self.train):
            return self
        if max_train < 1:
            raise TaskDataError(f"max_train must be >= 1, got {max_train}")
        from transfuse.data.splits import balanced_subset

        return dataclasses.replace(self, train=balanced_subset(self.train, self.num_classes, max_train))

    def summary(self) -> dict[str, Any]:
        """Counts per split and per class, for reports."""
        return {
            "name": self.name,
            "classes": self.num_classes,
            "label_names": list(self.label_names),
            **{split: len(getattr(self, split)) for split in SPLIT_NAMES},
            "class_counts": {split: self.class_counts(split) for split in SPLIT_NAMES},
        }


@dataclass(frozen=True)
class TaskSuite:
    """An ordered collection of tasks with distinct names; ``suite["name"]`` or ``suite[0]`` looks one up."""

    name: str
    tasks: tuple[Task, ...]
    manifest: dict[str, Any] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "tasks", tuple(self.tasks))
        names = [t.name for t in self.tasks]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise TaskDataError(f"suite {self.name!r}: task names repeat: {repeated}")

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def __len__(self) -> int:
        return len(self.tasks)

    def __iter__(self) -> Iterator[Task]:
        return iter(self.tasks)

    def __contains__(self, name: object) -> bool:
        return any(t.name == name for t in self.tasks)

    def __getitem__(self, key: str | int) -> Task:
        if isinstance(key, int):
            return self.tasks[key]
        for task in self.tasks:
            if task.name == key:
                return task
        raise UnknownTaskError(f"suite {self.name!r} has no task {key!r}; tasks: {', '.join(self.names)}")

    def select(self, names: Sequence[str]) -> TaskSuite:
        """A suite of the named tasks, in the order given."""
        if isinstance(names, str):
            names = [names]
        return TaskSuite(self.name, tuple(self[n] for n in names), self.manifest)

    def with_max_train(self, max_train: int | None) -> TaskSuite:
        return TaskSuite(self.name, tuple(t.with_max_train(max_train) for t in self.tasks), self.manifest)


# --------------------------------------------------------------------------------------------------------
# Prepared suites (manifest.json + one gzipped JSONL per task)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def gzip_bytes(data: bytes) -> bytes:
    """Gzip with a fixed header (no file name, mtime 0) so equal input gives equal bytes."""
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, compresslevel=9, mtime=0) as gz:
        gz.write(data)
    return buf.getvalue()


def task_jsonl_bytes(task: Task) -> bytes:
    """The uncompressed prepared file of `task`: one sorted-key JSON object per line, train first."""
    lines = []
    for split in SPLIT_NAMES:
        for e in getattr(task, split):
            obj = {"label": e.label, "split": split, "text": e.text}
            lines.append(json.dumps(obj, ensure_ascii=False, sort_keys=True, separators=(",", ":")))
    return ("\n".join(lines) + "\n").encode("utf-8")


def manifest_bytes(manifest: Mapping[str, Any]) -> bytes:
    return (json.dumps(manifest, ensure_ascii=False, indent=2, sort_keys=True) + "\n").encode("utf-8")


def _builtin_dir(name: str) -> Any:
    return resources.files("transfuse.data").joinpath("prepared", name)


def _read_prepared_task(directory: Any, entry: Mapping[str, Any], verify: bool) -> Task:
    name = entry["name"]
    data = directory.joinpath(entry["file"]).read_bytes()
    if verify and sha256_bytes(data) != entry["sha256"]:
        raise TaskDataError(
            f"task {name!r}: {entry['file']} does not match the sha256 in manifest.json "
            "(the prepared copy is corrupt or was edited; rebuild it with build_text8)"
        )
    rows: dict[str, list[Example]] = {split: [] for split in SPLIT_NAMES}
    for line in gzip.decompress(data).decode("utf-8").splitlines():
        obj = json.loads(line)
        rows[obj["split"]].append(Example(obj["text"], obj["label"]))
    for split in SPLIT_NAMES:
        expected = entry["counts"][split]
        if len(rows[split]) != expected:
            raise TaskDataError(
                f"task {name!r}: {split} has {len(rows[split])} examples, manifest says {expected}"
            )
    return Task(
        name=name,
        label_names=list(entry["label_names"]),
        provenance=entry.get("provenance", ""),
        licence=entry.get("licence", ""),
        description=entry.get("description", ""),
        metadata={
            k: v for k, v in entry.items() if k not in {"name", "label_names", "provenance", "licence"}
        },
        **rows,
    )


def load_prepared_suite(
    directory: str | Path | Any,
    *,
    tasks: Sequence[str] | None = None,
    max_train: int | None = None,
    verify: bool = True,
) -> TaskSuite:
    """Read a prepared suite directory (``manifest.json`` + task files); `verify` checks each sha256."""
    if isinstance(directory, str):
        directory = Path(directory)
    manifest_file = directory.joinpath("manifest.json")
    if not manifest_file.is_file():
        raise TaskDataError(f"{directory} has no manifest.json: not a prepared task suite")
    manifest = json.loads(manifest_file.read_bytes().decode("utf-8"))
    version = manifest.get("format_version")
    if version != PREPARED_FORMAT_VERSION:
        raise TaskDataError(
            f"{directory}: prepared format version {version!r}; this transfuse reads {PREPARED_FORMAT_VERSION}"
        )
    entries = {e["name"]: e for e in manifest["tasks"]}
    if tasks is None:
        names = [e["name"] for e in manifest["tasks"]]
    else:
        names = [tasks] if isinstance(tasks, str) else list(tasks)
        unknown = [n for n in names if n not in entries]
        if unknown:
            raise UnknownTaskError(
                f"suite {manifest['suite']!r} has no task {unknown}; tasks: {', '.join(entries)}"
            )
    loaded = tuple(
        _read_prepared_task(directory, entries[n], verify).with_max_train(max_train) for n in names
    )
    return TaskSuite(manifest["suite"], loaded, manifest)


#: File names a folder of user task files may hold (one task each; ``.gz`` of them too).
TASK_FILE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".ndjson", ".json")

#: Prefix of a Hugging Face ``datasets`` id in a pool spec: ``hf:ag_news`` or ``hf:glue/sst2``.
HF_PREFIX = "hf:"


def _is_task_file(path: Path) -> bool:
    name = path.name.lower().removesuffix(".gz")
    return path.is_file() and name.endswith(TASK_FILE_SUFFIXES)


def _load_one_source(source: str) -> Task:
    """One task of a user pool: a task file, or ``hf:DATASET[/CONFIG]`` (needs `datasets` and network)."""
    if source.startswith(HF_PREFIX):
        dataset, _, config = source[len(HF_PREFIX) :].partition("/")
        if not dataset:
            raise TaskDataError(f"{source!r}: give a dataset id after {HF_PREFIX!r}, e.g. hf:ag_news")
        return load_hf_task(dataset, config=config or None)
    return load_task_file(source)  # raises TaskDataError for a missing file


def _user_suite(name: str, sources: Sequence[str]) -> TaskSuite:
    loaded = [_load_one_source(s) for s in sources]
    seen: dict[str, str] = {}
    for task, source in zip(loaded, sources, strict=True):
        if task.name in seen:
            raise TaskDataError(
                f"two tasks are named {task.name!r} ({seen[task.name]} and {source}): rename one file"
            )
        seen[task.name] = source
    return TaskSuite(name, tuple(loaded))


def load_task_suite(
    name_or_path: str | Path = "text8",
    *,
    tasks: Sequence[str] | None = None,
    max_train: int | None = None,
    verify: bool = True,
) -> TaskSuite:
    """Load a task suite (a pool of tasks) from any of:

    - ``"text8"``: the eight TEXT-8 tasks, read from the prepared copy committed in the package (no apt, no
      network, standard library only). ``build_text8`` regenerates it from the Debian packages.
    - a directory with ``manifest.json`` (as written by ``build_text8``);
    - a directory of task files (``.csv`` / ``.tsv`` / ``.jsonl`` / ``.json``, optionally ``.gz``): one
      task per file, named after the file, in file-name order (see :func:`load_task_file` for the format);
    - one task file: a suite holding that one task;
    - ``hf:DATASET`` or ``hf:DATASET/CONFIG``: a Hugging Face ``datasets`` dataset (needs the ``datasets``
      package and network; see :func:`load_hf_task`);
    - a comma-separated list of task files and ``hf:`` ids: one task each, in that order.

    `tasks` picks tasks by name, in that order; `max_train` caps each training split (class-balanced).
    Raises :class:`TaskDataError` for anything else, and for two tasks of one name.
    """
    if isinstance(name_or_path, str) and name_or_path in BUILTIN_SUITES:
        return load_prepared_suite(
            _builtin_dir(name_or_path), tasks=tasks, max_train=max_train, verify=verify
        )
    path = Path(name_or_path)
    if path.is_dir():
        if path.joinpath("manifest.json").is_file():
            return load_prepared_suite(path, tasks=tasks, max_train=max_train, verify=verify)
        files = sorted(p for p in path.iterdir() if _is_task_file(p))
        if not files:
            raise TaskDataError(
                f"{path} has neither a manifest.json (a prepared suite) nor task files "
                f"({', '.join(TASK_FILE_SUFFIXES)}): put one CSV/JSONL file per task there"
            )
        suite = _user_suite(path.resolve().name, [str(f) for f in files])
    elif path.is_file():
        task = load_task_file(path)
        suite = TaskSuite(task.name, (task,))
    else:
        text = str(name_or_path)
        sources = [s.strip() for s in text.split(",") if s.strip()]
        if not sources or not all(s.startswith(HF_PREFIX) or Path(s).is_file() for s in sources):
            raise TaskDataError(
                f"{text!r} is neither a built-in suite ({', '.join(BUILTIN_SUITES)}), an existing prepared "
                f"directory, a directory of task files, a task file, an {HF_PREFIX}DATASET id, nor a "
                "comma-separated list of task files and hf: ids"
            )
        suite = _user_suite(sources[0].removeprefix(HF_PREFIX) if len(sources) == 1 else "custom", sources)
    suite = suite.with_max_train(max_train)
    return suite if tasks is None else suite.select(tasks)


# --------------------------------------------------------------------------------------------------------
# A user's own task: CSV / TSV / JSONL / JSON


def _read_records(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """Rows of a task file as dicts, and the column names seen."""
    file_name = path.name.lower()
    raw = path.read_bytes()
    if file_name.endswith(".gz"):
        raw = gzip.decompress(raw)
        file_name = file_name[: -len(".gz")]
    suffix = Path(file_name).suffix
    text = raw.decode("utf-8-sig")
    if not text.strip():
        raise TaskDataError(f"{path}: the file is empty")
    if suffix in (".csv", ".tsv"):
        reader = csv.DictReader(io.StringIO(text), delimiter="\t" if suffix == ".tsv" else ",")
        columns = list(reader.fieldnames or [])
        rows = [dict(r) for r in reader]
        if any(None in r for r in rows):
            raise TaskDataError(f"{path}: some rows have more fields than the header {columns}")
        return rows, columns
    if suffix in (".jsonl", ".ndjson", ".json"):
        stripped = text.lstrip()
        if suffix == ".json" and stripped.startswith("["):
            records = json.loads(text)
        else:
            records = []
            for lineno, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError as exc:
                        raise TaskDataError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
        if not all(isinstance(r, dict) for r in records):
            raise TaskDataError(f"{path}: every record must be a JSON object")
        columns: list[str] = []
        for r in records:
            columns.extend(k for k in r if k not in columns)
        return records, columns
    raise TaskDataError(f"{path}: unknown task file type {suffix!r}; use .csv, .tsv, .jsonl or .json")


def _label_names(values: Iterable[str]) -> list[str]:
    distinct = set(values)
    try:
        return [str(v) for v in sorted(distinct, key=lambda v: int(v))]
    except ValueError:
        return sorted(distinct)


def task_from_rows(
    name: str,
    rows: Sequence[tuple[str, Any, str | None]],
    *,
    label_names: Sequence[str] | None = None,
    seed: int = 0,
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
    provenance: str = "",
    licence: str = "",
    source: str = "",
) -> Task:
    """Build a task from ``(text, label_value, split_or_None)`` rows.

    If no row has a split, duplicates are removed (whitespace-normalized; texts with two labels dropped)
    and the rows are split by :func:`transfuse.data.splits.split_stratified` with `fractions`. If every row
    has a split, the given splits are kept (texts whitespace-normalized), except that a validation or test
    row whose text is already in train (or, for test, in validation) is dropped with a warning, so no text is
    scored on data it was trained on; a missing validation split is then allowed, a missing train or test
    split is an error. Label names are the
    distinct label values, sorted (numerically when they are all integers), unless `label_names` is given.
    """
    from transfuse.data.splits import dedup_examples, normalize_text, split_stratified

    where = source or name
    if not rows:
        raise TaskDataError(f"{where}: no rows")
    labels = ["" if label is None else str(label).strip() for _, label, _ in rows]
    if any(label == "" for label in labels):
        raise TaskDataError(f"{where}: some rows have an empty label")
    names = list(label_names) if label_names is not None else _label_names(labels)
    index = {n: i for i, n in enumerate(names)}
    unknown = sorted(set(labels) - set(index))
    if unknown:
        raise TaskDataError(f"{where}: labels {unknown[:10]} are not among label_names {names}")
    if len(set(labels)) < 2:
        raise TaskDataError(
            f"{where}: only one class ({labels[0]!r}); a classification task needs two or more"
        )
    splits_given = [s for _, _, s in rows]
    has_split = [s is not None and str(s).strip() != "" for s in splits_given]
    if any(has_split) and not all(has_split):
        raise TaskDataError(f"{where}: the split column is empty in some rows; fill it in every row or none")
    common = dict(provenance=provenance, licence=licence)
    if not any(has_split):
        examples, report = dedup_examples((str(t), index[lab]) for (t, _, _), lab in zip(rows, labels))
        if len({e.label for e in examples}) < 2:
            raise TaskDataError(f"{where}: only one class is left after removing empty and duplicate texts")
        parts = split_stratified(examples, len(names), fractions=fractions, seed=seed)
        return Task(name, names, **parts, metadata={"dedup": report.as_dict(), "seed": seed}, **common)
    parts: dict[str, list[Example]] = {s: [] for s in SPLIT_NAMES}
    for (text, _, split), label in zip(rows, labels):
        canonical = SPLIT_ALIASES.get(str(split).strip().lower())
        if canonical is None:
            raise TaskDataError(
                f"{where}: unknown split {split!r}; use train, validation (val, valid, dev) or test"
            )
        parts[canonical].append(Example(normalize_text(str(text)), index[label]))
    for required in ("train", "test"):
        if not parts[required]:
            raise TaskDataError(f"{where}: the split column names no {required!r} rows")
    # A text seen in an earlier split (train, then validation) would inflate the later split's score.
    seen = {e.text for e in parts["train"]}
    leaked = 0
    for split in ("validation", "test"):
        kept = [e for e in parts[split] if e.text not in seen]
        leaked += len(parts[split]) - len(kept)
        parts[split] = kept
        seen |= {e.text for e in kept}
    if not parts["test"]:
        raise TaskDataError(f"{where}: every test text also appears in train or validation")
    if leaked:
        warnings.warn(
            f"{where}: dropped {leaked} validation/test row(s) whose text is also in an earlier split",
            stacklevel=2,
        )
    return Task(name, names, **parts, metadata={"cross_split_duplicates_dropped": leaked}, **common)


def load_task_file(
    path: str | Path,
    *,
    name: str | None = None,
    text_column: str = "text",
    label_column: str = "label",
    split_column: str = "split",
    label_names: Sequence[str] | None = None,
    seed: int = 0,
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
    licence: str = "unknown (user data)",
) -> Task:
    """Read a user's task from a CSV, TSV, JSON-lines or JSON (list of objects) file; ``.gz`` is accepted.

    Each row has a text column and a label column (any values: names or integers). If the file has a
    `split_column`, its values (train, validation/val/valid/dev, test) fix the splits; otherwise exact
    duplicates are removed and the rows are split 80/10/10 per class with `seed` (`fractions`).
    The task is named after the file unless `name` is given.

    Raises :class:`TaskDataError` for an empty file, a missing column (naming the columns found), a single
    class, empty labels or texts-only files, and unknown split names.
    """
    path = Path(path)
    if not path.is_file():
        raise TaskDataError(f"{path}: no such task file")
    records, columns = _read_records(path)
    if not records:
        raise TaskDataError(f"{path}: the file has a header but no rows")
    for column, what in ((text_column, "text_column"), (label_column, "label_column")):
        missing = sum(1 for r in records if column not in r)
        if missing:
            raise TaskDataError(
                f"{path}: column {column!r} ({what}) is missing"
                + (f" from {missing} of {len(records)} rows" if missing < len(records) else "")
                + f"; columns found: {columns}"
            )
    rows = []
    for r in records:
        text = r[text_column]
        if text is None:
            raise TaskDataError(f"{path}: a row has no text (null in column {text_column!r})")
        rows.append((str(text), r[label_column], r.get(split_column)))
    digest = sha256_bytes(path.read_bytes())
    return task_from_rows(
        name or path.name.split(".")[0],
        rows,
        label_names=label_names,
        seed=seed,
        fractions=fractions,
        provenance=f"user file {path.name} (sha256 {digest})",
        licence=licence,
        source=str(path),
    )


# --------------------------------------------------------------------------------------------------------
# Hugging Face datasets (optional)


def load_hf_task(
    dataset: Any,
    *,
    name: str | None = None,
    config: str | None = None,
    text_column: str = "text",
    label_column: str = "label",
    seed: int = 0,
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
    licence: str = "see the dataset card",
    **load_kwargs: Any,
) -> Task:
    """A task from a Hugging Face ``datasets`` dataset: a hub id / local path, or a loaded ``DatasetDict``.

    Needs the optional ``datasets`` package (and, for hub ids, network access). Splits named ``train``,
    ``validation`` (or ``valid``/``val``/``dev``) and ``test`` are used as they are; without a test split the
    train split is divided by `fractions` like a user file; without a validation split one is carved out of
    train (``fractions[1]`` of it). Label names come from a ``ClassLabel`` feature when there is one.
    """
    if isinstance(dataset, str):
        try:
            import datasets
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise TaskDataError(
                "load_hf_task with a dataset name needs the optional 'datasets' package: pip install datasets"
            ) from exc
        source = dataset + (f"/{config}" if config else "")
        dataset = datasets.load_dataset(dataset, config, **load_kwargs)
    else:
        source = name or "dataset"
    if not hasattr(dataset, "keys"):
        dataset = {"train": dataset}
    splits = {SPLIT_ALIASES.get(str(k).lower()): dataset[k] for k in dataset.keys()}
    splits.pop(None, None)
    if "train" not in splits:
        raise TaskDataError(f"{source}: no train split (splits: {list(dataset.keys())})")
    first = splits["train"]
    for column in (text_column, label_column):
        if column not in first.column_names:
            raise TaskDataError(f"{source}: column {column!r} is missing; columns: {first.column_names}")
    feature = first.features[label_column] if hasattr(first, "features") else None
    class_names = list(getattr(feature, "names", None) or [])

    def label_of(value: Any) -> str:
        return class_names[int(value)] if class_names else str(value)

    def rows_of(ds: Any, split: str | None) -> list[tuple[str, str, str | None]]:
        return [(str(t), label_of(v), split) for t, v in zip(ds[text_column], ds[label_column])]

    task_name = name or source.replace("/", "_")
    provenance = f"Hugging Face dataset {source}"
    common = dict(seed=seed, provenance=provenance, licence=licence, source=source)
    names = class_names or None
    if "test" not in splits:
        return task_from_rows(
            task_name, rows_of(splits["train"], None), label_names=names, fractions=fractions, **common
        )
    rows = rows_of(splits["test"], "test")
    if "validation" in splits:
        rows += rows_of(splits["train"], "train") + rows_of(splits["validation"], "validation")
    else:
        carved = task_from_rows(
            task_name,
            rows_of(splits["train"], None),
            label_names=names or _label_names(label_of(v) for v in first[label_column]),
            fractions=(1.0 - fractions[1], 0.0, fractions[1]),
            **common,
        )
        rows += [(e.text, carved.label_names[e.label], "train") for e in carved.train]
        rows += [(e.text, carved.label_names[e.label], "validation") for e in carved.test]
        names = carved.label_names
    return task_from_rows(task_name, rows, label_names=names, fractions=fractions, **common)
