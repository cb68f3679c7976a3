"""Recipe -> merge plan: open the inputs, validate them against each other, and list one job per output tensor.

Everything that can be checked without reading tensor data is checked here, before any work starts:
inputs that cannot be opened, models that are not fine-tunes of the same base, missing tensors, shape, dtype
and vocabulary-size mismatches, and parameters that resolve to nothing for some tensor.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from transfuse.dtypes import DTYPE_NAMES, torch_dtype
from transfuse.errors import (
    CheckpointError,
    ConfigError,
    DtypeMismatchError,
    LoraAdapterError,
    MissingTensorError,
    NotSameBaseError,
    ParameterError,
    RecipeError,
    ShapeMismatchError,
    VocabSizeMismatchError,
)
from transfuse.io import Checkpoint, open_checkpoint
from transfuse.io.checkpoint import read_json
from transfuse.io.writer import config_files, is_tokenizer_file
from transfuse.methods.registry import MethodSpec, ParamValue
from transfuse.recipe import ModelEntry, Recipe, evaluate_setting
from transfuse.vocabulary import (
    AlignedVocabulary,
    TokenizerSpec,
    VocabularyAlignedCheckpoint,
    VocabularyPlan,
    is_vocab_tensor,
    plan_vocabulary,
)

_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\.")
# Tensors whose first axis is the vocabulary: their row counts may legitimately differ between models.
_VOCAB_NAMES = ("embed_tokens", "word_embeddings", "wte", "lm_head", "embed_out", "tok_embeddings", "shared")
# A job whose float32 working set is at most this runs on a worker, several at once (engine's threshold too).
SMALL_JOB_BYTES = 256 * 2**20
# Below this share of common tensor names, inputs are different architectures, not fine-tunes of one base.
_SAME_BASE_MIN_OVERLAP = 0.5


@dataclass(frozen=True)
class TensorSource:
    """Where one input of a job is read: a checkpoint, the tensor's name there, and a label for messages."""

    checkpoint: Checkpoint
    name: str
    label: str


@dataclass(frozen=True)
class TensorJob:
    """One output tensor: what to read, which parameters apply, what to write.

    ``base_source`` / ``model_sources`` say where the inputs are read when they are not the plan's base and
    models at ``name`` (layer slices: another layer index, other models per slice); K is then
    ``len(model_sources)``.  ``has_base``: the base input is a base model (the recipe's ``base_model``, or the
    slice's base), not the first model standing in as the reference of a base-less recipe.
    """

    name: str
    shape: tuple[int, ...]
    out_dtype: torch.dtype
    merge: bool  # False: copied from the base unchanged (integer buffers; passthrough's unscaled tensors)
    global_params: dict[str, ParamValue] = field(default_factory=dict)
    model_params: dict[str, tuple[float, ...]] = field(default_factory=dict)  # per-model, incl. "weight"
    model_rows: tuple[
        int, ...
    ] = ()  # first-axis length of each model's tensor when it differs (vocab fix-up)
    input_bytes: int = 0
    base_source: TensorSource | None = None
    model_sources: tuple[TensorSource, ...] | None = None
    has_base: bool = True

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def copies_input(
    spec: MethodSpec,
    model_params: dict[str, tuple[float, ...]],
    k: int,
    has_base: bool,
    out_dtype: torch.dtype,
    info: Any,
) -> bool:
    """Whether a float tensor's merge is its one input unchanged, so the plan can copy its bytes: a method with
    an ``identity_param`` (passthrough) at 1, one model, no base, the output in the input's dtype and shape."""
    if spec.identity_param is None or k != 1 or has_base or out_dtype != info.dtype:
        return False
    return tuple(model_params.get(spec.identity_param, (1.0,))) == (1.0,)


