"""Statistics files: what a statistics-based merge (RegMean, Fisher) reads besides the weights.

One safetensors file per model holds that model's statistics, each tensor keyed ``"<kind>/<tensor name>"`` —
``gram/encoder.layer.0.output.dense.weight`` is the input Gram matrix of that linear layer, ``fisher/<name>`` the
diagonal Fisher information of a parameter (same shape) — with a JSON header in the safetensors metadata
(``format``, ``version``, the kinds, how many examples and tokens, the model they came from).  A merge opens one
file per model and reads each tensor's statistics when that tensor is merged, so memory stays bounded as for a
data-free merge (:class:`StatisticsSet`).  safetensors only: nothing is unpickled.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from transfuse.errors import TransfuseError
from transfuse.io.files import write_atomically

FORMAT = "transfuse.statistics"
VERSION = 1
#: The statistics a collector writes, and the shape each has for a weight of shape ``shape``.
KINDS = ("gram", "gram_input_dim", "fisher")


class StatisticsError(TransfuseError, ValueError):
    """A statistics file is missing, not one transfuse wrote, or disagrees with the models it is merged with."""


@dataclass
class ModelStatistics:
    """One model's statistics in memory: ``{kind: {tensor name: tensor}}`` and what they were computed from."""

    tensors: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    examples: int = 0
    tokens: int = 0
    source: str = ""
    info: dict[str, Any] = field(default_factory=dict)

    def add(self, kind: str, name: str, tensor: torch.Tensor) -> None:
        self.tensors.setdefault(kind, {})[name] = tensor

    def save(self, path: str | Path) -> Path:
        """Write the file atomically (a temporary file beside ``path``, renamed when complete)."""
        flat = {
            f"{kind}/{name}": t.detach().to("cpu").contiguous()
            for kind, by_name in self.tensors.items()
            for name, t in by_name.items()
        }
        header = {
            "format": FORMAT,
            "version": VERSION,
            "kinds": sorted(self.tensors),
            "examples": self.examples,
            "tokens": self.tokens,
            "source": self.source,
            "info": self.info,
        }
        return write_atomically(
            path, lambda tmp: save_file(flat, str(tmp), metadata={"transfuse": json.dumps(header)})
        )


def read_header(path: str | Path) -> dict[str, Any]:
    """The JSON header of a statistics file; ``StatisticsError`` for a file that is not one."""
    path = Path(path)
    if not path.is_file():
        raise StatisticsError(f"statistics file {path} does not exist (make it with `transfuse statistics`)")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as exc:
        raise StatisticsError(f"{path} is not a readable safetensors file: {exc}") from None
    try:
        header = json.loads(meta["transfuse"])
    except (KeyError, ValueError):
        raise StatisticsError(
            f"{path} holds no transfuse statistics header; make the file with `transfuse statistics`"
        ) from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise StatisticsError(f"{path} is not a transfuse statistics file (format {header!r})")
    if header.get("version") != VERSION:
        raise StatisticsError(
            f"{path} is statistics format version {header.get('version')!r}; this transfuse reads version "
            f"{VERSION}: compute the statistics again"
        )
    return header


