"""``transfuse lora extract``: a PEFT LoRA adapter approximating a fine-tune's change from its base, FT − BASE.

Each 2-D weight of a Linear layer is factored by :func:`transfuse.lora_factor.low_rank_factors` (truncated SVD,
``lora_alpha = r`` so PEFT's scale is 1); per-module ranks go into ``rank_pattern`` / ``alpha_pattern``.  Input
embeddings and the LM head are saved whole under ``modules_to_save`` (default) or factored too
(``embed_lora=True``: ``lora_embedding_A/B`` for an ``nn.Embedding``, ``lora_A/B`` for the head).  Other changed
tensors (norms) are saved whole under ``modules_to_save``; changed biases of adapted Linear layers go into
``lora_B.bias`` (``lora_bias=True``).  Tensors of layers PEFT cannot adapt this way (GPT-2's Conv1D, convolutions)
are skipped with a note.  Tensors are read one at a time from memory maps (bounded memory: the adapter being built
plus one tensor's working set); the adapter is written to a temporary dir beside OUT and moved into place when
complete, with ``extraction.json`` holding the relative error ``‖Δ − B A‖_F / ‖Δ‖_F`` of every factored matrix.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from transfuse._version import __version__
from transfuse.api import check_output_location, check_output_target, validate_device
from transfuse.dtypes import DTYPE_NAMES, torch_dtype
from transfuse.errors import (
    CheckpointError,
    DtypeMismatchError,
    InvalidOptionError,
    MissingTensorError,
    NotSameBaseError,
    ShapeMismatchError,
    VocabSizeMismatchError,
    WriteError,
)
from transfuse.io.checkpoint import Checkpoint, open_checkpoint
from transfuse.lora_factor import SCALE_SPLITS, SVD_METHODS, LowRankFactors, low_rank_factors
from transfuse.lora_targets import (
    EMBEDDING,
    LINEAR,
    OTHER,
    OUTPUT_EMBEDDING,
    module_kinds,
    split_name,
    task_type,
)

PREFIX = "base_model.model."
ADAPTER_FILE = "adapter_model.safetensors"
REPORT_FILE = "extraction.json"


@dataclass(frozen=True)
class MatrixError:
    """How well one factored matrix is reproduced: ``error_norm = ‖Δ − B A‖_F``, ``delta_norm = ‖Δ‖_F``."""

    name: str
    shape: tuple[int, ...]
    rank: int
    delta_norm: float
    error_norm: float

    @property
    def relative_error(self) -> float:
        return self.error_norm / self.delta_norm if self.delta_norm > 0 else 0.0


@dataclass
class LoraExtraction:
    """The result of :func:`extract_lora`: the adapter dir, per-matrix errors, what was saved whole or skipped."""

    out_dir: Path
    matrices: list[MatrixError]
    saved_full: list[str]
    skipped: list[str]
    notes: list[str]
    config: dict[str, Any]
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)

    @property
    def overall_relative_error(self) -> float:
        """``sqrt(Σ ‖Δ_i − B_i A_i‖²) / sqrt(Σ ‖Δ_i‖²)`` over the factored matrices (0 when none changed)."""
        total = sum(m.delta_norm**2 for m in self.matrices)
        return math.sqrt(sum(m.error_norm**2 for m in self.matrices) / total) if total > 0 else 0.0

    def report(self) -> dict[str, Any]:
        return {
            "transfuse_version": __version__,
            "overall_relative_error": self.overall_relative_error,
            "seconds": self.seconds,
            "matrices": [
                {
                    "name": m.name,
                    "shape": list(m.shape),
                    "rank": m.rank,
                    "relative_error": m.relative_error,
                    "delta_norm": m.delta_norm,
                    "error_norm": m.error_norm,
                }
                for m in self.matrices
            ],
            "saved_full": self.saved_full,
            "skipped": self.skipped,
            "notes": self.notes,
        }


def validate_extraction_options(
    rank: int,
    energy: float | None,
    svd: str,
    split: str,
    dtype: str | None,
    oversample: int,
    power_iterations: int,
) -> None:
    """``InvalidOptionError`` for a rank < 1, an energy outside (0, 1], an unknown SVD, split or dtype name."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise InvalidOptionError(f"rank must be a whole number >= 1, got {rank!r}")
    if energy is not None and (
        isinstance(energy, bool) or not isinstance(energy, (int, float)) or not 0 < energy <= 1
    ):
        raise InvalidOptionError(f"energy must be a share of the squared norm in (0, 1], got {energy!r}")
    if svd not in SVD_METHODS:
        raise InvalidOptionError(f"svd must be one of {', '.join(SVD_METHODS)}, got {svd!r}")
    if split not in SCALE_SPLITS:
        raise InvalidOptionError(f"split must be one of {', '.join(SCALE_SPLITS)}, got {split!r}")
    if dtype is not None and dtype not in DTYPE_NAMES:
        raise InvalidOptionError(f"dtype must be one of {', '.join(DTYPE_NAMES)}, got {dtype!r}")
    for name, value in (("oversample", oversample), ("power_iterations", power_iterations)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise InvalidOptionError(f"{name} must be a whole number >= 0, got {value!r}")


def extract_lora(
    model: str | Path,
    base: str | Path,
    out: str | Path,
    *,
    rank: int = 32,
    energy: float | None = None,
    svd: str = "randomized",
    device: str | torch.device = "cpu",
    embed_lora: bool = False,
    split: str = "sqrt",
    dtype: str | None = None,
    oversample: int = 8,
    power_iterations: int = 4,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = False,
) -> LoraExtraction:
    """Write to ``out`` a PEFT LoRA adapter for ``base`` approximating ``model − base``; return the errors.

    ``rank``: the rank of every factored matrix (clamped to its smaller side), or with ``energy`` the cap of the
    smallest rank keeping that share of ``‖Δ‖_F²``.  ``svd``: ``"randomized"`` (default; oversampled range finder
    with ``power_iterations``, deterministic from ``seed`` and the tensor name) or ``"exact"``.  ``split``: ``"sqrt"``
    puts ``S^(1/2)`` in each factor, ``"b"`` puts ``S`` in ``lora_B``.  ``dtype``: the factors' dtype (default: each
    fine-tuned tensor's).  Every check (options, inputs, shapes, the output location) runs before any work.
    """
    validate_extraction_options(rank, energy, svd, split, dtype, oversample, power_iterations)
    compute = validate_device(device)
    out = Path(out).expanduser()
    started = time.perf_counter()
    base_ckpt = open_checkpoint(base)
    try:
        ft_ckpt = open_checkpoint(model, lora_base=base_ckpt)
        try:
            check_output_location(out, [model, base])
            check_output_target(out, overwrite)
            extractor = _Extractor(
                ft_ckpt,
                base_ckpt,
                rank=rank,
                energy=energy,
                svd=svd,
                device=compute,
                embed_lora=embed_lora,
                split=split,
                dtype=torch_dtype(dtype) if dtype else None,
                oversample=oversample,
                power_iterations=power_iterations,
                seed=seed,
            )
            # absolute, so AutoPeftModel finds the base from any folder
            tensors, result = extractor.run(progress, base_name=os.path.abspath(Path(base).expanduser()))
        finally:
            ft_ckpt.close()
    finally:
        base_ckpt.close()
    result.out_dir = out
    result.seconds = time.perf_counter() - started
    _write_adapter(out, tensors, result, overwrite=overwrite)
    return result


class _Extractor:
    """One extraction: the checks, the streaming loop and the adapter's tensors and config."""

    def __init__(self, ft: Checkpoint, base: Checkpoint, **options: Any) -> None:
        self.ft, self.base = ft, base
        self.opt = options
        self.notes: list[str] = []
        self.names = self._check_names()
        self.shapes = {n: tuple(base.info(n).shape) for n in self.names}
        kinds, why = module_kinds(base.config_dir or ft.config_dir, self.shapes)
        self.kinds = kinds
        if why:
            self.notes.append(why)
        self._check_infos()
        self.tensors: dict[str, torch.Tensor] = {}
        self.factors: dict[str, tuple[str, LowRankFactors]] = {}  # module -> (tensor name, factors)
        self.embedding_factors: dict[str, tuple[str, LowRankFactors]] = {}
        self.bias_deltas: dict[str, torch.Tensor] = {}  # adapted Linear module -> changed bias delta
        self.full_modules: set[str] = set()
        self.saved_full: list[str] = []
        self.skipped: list[str] = []

    # ------------------------------------------------------------------------------------------------ checks

    def _check_names(self) -> list[str]:
        base_names = self.base.names()
        ft_names = set(self.ft.names())
        shared = [n for n in base_names if n in ft_names]
        if len(shared) * 2 < len(base_names):
            raise NotSameBaseError(
                f"{self.ft.source} shares only {len(shared)} of the {len(base_names)} tensor names of "
                f"{self.base.source}: it is not a fine-tune of that base"
            )
        missing = [n for n in base_names if n not in ft_names]
        if missing:
            raise MissingTensorError(
                f"{self.ft.source} lacks {len(missing)} tensor(s) of its base {self.base.source}, e.g. "
                f"{missing[0]!r}; extract from the complete fine-tune"
            )
        extra = [n for n in self.ft.names() if n not in set(base_names)]
        if extra:
            self.notes.append(
                f"{len(extra)} tensor(s) only the fine-tune has are not in the adapter (PEFT adapts the base's "
                f"modules), e.g. {extra[0]!r}"
            )
        return shared

    def _check_infos(self) -> None:
        for name in self.names:
            b, f = self.base.info(name), self.ft.info(name)
            if tuple(b.shape) != tuple(f.shape):
                kind = self.kinds.get(split_name(name)[0])
                error = (
                    VocabSizeMismatchError if kind in (EMBEDDING, OUTPUT_EMBEDDING) else ShapeMismatchError
                )
                raise error(
                    f"{name} has shape {tuple(f.shape)} in {self.ft.source} but {tuple(b.shape)} in "
                    f"{self.base.source}; a LoRA adapter cannot change a tensor's shape"
                )
            if b.dtype.is_floating_point != f.dtype.is_floating_point:
                raise DtypeMismatchError(
                    f"{name} is {f.dtype} in {self.ft.source} but {b.dtype} in {self.base.source}"
                )

    # ------------------------------------------------------------------------------------------------ loop

    def run(self, progress: bool, *, base_name: str) -> tuple[dict[str, torch.Tensor], LoraExtraction]:
        bar = _progress_bar(len(self.names)) if progress else None
        try:
            for name in self.names:
                self._one(name)
                for ckpt in (self.ft, self.base):
                    release = getattr(ckpt, "release", None)
                    if release is not None:
                        release(name)
                if bar is not None:
                    bar.advance(bar.task_ids[0])
        finally:
            if bar is not None:
                bar.stop()
        self._resolve_biases()
        config = self._config(base_name)
        order = {name: i for i, name in enumerate(self.names)}
        matrices = sorted(
            (
                MatrixError(name, self.shapes[name], f.rank, f.delta_norm, f.error_norm)
                for name, f in [*self.factors.values(), *self.embedding_factors.values()]
            ),
            key=lambda m: order[m.name],
        )
        result = LoraExtraction(
            out_dir=Path(),
            matrices=matrices,
            saved_full=self.saved_full,
            skipped=self.skipped,
            notes=self.notes,
            config=config,
        )
        return self._adapter_tensors(), result

    def _one(self, name: str) -> None:
        base_t, ft_t = self.base.tensor(name), self.ft.tensor(name)
        module, param = split_name(name)
        kind = self.kinds.get(module, OTHER)
        if torch.equal(
            base_t, ft_t
        ):  # unchanged: nothing to store (compares the stored values, copies nothing)
            return
        if not ft_t.dtype.is_floating_point:
            self._skip(name, "it is not a floating-point tensor")
            return
        embedding_lora = self.opt["embed_lora"] and kind in (EMBEDDING, OUTPUT_EMBEDDING)
        factored_linear = kind == LINEAR or (embedding_lora and kind == OUTPUT_EMBEDDING)
        if factored_linear and param == "weight" and ft_t.ndim == 2:
            self.factors[module] = (name, self._factor(name, self._delta(name, base_t, ft_t), ft_t.dtype))
        elif factored_linear and param == "bias" and ft_t.ndim == 1:
            self.bias_deltas[module] = self._delta(name, base_t, ft_t).to(self._dtype(ft_t.dtype)).cpu()
        elif embedding_lora and kind == EMBEDDING and param == "weight" and ft_t.ndim == 2:
            # PEFT's Embedding LoRA: E' = E + (B A)ᵀ, B [dim, r], A [r, vocab]
            delta_t = self._delta(name, base_t, ft_t).T
            self.embedding_factors[module] = (name, self._factor(name, delta_t, ft_t.dtype))
        elif kind in (EMBEDDING, OUTPUT_EMBEDDING, OTHER) or (kind == LINEAR and ft_t.ndim == 1):
            if not bool(torch.isfinite(ft_t).all()):
                raise CheckpointError(f"{name} holds NaN or Inf in {self.ft.source}")
            self._save_full(name, ft_t)
        else:
            self._skip(
                name, f"PEFT's LoRA does not adapt this layer ({kind} module, shape {tuple(ft_t.shape)})"
            )

    def _delta(self, name: str, base_t: torch.Tensor, ft_t: torch.Tensor) -> torch.Tensor:
        device = self.opt["device"]
        delta = ft_t.to(device, torch.float32) - base_t.to(device, torch.float32)
        if not bool(torch.isfinite(delta).all()):
            raise CheckpointError(f"{name} holds NaN or Inf in {self.ft.source} or {self.base.source}")
        return delta

    def _dtype(self, stored: torch.dtype) -> torch.dtype:
        return self.opt["dtype"] or stored

    def _factor(self, name: str, delta: torch.Tensor, stored: torch.dtype) -> LowRankFactors:
        digest = hashlib.blake2b(f"{self.opt['seed']}:{name}".encode(), digest_size=8).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))
        factors = low_rank_factors(
            delta,
            rank=self.opt["rank"],
            energy=self.opt["energy"],
            svd=self.opt["svd"],
            oversample=self.opt["oversample"],
            power_iterations=self.opt["power_iterations"],
            split=self.opt["split"],
            dtype=self._dtype(stored),
            generator=generator,
        )
        return LowRankFactors(factors.b.cpu(), factors.a.cpu(), factors.delta_norm, factors.error_norm)

    def _save_full(self, name: str, ft_t: torch.Tensor) -> None:
        # A view of the fine-tune's memory map (valid after release and close) unless it is cast: no copy held.
        self.tensors[PREFIX + name] = ft_t.to(self._dtype(ft_t.dtype))
        self.full_modules.add(split_name(name)[0])
        self.saved_full.append(name)

    def _skip(self, name: str, why: str) -> None:
        self.skipped.append(name)
        self.notes.append(f"{name} changed but is not in the adapter: {why}")

    # ------------------------------------------------------------------------------------------------ biases

    def _resolve_biases(self) -> None:
        """Changed biases of adapted Linear layers need ``lora_bias=True``, which PEFT applies to every adapted
        layer and cannot apply to an Embedding or to a Linear without a bias: in those cases the modules concerned
        are saved whole instead."""
        if not self.bias_deltas:
            return
        for module in self.bias_deltas:  # a changed bias on an unchanged weight: a zero rank-1 factor
            if module not in self.factors:
                name = f"{module}.weight"
                out_dim, in_dim = self.shapes[name]
                dt = self.bias_deltas[module].dtype
                zero = LowRankFactors(
                    torch.zeros(out_dim, 1, dtype=dt), torch.zeros(1, in_dim, dtype=dt), 0.0, 0.0
                )
                self.factors[module] = (name, zero)
        without_bias = [m for m in self.factors if f"{m}.bias" not in self.shapes]
        if without_bias:
            for module in sorted(self.bias_deltas):
                self._module_full(module)
            self.notes.append(
                f"{len(self.bias_deltas)} Linear layer(s) with a changed bias saved whole (modules_to_save): PEFT's "
                f"lora_bias needs a bias in every adapted layer and {without_bias[0]} has none"
            )
            return
        for module in sorted(self.embedding_factors):
            self._module_full(module)
            self.notes.append(
                f"{module} saved whole, not as lora_embedding_A/B: the changed Linear biases need PEFT's "
                "lora_bias, which PEFT does not support on Embedding layers"
            )

    def _module_full(self, module: str) -> None:
        self.factors.pop(module, None)
        self.embedding_factors.pop(module, None)
        self.bias_deltas.pop(module, None)
        for param in ("weight", "bias"):
            tensor_name = f"{module}.{param}"
            if tensor_name in self.shapes:
                base_t, ft_t = self.base.tensor(tensor_name), self.ft.tensor(tensor_name)
                if not torch.equal(base_t, ft_t):
                    self._save_full(tensor_name, ft_t)

    # ------------------------------------------------------------------------------------------------ output

    def _adapter_tensors(self) -> dict[str, torch.Tensor]:
        tensors = dict(self.tensors)
        for module, (_, f) in self.factors.items():
            tensors[f"{PREFIX}{module}.lora_A.weight"] = f.a
            tensors[f"{PREFIX}{module}.lora_B.weight"] = f.b
            if self.bias_deltas:
                bias = self.bias_deltas.get(module)
                if bias is None:
                    bias = torch.zeros(self.shapes[f"{module}.bias"], dtype=f.b.dtype)
                tensors[f"{PREFIX}{module}.lora_B.bias"] = bias
        for module, (_, f) in self.embedding_factors.items():
            tensors[f"{PREFIX}{module}.lora_embedding_A"] = f.a
            tensors[f"{PREFIX}{module}.lora_embedding_B"] = f.b
        return {k: v.contiguous() for k, v in sorted(tensors.items())}

    def _config(self, base_name: str) -> dict[str, Any]:
        ranks = {m: f.rank for m, (_, f) in [*self.factors.items(), *self.embedding_factors.items()]}
        if not ranks:
            raise CheckpointError(
                f"no weight matrix of a Linear or Embedding layer differs between {self.ft.source} and "
                f"{self.base.source}: there is nothing to extract as LoRA"
            )
        r = max(ranks.values())
        pattern = {m: k for m, k in sorted(ranks.items()) if k != r}
        leaves = sorted({m.rpartition(".")[2] for m in ranks})
        # Linear layers that share a target leaf name but were not adapted (unchanged, or saved whole) are excluded,
        # so PEFT wraps exactly the adapted ones.
        excluded = sorted(
            m
            for m, kind in self.kinds.items()
            if kind in (LINEAR, EMBEDDING, OUTPUT_EMBEDDING)
            and m not in ranks
            and m.rpartition(".")[2] in leaves
        )
        return {
            "peft_type": "LORA",
            "task_type": task_type(self.base.config_dir or self.ft.config_dir),
            "base_model_name_or_path": base_name,
            "r": r,
            "lora_alpha": r,
            "rank_pattern": pattern,
            "alpha_pattern": dict(pattern),
            "target_modules": leaves,
            "exclude_modules": excluded or None,
            "modules_to_save": sorted(self.full_modules) or None,
            "lora_bias": bool(self.bias_deltas),
            "lora_dropout": 0.0,
            "bias": "none",
            "fan_in_fan_out": False,
            "use_rslora": False,
            "use_dora": False,
            "init_lora_weights": True,
            "inference_mode": True,
        }


def _progress_bar(total: int):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(
        TextColumn("extract"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), transient=False
    )
    bar.add_task("extract", total=total)
    bar.start()
    return bar


def _write_adapter(
    out: Path, tensors: dict[str, torch.Tensor], result: LoraExtraction, *, overwrite: bool
) -> None:
    """adapter_model.safetensors, adapter_config.json and extraction.json, built in a temp dir beside ``out`` and
    published by renames when complete (:func:`transfuse.io.files.staged_dir`)."""
    from safetensors.torch import save_file

    from transfuse.io.files import staged_dir

    try:
        with staged_dir(Path(os.path.abspath(out)), replace=overwrite) as tmp:
            save_file(tensors, str(tmp / ADAPTER_FILE), metadata={"format": "pt"})
            (tmp / "adapter_config.json").write_text(
                json.dumps(result.config, indent=2) + "\n", encoding="utf-8"
            )
            (tmp / REPORT_FILE).write_text(json.dumps(result.report(), indent=2) + "\n", encoding="utf-8")
    except OSError as exc:
        raise WriteError(f"cannot write the adapter {out}: {exc}") from exc