@dataclass
class MergePlan:
    """The validated inputs and the ordered jobs.  Close it (or use ``with``) to release the file maps."""

    recipe: Recipe
    spec: MethodSpec
    base: Checkpoint
    models: list[Checkpoint]
    labels: list[str]
    jobs: list[TensorJob]
    # The output's config.json (parsed, from the base or the recipe's config_source) and the dir whose
    # tokenizer / chat-template files are copied; None when there is none (a bare weights file as base).
    config_path: Path | None
    tokenizer_dir: Path | None
    ignored: dict[str, list[str]] = field(default_factory=dict)  # model label -> tensor names not in the base
    notes: list[str] = field(default_factory=list)
    # Every checkpoint the plan opened (LoRA bases included).
    owned: list[Checkpoint] = field(default_factory=list)
    config: dict | None = None
    # The output's tokenizer files when transfuse writes them (merged vocabulary, chat template); else copied.
    tokenizer_files: dict[str, bytes] | None = None
    # Things the user should hear about before the output is trusted (printed as warnings, not notes).
    warnings: list[str] = field(default_factory=list)

    @property
    def input_bytes(self) -> int:
        return sum(j.input_bytes for j in self.jobs)

    @property
    def output_bytes(self) -> int:
        return sum(j.numel * j.out_dtype.itemsize for j in self.jobs)

    @property
    def largest_tensor(self) -> TensorJob:
        return max(self.jobs, key=lambda j: j.numel)

    def base_input(self, job: TensorJob) -> TensorSource:
        """The base tensor of ``job``."""
        if job.base_source is not None:
            return job.base_source
        return TensorSource(self.base, job.name, "the base")

    def model_inputs(self, job: TensorJob) -> tuple[TensorSource, ...]:
        """The K model tensors of ``job``, in parameter order."""
        if job.model_sources is not None:
            return job.model_sources
        return tuple(TensorSource(m, job.name, label) for m, label in zip(self.models, self.labels))

    def model_count(self, job: TensorJob) -> int:
        return len(job.model_sources) if job.model_sources is not None else len(self.models)

    def input_paths(self) -> list[Path]:
        """Every local file or dir the merge reads (models, adapters, config and tokenizer sources)."""
        r = self.recipe
        named = [r.base_model, r.tokenizer_source, r.config_source]
        named += [p for m in r.models for p in (m.path, m.lora)]
        named += [
            p for sl in r.slices or [] for src in sl.sources for p in (src.path, src.lora, sl.base_model)
        ]
        named += [getattr(c, "source", None) for c in [self.base, *self.models]]
        named += [str(getattr(c, "adapter_dir", "")) or None for c in self.models]
        paths = {Path(p).expanduser() for p in named if p and p != "base"}
        return sorted(p for p in paths if p.exists())

    def peak_memory_bytes(self, threads: int = 1) -> int:
        """Estimated peak resident memory of running this plan (see docs/design.md, "Memory").

        A big job holds the base, the K task vectors and about one more tensor of scratch, in float32; with
        ``threads`` workers up to ``threads + 1`` small jobs are in flight at once.  The writer streams, so it
        adds one output tensor.  Deliberately a slight overestimate: it is only used to refuse hopeless runs.
        """
        per_job = [j.numel * 4 * (self.model_count(j) + 3) for j in self.jobs if j.merge] or [0]
        small = [b for b in per_job if b <= SMALL_JOB_BYTES]
        big = max((b for b in per_job if b > SMALL_JOB_BYTES), default=0)
        window = sum(sorted(small, reverse=True)[: max(threads, 1) + 1])
        largest_out = max((j.numel * j.out_dtype.itemsize for j in self.jobs), default=0)
        return max(big, window) + largest_out

    def close(self) -> None:
        # Only what the plan opened: checkpoints handed in by the caller (in-memory state dicts) stay theirs.
        for ckpt in {id(c): c for c in self.owned}.values():
            ckpt.close()

    def __enter__(self) -> MergePlan:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def layer_position(name: str, num_layers: int) -> float:
    """MergeKit's ``t`` for layer gradients: index/(L−1) inside layer ``index``; 0 for tensors outside layers."""
    match = _LAYER_INDEX.search(name)
    if match is None or num_layers <= 1:
        return 0.0 if match is None else 1.0
    return int(match.group(1)) / (num_layers - 1)


def count_layers(names: list[str]) -> int:
    indices = [int(m.group(1)) for n in names if (m := _LAYER_INDEX.search(n))]
    return max(indices) + 1 if indices else 0