class StatisticsSet(Mapping[str, Mapping[str, torch.Tensor]]):
    """The statistics of K models, read lazily: ``stats[name] = {kind: tensor stacked over the K models}``.

    Opening checks every file's header and that all files cover the same tensors with the same kinds and shapes
    (``StatisticsError`` naming the first disagreement), before any tensor is read.  ``get(name)`` reads that
    tensor's statistics from each file (one memory-mapped read each), as the engine's workers ask for them.
    """

    def __init__(self, paths: Sequence[str | Path], labels: Sequence[str] | None = None) -> None:
        if not paths:
            raise StatisticsError("no statistics files given")
        self.paths = [Path(p) for p in paths]
        self.labels = list(labels) if labels is not None else [str(p) for p in self.paths]
        self.headers = [read_header(p) for p in self.paths]
        layouts = [self._layout(p) for p in self.paths]
        first = layouts[0]
        for path, label, layout in zip(self.paths[1:], self.labels[1:], layouts[1:]):
            for key in sorted(set(first) ^ set(layout)):
                holder, other = (self.labels[0], label) if key in first else (label, self.labels[0])
                raise StatisticsError(
                    f"statistics {key!r} are in the file of {holder} but not in that of {other} ({path}): "
                    "compute every model's statistics with the same settings"
                )
            for key, shape in layout.items():
                if shape != first[key]:
                    raise StatisticsError(
                        f"statistics {key!r} have shape {list(shape)} for {label} but {list(first[key])} for "
                        f"{self.labels[0]}: the models differ in architecture"
                    )
        self._shapes = first
        self._by_name: dict[str, list[str]] = {}
        for key in first:
            kind, _, name = key.partition("/")
            self._by_name.setdefault(name, []).append(kind)

    @staticmethod
    def _layout(path: Path) -> dict[str, tuple[int, ...]]:
        with safe_open(str(path), framework="pt") as f:
            layout = {}
            for key in f.keys():
                kind, sep, name = key.partition("/")
                if not sep or kind not in KINDS or not name:
                    raise StatisticsError(f"{path}: unexpected entry {key!r} (kinds: {', '.join(KINDS)})")
                layout[key] = tuple(f.get_slice(key).get_shape())
            return layout

    def kinds(self, name: str) -> list[str]:
        return list(self._by_name.get(name, ()))

    def shape(self, kind: str, name: str) -> tuple[int, ...] | None:
        return self._shapes.get(f"{kind}/{name}")

    def __getitem__(self, name: str) -> Mapping[str, torch.Tensor]:
        kinds = self._by_name.get(name)
        if kinds is None:
            raise KeyError(name)
        out: dict[str, list[torch.Tensor]] = {kind: [] for kind in kinds}
        for path in self.paths:
            with safe_open(str(path), framework="pt") as f:
                for kind in kinds:
                    out[kind].append(f.get_tensor(f"{kind}/{name}"))
        return {kind: torch.stack(tensors) for kind, tensors in out.items()}

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_name)

    def __len__(self) -> int:
        return len(self._by_name)


def stack_statistics(
    models: Sequence[ModelStatistics | str | Path],
) -> Mapping[str, Mapping[str, torch.Tensor]]:
    """Per-model statistics (in memory or files) as the engine reads them: ``{name: {kind: [K, ...]}}``."""
    if all(isinstance(m, (str, Path)) for m in models):
        return StatisticsSet([Path(m) for m in models])  # type: ignore[arg-type]
    loaded = [m if isinstance(m, ModelStatistics) else _load(Path(m)) for m in models]
    keys = [{(k, n) for k, by_name in m.tensors.items() for n in by_name} for m in loaded]
    for i, other in enumerate(keys[1:], 1):
        if other != keys[0]:
            kind, name = sorted(other ^ keys[0])[0]
            raise StatisticsError(
                f"statistics {kind}/{name} are given for some models but not others (models 0 and {i})"
            )
    out: dict[str, dict[str, torch.Tensor]] = {}
    for kind, name in sorted(keys[0]):
        try:
            out.setdefault(name, {})[kind] = torch.stack([m.tensors[kind][name] for m in loaded])
        except RuntimeError:
            raise StatisticsError(f"statistics {kind}/{name} differ in shape between the models") from None
    return out


def _load(path: Path) -> ModelStatistics:
    header = read_header(path)
    stats = ModelStatistics(
        examples=int(header.get("examples", 0)),
        tokens=int(header.get("tokens", 0)),
        source=str(header.get("source", "")),
        info=dict(header.get("info") or {}),
    )
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():
            kind, _, name = key.partition("/")
            stats.add(kind, name, f.get_tensor(key))
    return stats


def load_statistics(path: str | Path) -> ModelStatistics:
    """A statistics file read whole into memory (checked as :class:`StatisticsSet` checks it)."""
    return _load(Path(path))
