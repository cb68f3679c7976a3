"""A content-addressed cache of evaluations: the same weights on the same examples give the same accuracies.

The key is a sha256 over everything that determines an evaluation's outcome -- the encoder's tensors (names,
dtypes, shapes, bytes), the heads' tensors, each task's examples of the split (texts and labels, after
`max_examples`), the split, `max_length`, the device type and the torch version -- so a hit can only return what
evaluating again would give (up to the device's float nondeterminism), whichever method or parameters made the
weights.  A rerun of a sweep therefore only evaluates merges it has not seen; a new method costs its own merges.

Entries are small JSON files (``<key[:2]>/<key>.json``: per-task accuracy and which examples were right), written
atomically, so concurrent or interrupted runs never leave a half entry.

A second, smaller memo (``merges/``) maps a merge's inputs -- method, parameters, seed, the digests of the base
and the models, and a digest of the merge code itself -- to the digest of its result, so a rerun can look up an
evaluation without merging again.  Changing any method, the plan or the engine changes every key.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from transfuse.data.task import Task
from transfuse.io.files import write_text_atomically

CACHE_FORMAT_VERSION = 1


def tensors_digest(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 over a state dict's names, dtypes, shapes and bytes (in sorted name order)."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().to("cpu").contiguous()
        digest.update(f"{name}\x00{tensor.dtype}\x00{tuple(tensor.shape)}\x00".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def examples_digest(task: Task, split: str, max_examples: int | None) -> str:
    """sha256 of a task's examples in `split` (the first `max_examples`) and its label names."""
    examples = task.split(split)
    if max_examples is not None:
        examples = examples[:max_examples]
    digest = hashlib.sha256(json.dumps([task.name, task.label_names, split]).encode())
    for example in examples:
        digest.update(f"\n{example.label}\t".encode() + example.text.encode())
    return digest.hexdigest()


class EvaluationCache:
    """Evaluations stored under `directory`, keyed by :meth:`key`."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.hits = 0
        self.misses = 0

    def key(
        self,
        encoder_digest: str,
        heads_digest: str,
        tasks: Sequence[Task],
        split: str,
        *,
        max_examples: int | None,
        max_length: int,
        device: str,
    ) -> str:
        parts = {
            "format": CACHE_FORMAT_VERSION,
            "encoder": encoder_digest,
            "heads": heads_digest,
            "examples": [examples_digest(t, split, max_examples) for t in tasks],
            "max_length": max_length,
            "device": torch.device(device).type,
            "torch": torch.__version__.split("+")[0],
        }
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()

    def merge_key(
        self,
        method: str,
        params: Mapping[str, Any],
        seed: int,
        base_digest: str,
        model_digests: Sequence[str],
        device: str,
    ) -> str:
        """The key of a merge's inputs: method, parameters, seed, the digests of the base and the models, the
        device type, and a digest of the source code that computes merges (so any change to a method, the
        plan or the engine makes a new key)."""
        parts = {
            "format": CACHE_FORMAT_VERSION,
            "method": method,
            "params": {k: params[k] for k in sorted(params)},
            "seed": seed,
            "base": base_digest,
            "models": list(model_digests),
            "device": torch.device(device).type,
            "torch": torch.__version__.split("+")[0],
            "code": merge_code_digest(),
        }
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()

    def get_merge(self, key: str) -> str | None:
        """The digest of the merged weights of a merge seen before (see :meth:`merge_key`), or None."""
        try:
            return json.loads(self._path(key, "merges").read_text())["digest"]
        except (OSError, ValueError, KeyError):
            return None

    def put_merge(self, key: str, digest: str) -> None:
        self._write(self._path(key, "merges"), {"digest": digest})

    def _path(self, key: str, kind: str = "") -> Path:
        if kind:
            return self.directory / kind / key[:2] / f"{key}.json"
        return self.directory / key[:2] / f"{key}.json"

    def get(self, key: str) -> tuple[dict[str, float], dict[str, np.ndarray]] | None:
        """``(accuracy, correct)`` as :func:`~transfuse.eval.evaluate` returns them, or None."""
        try:
            entry = json.loads(self._path(key).read_text())
        except (OSError, ValueError):
            self.misses += 1
            return None
        self.hits += 1
        correct = {t: np.asarray(v, dtype=bool) for t, v in entry["correct"].items()}
        return dict(entry["accuracy"]), correct

    def put(self, key: str, accuracy: Mapping[str, float], correct: Mapping[str, Any]) -> None:
        entry = {
            "accuracy": dict(accuracy),
            "correct": {t: np.asarray(v, dtype=np.int8).tolist() for t, v in correct.items()},
        }
        self._write(self._path(key), entry)

    @staticmethod
    def _write(path: Path, entry: Mapping[str, Any]) -> None:
        write_text_atomically(path, json.dumps(entry))


@functools.lru_cache(maxsize=1)
def merge_code_digest() -> str:
    """sha256 of the source files that determine a merge's result: the methods, their chunk runtime, recipe,
    plan (slices too), engine, API and the in-memory reader."""
    root = Path(__file__).resolve().parents[1]
    names = (
        "recipe.py",
        "plan.py",
        "slices.py",
        "chunks.py",
        "dtypes.py",
        "engine.py",
        "api.py",
        "io/state_dict.py",
    )
    files = sorted((root / "methods").glob("*.py")) + [root / name for name in names]
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.relative_to(root).as_posix().encode() + b"\x00" + path.read_bytes())
    return digest.hexdigest()