def build_plan(
    recipe: Recipe,
    *,
    out_dtype: str | None = None,
    checkpoints: Mapping[str, Checkpoint] | None = None,
    strict_lora_base: bool = False,
) -> MergePlan:
    """Open the recipe's inputs lazily, validate them, and plan every output tensor.

    ``checkpoints`` maps recipe paths to already-open checkpoints (in-memory state dicts); others are opened.
    A LoRA adapter whose ``base_model_name_or_path`` names another existing local model than the one it is
    applied to gives a warning, or ``LoraAdapterError`` with ``strict_lora_base``.  A recipe with ``slices``
    is planned by ``transfuse.slices``.
    """
    if recipe.slices is not None:
        from transfuse.slices import build_slice_plan

        return build_slice_plan(
            recipe, out_dtype=out_dtype, checkpoints=checkpoints, strict_lora_base=strict_lora_base
        )
    spec = recipe.spec
    task_entries: list[ModelEntry] = recipe.task_models
    given = dict(checkpoints or {})
    opened: list[Checkpoint] = []

    def open_path(path: str, lora: str | None, base: Checkpoint | None) -> Checkpoint:
        if lora is not None:
            ckpt = open_checkpoint(lora, lora_base=open_path(path, None, None))
        elif path in given:
            return given[path]
        else:
            ckpt = open_checkpoint(path, lora_base=base)
        opened.append(ckpt)
        return ckpt

    try:
        if recipe.base_model is not None:
            base = open_path(recipe.base_model, None, None)
        else:  # methods without a base (linear): the first model is the reference the deltas are taken against
            base = open_path(task_entries[0].path, task_entries[0].lora, None)
        models = [open_path(entry.path, entry.lora, base) for entry in task_entries]
        labels = [e.label for e in task_entries]
        base_label = recipe.base_model or labels[0]
        vocabulary = None
        tokenizer_spec = recipe.tokenizer_spec
        if tokenizer_spec is not None and _needs_alignment(tokenizer_spec, base, models):
            vocabulary, base, models = _align_vocabularies(tokenizer_spec, base, base_label, models, labels)
        plan = _plan_tensors(
            recipe,
            spec,
            base,
            base_label,
            models,
            labels,
            out_dtype,
            vocab_size=vocabulary.rows if vocabulary else None,
        )
        plan.owned = opened
        plan.warnings += _adapter_base_mismatches(models, labels, strict_lora_base)
        plan.tokenizer_files = _tokenizer_files(recipe, vocabulary, plan.tokenizer_dir, [base, *models])
    except BaseException:
        for ckpt in opened:
            ckpt.close()
        raise
    return plan


def _adapter_base_mismatches(models: list[Checkpoint], labels: list[str], strict: bool) -> list[str]:
    found = []
    for ckpt, label in zip(models, labels):
        config = getattr(ckpt, "adapter_config", None)
        named = (config or {}).get("base_model_name_or_path")
        if not isinstance(named, str) or not named or not Path(named).expanduser().exists():
            continue  # a hub id or nothing: cannot be compared with a local base
        applied = Path(ckpt.base.source).expanduser()
        if os.path.realpath(Path(named).expanduser()) == os.path.realpath(applied):
            continue
        message = (
            f"LoRA adapter {label} was trained on {named} (its base_model_name_or_path) but is applied to "
            f"{ckpt.base.source}"
        )
        if strict:
            raise LoraAdapterError(
                f"{message}; name that base in the recipe, or drop --strict-lora-base if the two are the same model"
            )
        found.append(
            f"{message}; if they are not the same model the result is wrong (--strict-lora-base refuses)"
        )
    return found


