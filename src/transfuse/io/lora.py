"""A PEFT LoRA adapter seen as the full model it makes: base + B @ A * scale, computed lazily per tensor.

For a target module ``m`` of the adapter (keys ``base_model.model.<m>.lora_A.weight`` / ``lora_B.weight``, or
``lora_embedding_A`` / ``lora_embedding_B`` for embeddings) the merged tensor is what peft's
``merge_and_unload`` gives::

    W' = W + scale * (B @ A)            (Linear; transposed when fan_in_fan_out, e.g. GPT-2's Conv1D)
    E' = E + scale * (B @ A).T          (Embedding)
    b' = b + scale * lora_B.bias        (lora_bias=True)
    scale = alpha / r                   (alpha / sqrt(r) with use_rslora)

r and alpha are per module (``rank_pattern`` / ``alpha_pattern``, matched as peft matches them).

Adapted tensors are returned in float32.  Full tensors the adapter stores (``modules_to_save``, an embedding's
``base_layer`` saved with it) replace the base's.  Adapter module paths are mapped onto the base's tensor
names with one consistent prefix rule for the whole adapter (identity, strip the first component, or add one
of the base's top-level components), so an adapter trained on ``BertForSequenceClassification``
(``bert.encoder...``) applies to a ``BertModel`` checkpoint (``encoder...``) and vice versa.

Not supported (``LoraAdapterError`` with advice): DoRA, non-LoRA PEFT types, LoRA on conv layers, and options
that change what merging means (layer_replication, target_parameters, trainable tokens, aLoRA, QALoRA,
PiSSA-style initialisations saved without conversion).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from transfuse.errors import CheckpointError, LoraAdapterError
from transfuse.io.checkpoint import ADAPTER_CONFIG, Checkpoint, CheckpointBase, TensorInfo, read_json

ADAPTER_SAFETENSORS = "adapter_model.safetensors"
ADAPTER_BIN = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."

_LINEAR_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.(?P<param>weight|bias)$")
_EMBEDDING_KEY = re.compile(r"^(?P<module>.+)\.lora_embedding_(?P<ab>[AB])(?:\.[^.]+)?$")

_ADVICE = (
    "merge it into its base with peft (PeftModel.from_pretrained(base, adapter).merge_and_unload()"
    ".save_pretrained(dir)) and use that dir instead"
)
# Config options whose adapters are not plain "W + scale * B @ A" (value -> what it is called in messages).
_UNSUPPORTED_OPTIONS = {
    "use_dora": "DoRA (use_dora)",
    "use_qalora": "QALoRA (use_qalora)",
    "layer_replication": "layer_replication",
    "target_parameters": "LoRA on parameters (target_parameters)",
    "trainable_token_indices": "trainable tokens (trainable_token_indices)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "arrow_config": "Arrow routing (arrow_config)",
    "use_bdlora": "use_bdlora",
}
# Initialisations that modify the base during training (peft converts them on save only when asked to).
_BASE_MODIFYING_INITS = ("pissa", "olora", "corda", "lora_ga")


@dataclass(frozen=True)
class _LoraPair:
    """One adapted weight: where its factors are in the adapter, and how to combine them."""

    a_key: str
    b_key: str
    scale: float
    embedding: bool
    fan_in_fan_out: bool


def get_pattern_key(patterns: list[str], module: str) -> str | None:
    """The first of ``patterns`` matching ``module`` the way peft matches rank_pattern / alpha_pattern."""
    for pattern in patterns:
        if re.match(rf"(.*\.)?({pattern})$", module):
            return pattern
    return None


def _check_config(config: dict[str, Any], where: str) -> None:
    peft_type = config.get("peft_type", "LORA")
    if str(peft_type).upper() != "LORA":
        raise LoraAdapterError(
            f"{where} is a PEFT {peft_type} adapter; transfuse applies only LoRA adapters - {_ADVICE}"
        )
    for option, label in _UNSUPPORTED_OPTIONS.items():
        if config.get(option):
            raise LoraAdapterError(f"{where} uses {label}, which transfuse cannot apply - {_ADVICE}")
    init = str(config.get("init_lora_weights", "")).lower()
    if init.startswith("loftq"):
        raise LoraAdapterError(
            f"{where} is a LoftQ adapter (init_lora_weights {config.get('init_lora_weights')!r}): it was trained "
            "against a quantized copy of the base whose residual it corrects, so adding it to the original base "
            "gives wrong weights. Merge it onto the LoftQ-quantized base it was made with (peft's "
            f"replace_lora_weights_loftq / the saved base), or {_ADVICE}"
        )
    if init.startswith(_BASE_MODIFYING_INITS):
        raise LoraAdapterError(
            f"{where} was initialised with {config['init_lora_weights']!r}, which changes the base weights "
            "during training; re-save it with peft's "
            "save_pretrained(path_initial_model_for_weight_conversion=...) so it applies to the original "
            f"base, or {_ADVICE}"
        )
    for field in ("r", "lora_alpha"):
        value = config.get(field)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise LoraAdapterError(f"{where}: '{field}' must be a positive number, got {value!r}")


def _resolve_base(
    base: Checkpoint | str | Path | None, config: dict[str, Any], adapter_source: str
) -> tuple[Checkpoint, bool]:
    """The base checkpoint and whether the adapter owns (must close) it."""
    from transfuse.io.checkpoint import open_checkpoint

    if base is not None and not isinstance(base, (str, os.PathLike)):
        return base, False
    if base is not None:
        return open_checkpoint(base), True
    named = config.get("base_model_name_or_path")
    if isinstance(named, str) and named and Path(named).expanduser().exists():
        try:
            return open_checkpoint(named), True
        except CheckpointError as exc:
            raise LoraAdapterError(
                f"LoRA adapter {adapter_source}: its base_model_name_or_path {named} cannot be read ({exc}); "
                "pass the base model dir explicitly"
            ) from exc
    said = f"names {named!r}, which is not a local path" if named else "does not name its base model"
    raise LoraAdapterError(
        f"LoRA adapter {adapter_source}: {ADAPTER_CONFIG} {said}; pass the base model dir explicitly "
        "(recipe: `model: path/to/base+path/to/adapter`, API: open_checkpoint(adapter, lora_base=base_dir))"
    )


class LoraCheckpoint(CheckpointBase):
    """A LoRA adapter applied to its base, read lazily; see the module docstring.

    ``names()`` are the base's; ``tensor(name)`` is the base tensor plus the LoRA delta (float32) for adapted
    tensors, the adapter's tensor for ones it replaces, else the base tensor itself.  ``config_dir`` is the
    base's.
    """

    def __init__(
        self,
        adapter_dir: Path,
        *,
        source: str,
        base: Checkpoint,
        owns_base: bool,
        adapter: Checkpoint,
        config: dict[str, Any],
    ) -> None:
        self.source = source
        self.adapter_dir = adapter_dir
        self.base = base
        self.adapter = adapter
        self.adapter_config = config
        self.config_dir = base.config_dir
        self._owns_base = owns_base
        self._pairs: dict[str, _LoraPair] = {}  # base weight name -> factors
        self._bias: dict[str, tuple[str, float]] = {}  # base bias name -> (lora_B.bias key, scale)
        self._replaced: dict[str, str] = {}  # base name -> adapter key of the full tensor replacing it
        self._infos: dict[str, TensorInfo] = {}
        self._plan()

    @classmethod
    def open(cls, adapter_dir: Path, *, source: str, base: Checkpoint | str | Path | None) -> LoraCheckpoint:
        """Open the adapter in ``adapter_dir`` and its base (see ``open_checkpoint``)."""
        from transfuse.io.safetensors_reader import SafetensorsCheckpoint
        from transfuse.io.torch_reader import TorchCheckpoint

        config = read_json(adapter_dir / ADAPTER_CONFIG, "PEFT adapter config")
        _check_config(config, f"adapter {source}")
        if (adapter_dir / ADAPTER_SAFETENSORS).is_file():
            adapter: Checkpoint = SafetensorsCheckpoint(
                [adapter_dir / ADAPTER_SAFETENSORS], source=source, config_dir=None
            )
        elif (adapter_dir / ADAPTER_BIN).is_file():
            adapter = TorchCheckpoint([adapter_dir / ADAPTER_BIN], source=source, config_dir=None)
        else:
            raise LoraAdapterError(
                f"adapter dir {source} has {ADAPTER_CONFIG} but no {ADAPTER_SAFETENSORS} or {ADAPTER_BIN}"
            )
        try:
            base_ckpt, owns = _resolve_base(base, config, source)
        except BaseException:
            adapter.close()
            raise
        try:
            return cls(
                adapter_dir, source=source, base=base_ckpt, owns_base=owns, adapter=adapter, config=config
            )
        except BaseException:
            adapter.close()
            if owns:
                base_ckpt.close()
            raise

    # ------------------------------------------------------------------ planning (no tensor data read)

    def _plan(self) -> None:
        cfg = self.adapter_config
        rank_pattern: dict[str, Any] = cfg.get("rank_pattern") or {}
        alpha_pattern: dict[str, Any] = cfg.get("alpha_pattern") or {}
        rslora = bool(cfg.get("use_rslora"))
        fan_in_fan_out = bool(cfg.get("fan_in_fan_out"))

        factors: dict[tuple[str, bool], dict[str, str]] = {}  # (module, embedding) -> {"A"/"B"/"bias": key}
        full: dict[str, str] = {}  # module-relative tensor name -> adapter key
        for key in self.adapter.names():
            rel = key[len(PEFT_PREFIX) :] if key.startswith(PEFT_PREFIX) else key
            if "lora_magnitude_vector" in rel:
                raise LoraAdapterError(f"adapter {self.source} is a DoRA adapter ({key}); {_ADVICE}")
            m = _LINEAR_KEY.match(rel)
            if m:
                part = "bias" if m["param"] == "bias" else m["ab"]
                if part == "bias" and m["ab"] != "B":
                    raise LoraAdapterError(f"adapter {self.source}: unexpected LoRA tensor {key}")
                factors.setdefault((m["module"], False), {})[part] = key
                continue
            m = _EMBEDDING_KEY.match(rel)
            if m:
                factors.setdefault((m["module"], True), {})[m["ab"]] = key
                continue
            if ".lora_" in rel or rel.startswith("lora_") or "trainable_tokens" in rel:
                raise LoraAdapterError(
                    f"adapter {self.source} holds {key}, a kind of adapter tensor transfuse cannot apply; "
                    f"{_ADVICE}"
                )
            # A full tensor (modules_to_save, or a layer's base weights saved with the adapter): strip peft's
            # wrapper infixes to get the module's own parameter name.
            parts = [p for p in rel.split(".") if p not in ("base_layer", "original_module")]
            if "modules_to_save" in parts:
                i = parts.index("modules_to_save")
                # peft saves "<m>.modules_to_save.<param>" (old versions kept the adapter name after it).
                drop = 2 if len(parts) > i + 2 else 1
                parts = parts[:i] + parts[i + drop :]
            full[".".join(parts)] = key

        wanted: list[str] = [f"{module}.weight" for module, _ in factors]
        wanted += [f"{module}.bias" for (module, _), f in factors.items() if "bias" in f]
        wanted += list(full)
        rename = self._choose_mapping(wanted)

        for rel_name, key in full.items():
            name = rename(rel_name)
            base_info = self.base.info(name)
            info = self.adapter.info(key)
            # Only the rows may differ (a resized vocabulary); the engine reconciles rows across inputs.
            if info.shape[1:] != base_info.shape[1:] or len(info.shape) != len(base_info.shape):
                raise LoraAdapterError(
                    f"adapter {self.source}: {key} has shape {list(info.shape)} but the base's {name} is "
                    f"{list(base_info.shape)}; the adapter was trained on a different model"
                )
            self._replaced[name] = key
            self._infos[name] = TensorInfo(name=name, shape=info.shape, dtype=info.dtype)

        for (module, embedding), parts in factors.items():
            what = "lora_embedding" if embedding else "lora"
            if "A" not in parts or "B" not in parts:
                missing = "A" if "A" not in parts else "B"
                raise LoraAdapterError(
                    f"adapter {self.source}: module {module} has no {what}_{missing} tensor; "
                    "the adapter is incomplete"
                )
            a_info, b_info = self.adapter.info(parts["A"]), self.adapter.info(parts["B"])
            if len(a_info.shape) != 2 or len(b_info.shape) != 2:
                raise LoraAdapterError(
                    f"adapter {self.source}: module {module} has {len(a_info.shape)}-D LoRA factors "
                    "(a conv layer?); only Linear, Conv1D and Embedding LoRA layers are supported - "
                    f"{_ADVICE}"
                )
            r_key = get_pattern_key(list(rank_pattern), module)
            a_key = get_pattern_key(list(alpha_pattern), module)
            r = rank_pattern[r_key] if r_key is not None else cfg["r"]
            alpha = alpha_pattern[a_key] if a_key is not None else cfg["lora_alpha"]
            if a_info.shape[0] != r or b_info.shape[1] != r:
                raise LoraAdapterError(
                    f"adapter {self.source}: module {module} has rank {a_info.shape[0]} factors "
                    f"(A {list(a_info.shape)}, B {list(b_info.shape)}) but its config says r={r}; "
                    f"{ADAPTER_CONFIG} does not match the weights"
                )
            scale = alpha / math.sqrt(r) if rslora else alpha / r
            # peft always transposes embeddings' deltas and ignores fan_in_fan_out there.
            fifo = fan_in_fan_out and not embedding
            if embedding or fifo:
                delta_shape = (a_info.shape[1], b_info.shape[0])
            else:
                delta_shape = (b_info.shape[0], a_info.shape[1])
            name = rename(f"{module}.weight")
            target = self._infos.get(name) or self.base.info(name)
            if tuple(target.shape) != delta_shape:
                hint = (
                    " (set or unset fan_in_fan_out?)" if tuple(reversed(delta_shape)) == target.shape else ""
                )
                raise LoraAdapterError(
                    f"adapter {self.source}: the LoRA delta of {module} has shape {list(delta_shape)} but "
                    f"the base's {name} is {list(target.shape)}{hint}; the adapter was trained on a "
                    "different model"
                )
            self._pairs[name] = _LoraPair(parts["A"], parts["B"], scale, embedding, fifo)
            self._infos[name] = TensorInfo(name=name, shape=tuple(target.shape), dtype=torch.float32)
            if "bias" in parts:
                bias_name = rename(f"{module}.bias")
                bias_info = self.base.info(bias_name)
                lora_bias = self.adapter.info(parts["bias"])
                if lora_bias.shape != bias_info.shape:
                    raise LoraAdapterError(
                        f"adapter {self.source}: {parts['bias']} has shape {list(lora_bias.shape)} but the "
                        f"base's {bias_name} is {list(bias_info.shape)}"
                    )
                self._bias[bias_name] = (parts["bias"], scale)
                self._infos[bias_name] = TensorInfo(
                    name=bias_name, shape=bias_info.shape, dtype=torch.float32
                )

    def _choose_mapping(self, wanted: list[str]) -> Callable[[str], str]:
        """One renaming of adapter-relative names onto base names for the whole adapter (else an error)."""
        base_names = self.base.names()
        base_set = set(base_names)
        # Candidates: as is; without one of the adapter's top-level components; with one of the base's.
        candidates: list[Callable[[str], str]] = [lambda n: n]
        for first in dict.fromkeys(n.split(".", 1)[0] for n in wanted if "." in n):
            candidates.append(lambda n, p=first + ".": n[len(p) :] if n.startswith(p) else n)
        for first in dict.fromkeys(n.split(".", 1)[0] for n in base_names if "." in n):
            candidates.append(lambda n, p=first + ".": p + n)
        # The rule mapping the most names wins; ties go to the earlier (simpler) rule.
        best = max(candidates, key=lambda rule: sum(rule(n) in base_set for n in wanted))
        unmatched = [n for n in wanted if best(n) not in base_set]
        if unmatched:
            example = ", ".join(repr(n) for n in unmatched[:3])
            raise LoraAdapterError(
                f"adapter {self.source}: {len(unmatched)} adapted tensor(s) match no tensor of the base "
                f"{self.base.source} (e.g. {example}; base names look like {base_names[:2]}); the adapter "
                "was trained on a different model - pass its actual base"
            )
        return best

    # ------------------------------------------------------------------ Checkpoint API

    def names(self) -> list[str]:
        return self.base.names()

    def info(self, name: str) -> TensorInfo:
        cached = self._infos.get(name)
        return cached if cached is not None else self.base.info(name)

    def lora_delta(self, name: str) -> torch.Tensor | None:
        """The float32 change the adapter makes to ``name`` (``scale * B @ A``, in its layout), or None."""
        pair = self._pairs.get(name)
        if pair is not None:
            a = self.adapter.tensor(pair.a_key).to(torch.float32)
            b = self.adapter.tensor(pair.b_key).to(torch.float32)
            delta = b @ a
            if pair.embedding or pair.fan_in_fan_out:
                delta = delta.T
            return delta.mul_(pair.scale).contiguous()
        bias = self._bias.get(name)
        if bias is not None:
            key, scale = bias
            return self.adapter.tensor(key).to(torch.float32).mul(scale)
        return None

    def tensor(self, name: str) -> torch.Tensor:
        key = self._replaced.get(name)
        original = self.adapter.tensor(key) if key is not None else self.base.tensor(name)
        delta = self.lora_delta(name)
        if delta is None:
            return original
        # Out of place: `original` may be the memory-mapped input, which must not change.
        return torch.add(original.to(torch.float32), delta)

    def release(self, name: str) -> None:
        """Drop ``name``'s pages from the resident set (see ``SafetensorsCheckpoint.release``)."""
        release = getattr(self.base, "release", None)
        if release is not None:
            release(name)

    def close(self) -> None:
        self.adapter.close()
        if self._owns_base:
            self.base.close()