def _plan_tensors(
    recipe: Recipe,
    spec: MethodSpec,
    base: Checkpoint,
    base_label: str,
    models: list[Checkpoint],
    labels: list[str],
    out_dtype: str | None,
    *,
    vocab_size: int | None = None,
) -> MergePlan:
    base_names = base.names()
    base_set = set(base_names)
    ignored: dict[str, list[str]] = {}
    for ckpt, label in zip(models, labels):
        names = set(ckpt.names())
        common = len(base_set & names)
        if common < _SAME_BASE_MIN_OVERLAP * max(len(base_set), 1):
            raise NotSameBaseError(
                f"{label} shares only {common} of the base's {len(base_set)} tensor names: it is not a fine-tune of "
                f"{base_label}. Merge only models fine-tuned from the same base (e.g. {sorted(base_set)[:2]} vs "
                f"{sorted(names)[:2]})"
            )
        missing = [n for n in base_names if n not in names]
        if missing:
            raise MissingTensorError(
                f"{label} lacks {len(missing)} tensor(s) the base {base_label} has, e.g. {missing[:3]}; "
                "check that it is a complete checkpoint of the same architecture (a LoRA adapter dir is read as such "
                "only when it holds adapter_config.json)"
            )
        extra = sorted(names - base_set)
        if extra:
            ignored[label] = extra

    num_layers = count_layers(base_names)
    forced_dtype, recipe_dtype = output_dtypes(recipe, out_dtype)
    jobs = []
    notes = []
    for name in base_names:
        info = base.info(name)
        infos = [ckpt.info(name) for ckpt in models]
        is_float = info.dtype.is_floating_point
        model_rows: tuple[int, ...] = ()
        for mi, label in zip(infos, labels):
            if mi.dtype.is_floating_point != is_float:
                raise DtypeMismatchError(
                    f"tensor {name!r} is {mi.dtype} in {label} but {info.dtype} in the base {base_label}; "
                    "a fine-tune keeps the base's tensor kinds"
                )
        if any(mi.shape != info.shape for mi in infos):
            model_rows = _reconcile_rows(name, info.shape, infos, labels, base_label, recipe.vocab_mismatch)
            notes.append(
                f"{name}: vocabulary rows {list(model_rows)} reconciled to the base's {info.shape[0]}"
            )
        t = layer_position(name, num_layers)
        global_params, model_params = _resolve_params(spec, recipe, name, t) if is_float else ({}, {})
        if is_float and spec.check is not None:
            problem = spec.check(global_params, model_params)
            if problem is not None:
                raise ParameterError(
                    f"{spec.name}, tensor {name!r}: {problem} (models in order: {', '.join(labels)})"
                )
        dtype = (forced_dtype or recipe_dtype or info.dtype) if is_float else info.dtype
        nbytes = math.prod(info.shape) * info.dtype.itemsize + sum(
            math.prod(mi.shape) * mi.dtype.itemsize for mi in infos
        )
        if is_float and copies_input(
            spec, model_params, len(models), recipe.base_model is not None, dtype, info
        ):
            is_float = False  # one model, no base, identity parameters: its bytes, read once
        jobs.append(
            TensorJob(
                name=name,
                shape=tuple(info.shape),
                out_dtype=dtype,
                merge=is_float,
                global_params=global_params,
                model_params=model_params,
                model_rows=model_rows,
                input_bytes=nbytes if is_float else math.prod(info.shape) * info.dtype.itemsize,
                has_base=recipe.base_model is not None,
            )
        )
    config_path, config = _output_config(recipe, base, base_label, jobs, notes, vocab_size=vocab_size)
    # The base's tokenizer files are copied unless transfuse builds the tokenizer (tokenizer_files).
    tokenizer_dir = base.config_dir
    for label, extra in ignored.items():
        notes.append(f"{label}: {len(extra)} tensor(s) absent from the base are not merged, e.g. {extra[:3]}")
    return MergePlan(
        recipe=recipe,
        spec=spec,
        base=base,
        models=models,
        labels=labels,
        jobs=jobs,
        config_path=config_path,
        tokenizer_dir=tokenizer_dir,
        config=config,
        ignored=ignored,
        notes=notes,
    )


def output_dtypes(recipe: Recipe, out_dtype: str | None) -> tuple[torch.dtype | None, torch.dtype | None]:
    """The forced output dtype (``--dtype``) and the recipe's (``out_dtype``, else ``dtype``), each or None."""
    if out_dtype is not None and out_dtype not in DTYPE_NAMES:
        raise RecipeError(f"the output dtype must be one of {', '.join(DTYPE_NAMES)}, got {out_dtype!r}")
    named = recipe.out_dtype or recipe.dtype
    return (torch_dtype(out_dtype) if out_dtype else None), (torch_dtype(named) if named else None)


def _vocab_rows(jobs: list[TensorJob]) -> dict[str, int]:
    """Row counts of the output's vocabulary tensors (embeddings, LM head), by tensor name."""
    return {
        j.name: j.shape[0]
        for j in jobs
        if len(j.shape) == 2 and any(part in _VOCAB_NAMES for part in j.name.split("."))
    }


def _output_config(
    recipe: Recipe,
    base: Checkpoint,
    base_label: str,
    jobs: list[TensorJob],
    notes: list[str],
    *,
    vocab_size: int | None = None,
) -> tuple[Path | None, dict | None]:
    """The config.json the output gets, read and checked against the merged tensors before any work.

    From ``config_source`` when the recipe names one, else from the base.  A base *dir* without one is refused
    (the output could not be loaded); a bare weights file as base gives an output without config.json.
    """
    if recipe.config_source is not None:
        source = Path(recipe.config_source).expanduser()
        path = source / "config.json" if source.is_dir() else source
        if not path.is_file():
            raise ConfigError(f"config_source {recipe.config_source} holds no config.json")
    else:
        base_dir = Path(base.source).expanduser()
        if not base_dir.is_dir():
            notes.append(
                f"the base {base_label} is a bare weights file: the output gets no config.json (set "
                "`config_source: <model dir>` in the recipe to add one)"
            )
            return None, None
        path = base_dir / "config.json"
        if not path.is_file():
            raise ConfigError(
                f"the base {base_label} has no config.json, so the merged model could not be loaded; add the "
                "base's config.json to that dir, or set `config_source: <model dir>` in the recipe to take it "
                "from one of the fine-tunes"
            )
    try:
        config = read_json(path, "model config")
    except CheckpointError as exc:
        raise ConfigError(
            f"{exc}; the merged model would not load with it: fix or replace that file"
        ) from None
    if vocab_size is not None:  # the merged vocabulary's rows (tokenizer merging)
        config["vocab_size"] = vocab_size
    vocab = config.get("vocab_size")
    if vocab is not None:
        if isinstance(vocab, bool) or not isinstance(vocab, int) or vocab <= 0:
            raise ConfigError(f"{path}: vocab_size must be a positive integer, got {vocab!r}")
        for name, rows in _vocab_rows(jobs).items():
            if rows != vocab:
                raise ConfigError(
                    f"{path} says vocab_size {vocab}, but the merged {name} has {rows} rows: the output would "
                    "not load. Take the config from a model with that vocabulary (`config_source`), or "
                    "choose `vocab_mismatch` so the rows match the config"
                )
    return path, config


def check_output_config(plan: MergePlan) -> None:
    """``ConfigError`` when transformers cannot read the output's config.json (unknown ``model_type``, fields
    its config class rejects), checked in this process (what ``--dry-run`` does)."""
    if plan.config is not None and plan.config_path is not None:
        _check_config_loads(plan.config, plan.config_path)


_CONFIG_CHECK = """
import json, sys
from transformers import AutoConfig
config = json.load(sys.stdin)
model_type = config.pop("model_type")
try:
    AutoConfig.for_model(model_type, **config)
except Exception as exc:
    root = exc.__cause__ or exc
    print(type(root).__name__ + ": " + " ".join(str(root).split())[:300])
    sys.exit(3)
"""


class ConfigCheck:
    """transformers' check of the output config in a child process, beside the merge.

    Importing transformers costs 1-3 s of CPU; in a thread it also holds the GIL that the merge's workers need
    between torch ops (measured: +3-4 s on a 10 s merge), so it runs as its own process, unless this process has
    imported transformers' config classes already (then the check takes milliseconds and runs here).  ``failed()`` is cheap
    to poll; ``wait()`` raises ``ConfigError`` if transformers rejected the config.  Nothing is published before
    ``wait()`` returns.
    """

    def __init__(self, plan: MergePlan) -> None:
        self.path = plan.config_path
        config = plan.config
        self.proc: subprocess.Popen[str] | None = None
        self.error: ConfigError | None = None
        if config is None or self.path is None or config.get("model_type") is None or "auto_map" in config:
            return
        if "transformers.models.auto.configuration_auto" in sys.modules:  # already paid for: check here (ms)
            try:
                _check_config_loads(config, self.path)
            except ConfigError as exc:
                self.error = exc
            return
        env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_VERBOSITY": "error",
            "PYTHONWARNINGS": "ignore",
        }
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _CONFIG_CHECK],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=env,
        )
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(config))
        self.proc.stdin.close()

    def failed(self) -> bool:
        return self.error is not None or (self.proc is not None and self.proc.poll() not in (None, 0))

    def wait(self) -> None:
        if self.error is not None:
            raise self.error
        if self.proc is None:
            return
        out = self.proc.stdout.read() if self.proc.stdout else ""
        code = self.proc.wait()
        if code == 3:
            raise ConfigError(
                f"transformers cannot read {self.path} ({out.strip()}); the merged model would not load with it: "
                "fix or replace that file, or set `config_source`"
            )
        if code != 0:
            raise ConfigError(
                f"could not check {self.path} with transformers: the checking process exited with {code}; run "
                "`transfuse merge --dry-run` to see the check in this process"
            )

    def close(self) -> None:
        """Stop the child if it is still running (the merge failed or was interrupted)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()


def _check_config_loads(config: dict, path: Path) -> None:
    """Let transformers parse the config (its model_type and fields) before the output is published."""
    model_type = config.get("model_type")
    if model_type is None or "auto_map" in config:
        return  # nothing to check against / custom code we will not run
    from transformers import AutoConfig

    fields = {k: v for k, v in config.items() if k != "model_type"}
    try:
        AutoConfig.for_model(str(model_type), **fields)
    except Exception as exc:  # ValueError (unknown model_type), TypeError / KeyError (bad fields)
        root = exc.__cause__ or exc  # validators wrap the real reason
        reason = " ".join(str(root).split())[:300]
        raise ConfigError(
            f"transformers cannot read {path} ({type(root).__name__}: {reason}); the merged model would not load "
            "with it: fix or replace that file, or set `config_source`"
        ) from None


def _needs_alignment(spec: TokenizerSpec, base: Checkpoint, models: list[Checkpoint]) -> bool:
    """Union, a model's tokenizer, token settings or padding always align rows by token; ``base`` does when the
    inputs' vocabulary tensors differ in rows (fine-tunes that kept the base's vocabulary need no permutation)."""
    if spec.source != "base" or spec.tokens or spec.pad_to_multiple_of:
        return True
    for name in base.names():
        shape = base.info(name).shape
        if is_vocab_tensor(name, shape) and any(
            name in set(m.names()) and m.info(name).shape[0] != shape[0] for m in models
        ):
            return True
    return False


def _align_vocabularies(
    spec: TokenizerSpec, base: Checkpoint, base_label: str, models: list[Checkpoint], labels: list[str]
) -> tuple[VocabularyPlan, Checkpoint, list[Checkpoint]]:
    """Plan the output vocabulary and wrap every input so its vocabulary tensors come laid out in it."""
    checkpoints = {"base": base, **{f"model{i}": m for i, m in enumerate(models)}}
    names = {"base": base_label, **{f"model{i}": label for i, label in enumerate(labels)}}

    def tokenizer_dir(ckpt: Checkpoint) -> Path | None:
        d = ckpt.config_dir
        return d if d is not None and any(is_tokenizer_file(p.name) for p in config_files(d)) else None

    base_dir = tokenizer_dir(base)
    if base_dir is None:
        raise ConfigError(
            f"the base {base_label} has no tokenizer files: merging tokenizers ({spec.source}) maps every input's "
            "rows to tokens, starting from the base's tokenizer"
        )
    dirs = {}
    for key, ckpt in checkpoints.items():
        found = tokenizer_dir(ckpt)
        if found is None:
            # As MergeKit: an input without tokenizer files uses the base's (its rows must then match).
            rows = {ckpt.info(n).shape[0] for n in ckpt.names() if is_vocab_tensor(n, ckpt.info(n).shape)}
            base_rows = {
                base.info(n).shape[0] for n in base.names() if is_vocab_tensor(n, base.info(n).shape)
            }
            if rows != base_rows:
                raise ConfigError(
                    f"{names[key]} has no tokenizer files and {sorted(rows)} vocabulary rows against the base's "
                    f"{sorted(base_rows)}: add its tokenizer so its rows can be matched to tokens"
                )
            found = base_dir
        dirs[key] = found
    vocabulary = plan_vocabulary(spec, dirs, "base", names)
    aligned = AlignedVocabulary(vocabulary, checkpoints)
    wrapped = {k: VocabularyAlignedCheckpoint(c, k, aligned) for k, c in checkpoints.items()}
    return vocabulary, wrapped["base"], [wrapped[f"model{i}"] for i in range(len(models))]


def _tokenizer_files(
    recipe: Recipe, vocabulary: VocabularyPlan | None, tokenizer_dir: Path | None, inputs: list[Checkpoint]
) -> dict[str, bytes] | None:
    """The output's tokenizer files when transfuse writes them (a merged vocabulary or a chat template), else
    ``None`` (the tokenizer files are copied from ``tokenizer_dir``)."""
    if vocabulary is None and recipe.chat_template is None:
        return None
    tokenizer = vocabulary.tokenizer if vocabulary is not None else None
    if tokenizer is None:
        if tokenizer_dir is None:
            raise ConfigError("chat_template needs a tokenizer to attach it to, and the output has none")
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        except Exception as exc:
            raise ConfigError(
                f"cannot load the tokenizer in {tokenizer_dir} to set its chat template: {exc}"
            ) from None
    if recipe.chat_template is not None:
        from transfuse.chat_templates import resolve_chat_template

        templates = [_chat_template_of(c.config_dir) for c in inputs]
        template = resolve_chat_template(recipe.chat_template, templates)
        if template is not None:
            tokenizer.chat_template = template
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        return {p.name: p.read_bytes() for p in sorted(Path(tmp).iterdir()) if p.is_file()}


def _chat_template_of(directory: Path | None) -> str | None:
    if directory is None:
        return None
    jinja = directory / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    try:
        template = json.loads((directory / "tokenizer_config.json").read_text(encoding="utf-8")).get(
            "chat_template"
        )
    except (OSError, ValueError, AttributeError):
        return None
    return template if isinstance(template, str) else None


def _reconcile_rows(name, base_shape, infos, labels, base_label, mode) -> tuple[int, ...]:
    rows = []
    is_vocab = any(part in _VOCAB_NAMES for part in name.split("."))  # whole name parts: not "shared_expert"
    for mi, label in zip(infos, labels):
        same_tail = tuple(mi.shape[1:]) == tuple(base_shape[1:]) and len(mi.shape) == len(base_shape)
        if not (is_vocab and same_tail and len(base_shape) >= 1):
            raise ShapeMismatchError(
                f"tensor {name!r} has shape {tuple(mi.shape)} in {label} but {tuple(base_shape)} in the base "
                f"{base_label}; models of different sizes cannot be merged"
            )
        n, n_base = mi.shape[0], base_shape[0]
        if n != n_base:
            if mode == "error":
                raise VocabSizeMismatchError(
                    f"{name!r} has {n} vocabulary rows in {label} but {n_base} in the base {base_label}; set "
                    "`vocab_mismatch: truncate` (drop rows beyond the base's vocabulary) or `vocab_mismatch: pad` "
                    "(fill missing rows from the base, i.e. no change there) in the recipe"
                )
            if n > n_base and mode != "truncate":
                raise VocabSizeMismatchError(
                    f"{name!r} has more rows in {label} ({n}) than the base ({n_base}); `pad` only fills missing "
                    "rows: use `vocab_mismatch: truncate`"
                )
            if n < n_base and mode != "pad":
                raise VocabSizeMismatchError(
                    f"{name!r} has fewer rows in {label} ({n}) than the base ({n_base}); `truncate` only drops "
                    "rows: use `vocab_mismatch: pad`"
                )
        rows.append(n)
    return tuple(rows)


def _resolve_params(
    spec: MethodSpec, recipe: Recipe, tensor_name: str, t: float
) -> tuple[dict[str, ParamValue], dict[str, tuple[float, ...]]]:
    """Per-model settings first, then the global ``parameters``, then the method's default (MergeKit's order)."""
    per_model = [(entry.label, [entry.parameters, recipe.parameters]) for entry in recipe.task_models]
    return resolve_params(spec, per_model, [recipe.parameters], tensor_name, t)


def resolve_params(
    spec: MethodSpec,
    per_model_scopes: list[tuple[str, list[dict]]],
    global_scopes: list[dict],
    tensor_name: str,
    t: float,
) -> tuple[dict[str, ParamValue], dict[str, tuple[float, ...]]]:
    """Each parameter's value for one tensor: the first scope that sets it (filters and gradients evaluated at
    ``t``), else the method's default.  ``per_model_scopes``: (label, scopes from highest precedence) per model;
    ``global_scopes`` likewise for global parameters."""
    global_params: dict[str, ParamValue] = {}
    model_params: dict[str, tuple[float, ...]] = {}
    for param in spec.all_params:
        if param.per_model:
            values = [
                float(_first(param, scopes, tensor_name, t, label)) for label, scopes in per_model_scopes
            ]
            model_params[param.name] = tuple(values)
        else:
            global_params[param.name] = _first(param, global_scopes, tensor_name, t, "parameters")
    return global_params, model_params


def _first(param, scopes, tensor_name: str, t: float, where: str) -> ParamValue:
    for scope in scopes:
        if param.name in scope:
            value = evaluate_setting(scope[param.name], tensor_name, t)
            if value is not None:
                return param.validate(value, f"{where}, tensor {tensor_name}")
    if param.default is None:
        raise ParameterError(
            f"parameter {param.name!r} has no value for tensor {tensor_name!r} ({where}) and no default; "
            "set it per model or under the top-level `parameters`"
        )
    return param.default
