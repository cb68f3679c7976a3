"""``transfuse moe``: a mixture of experts from dense fine-tunes of one base: Mixtral (``architecture: mixtral``,
the default, from Llama / Mistral) or Qwen2-MoE (``architecture: qwen`` with one shared expert, from Llama /
Mistral / Qwen2; its layout and config are in :mod:`transfuse.moe.qwen`).

What is built for Mixtral (``MixtralForCausalLM``): the base's embeddings, attention, norms and LM head; in every
layer, expert ``e``'s ``gate_proj`` / ``up_proj`` / ``down_proj`` become expert slot ``e`` and a router ``[E, H]``
computed by :mod:`transfuse.moe.gates`.  Two on-disk layouts, both loaded by transformers without missing or unexpected keys:

- ``per_expert`` (default; what ``MixtralForCausalLM.save_pretrained`` writes, read by transformers 4.x and 5.x):
  ``model.layers.{l}.block_sparse_moe.experts.{e}.w1 / w3 / w2.weight`` (gate / up / down) and
  ``model.layers.{l}.block_sparse_moe.gate.weight``;
- ``fused`` (transformers 5's in-memory layout, what MergeKit 0.1.5 writes): ``model.layers.{l}.mlp.gate.weight``,
  ``mlp.experts.gate_up_proj`` ``[E, 2I, H]`` (gate rows, then up rows) and ``mlp.experts.down_proj`` ``[E, H, I]``.

Every check (recipe, inputs, shapes, config, output location) runs before any tensor is read; the gates are
computed next; then tensors stream from memory maps into the atomic :class:`ShardedWriter` (declared up front with
``expect``), one tensor at a time (one fused ``[E, 2I, H]`` tensor in the fused layout), so memory stays bounded
by one layer whatever the model's size.
"""

from __future__ import annotations

import gc
import json
import re
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from transfuse._version import __version__
from transfuse.api import check_output_location, check_output_target, parse_size
from transfuse.dtypes import DTYPE_NAMES, torch_dtype
from transfuse.errors import (
    ConfigError,
    DtypeMismatchError,
    InvalidOptionError,
    MissingTensorError,
    NonFiniteOutputError,
    NotSameBaseError,
    RecipeError,
    ShapeMismatchError,
)
from transfuse.io.checkpoint import Checkpoint, open_checkpoint, read_json
from transfuse.io.writer import ShardedWriter, config_files
from transfuse.moe import gates as gate_lib
from transfuse.moe.recipe import (
    GATE_MODES,
    HIDDEN_GATE_MODES,
    PROMPT_GATE_MODES,
    ExpertEntry,
    MoeRecipe,
    load_moe_recipe,
)

LAYOUTS = ("per_expert", "fused")
SOURCE_MODEL_TYPES = ("llama", "mistral")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
# Mixtral's names for the dense MLP's projections (w1 = gate, w3 = up, w2 = down).
PER_EXPERT_NAMES = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
# Config entries that must agree between the base and every expert.
SHAPE_KEYS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
)
# Llama-only config keys that Mixtral lacks; refused when they change the computation.
LLAMA_ONLY = {"attention_bias": False, "mlp_bias": False}
DROPPED_CONFIG_KEYS = ("model_type", "architectures", "transformers_version", "_name_or_path", "auto_map")
DROPPED_CONFIG_KEYS += ("attention_bias", "mlp_bias", "pretraining_tp", "dtype", "torch_dtype")

_MLP_RE = re.compile(r"^model\.layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.weight$")
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")
_SKIPPED_RE = re.compile(
    r"\.rotary_emb\.inv_freq$"
)  # a buffer older Llama checkpoints saved; Mixtral has none


@dataclass(frozen=True)
class OutputTensor:
    """One tensor of the MoE: its name, shape, dtype and what it is made of.

    ``kind``: ``copy`` (the base's ``source``), ``router`` (layer ``layer``'s gate rows), ``expert`` (expert
    ``expert``'s ``proj`` of ``layer``), ``gate_up`` / ``down`` (every expert's, fused); Qwen2-MoE only:
    ``shared`` (the shared expert's ``proj``), ``shared_router`` (its ``[1, H]`` gate row), ``zeros`` (an attention
    bias the base lacks).
    """

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    kind: str
    layer: int = -1
    expert: int = -1
    proj: str = ""
    source: str = ""


@dataclass
class MoePlan:
    """A checked MoE build: opened inputs, the output config and every output tensor, before any work."""

    recipe: MoeRecipe
    base: Checkpoint
    experts: list[Checkpoint]
    config: dict[str, Any]
    out_dtype: torch.dtype
    num_layers: int
    hidden_size: int
    layout: str
    tensors: list[OutputTensor]
    tokenizer_dir: Path | None
    vocab_rows: int = 0
    notes: list[str] = field(default_factory=list)
    shared_experts: list[Checkpoint] = field(default_factory=list)  # Qwen2-MoE: its one shared expert

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    @property
    def model_class(self) -> str:
        """The transformers class the output loads as (``MixtralForCausalLM`` or ``Qwen2MoeForCausalLM``)."""
        return str(self.config["architectures"][0])

    def input_paths(self) -> list[str]:
        paths = [self.recipe.base_model, *(e.source_model for e in self.recipe.experts)]
        paths += [e.source_model for e in self.recipe.shared_experts]
        if self.recipe.source is not None:
            paths.append(str(self.recipe.source))
        return [p for p in paths if Path(p).expanduser().exists()]

    def router_name(self, layer: int) -> str:
        if self.layout == "fused" or self.recipe.architecture == "qwen":
            return f"model.layers.{layer}.mlp.gate.weight"
        return f"model.layers.{layer}.block_sparse_moe.gate.weight"

    def shared_router_name(self, layer: int) -> str:
        return f"model.layers.{layer}.mlp.shared_expert_gate.weight"

    def close(self) -> None:
        for ckpt in [*self.shared_experts, *self.experts, self.base]:
            ckpt.close()

    def __enter__(self) -> MoePlan:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class MoeResult:
    """What :func:`build_moe` wrote: the output dir, its shape, the router rows and timings."""

    out_dir: Path
    num_experts: int
    experts_per_token: int
    num_layers: int
    gate_mode: str
    layout: str
    out_dtype: str
    gates: torch.Tensor  # [L, E, H] float32, before the cast to the output dtype
    tensors_written: int
    bytes_written: int
    gate_seconds: float
    seconds: float
    notes: list[str] = field(default_factory=list)
    model_class: str = "MixtralForCausalLM"  # or Qwen2MoeForCausalLM
    shared_gates: torch.Tensor | None = None  # Qwen2-MoE: [L, 1, H] float32 shared_expert_gate rows


def validate_moe_options(layout: str, gate_dtype: str) -> None:
    if layout not in LAYOUTS:
        raise InvalidOptionError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    if gate_dtype not in DTYPE_NAMES:
        raise InvalidOptionError(f"gate_dtype must be one of {', '.join(DTYPE_NAMES)}, got {gate_dtype!r}")


def plan_moe(
    recipe: MoeRecipe | Mapping[str, Any] | str | Path,
    *,
    layout: str = "per_expert",
    seed: int | None = None,
    allow_all_same: bool = False,
) -> MoePlan:
    """Read and check a MoE recipe and its inputs (configs, tensor names, shapes, dtypes); read no tensor data."""
    validate_moe_options(layout, "float32")
    recipe = load_moe_recipe(dict(recipe) if isinstance(recipe, Mapping) else recipe)
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise InvalidOptionError(f"seed must be a whole number >= 0, got {seed!r}")
        recipe.seed = seed
    if (
        not allow_all_same
        and len(recipe.experts) > 1
        and len({_real(e.source_model) for e in recipe.experts}) == 1
        and not any(e.noise_scale for e in recipe.experts)
    ):
        raise RecipeError(
            "every expert is the same model: the MoE would compute exactly what that model does, at a higher "
            "cost; pass --i-understand-this-is-not-useful-without-training (allow_all_same=True) to build it "
            "anyway, e.g. to train it afterwards"
        )
    base = open_checkpoint(recipe.base_model)
    experts: list[Checkpoint] = []
    shared: list[Checkpoint] = []
    try:
        for entry in recipe.experts:
            experts.append(open_checkpoint(entry.source_model, lora_base=base))
        for entry in recipe.shared_experts:
            shared.append(open_checkpoint(entry.source_model, lora_base=base))
        return _check_and_plan(recipe, base, experts, layout, shared)
    except BaseException:
        for ckpt in [*shared, *experts, base]:
            ckpt.close()
        raise


def _check_and_plan(
    recipe: MoeRecipe,
    base: Checkpoint,
    experts: list[Checkpoint],
    layout: str,
    shared: list[Checkpoint] | None = None,
) -> MoePlan:
    notes: list[str] = []
    shared = shared or []
    qwen = recipe.architecture == "qwen"
    if qwen:
        from transfuse.moe import qwen as qwen_lib

        source_types, output = qwen_lib.SOURCE_MODEL_TYPES, "Qwen2-MoE"
    else:
        source_types, output = SOURCE_MODEL_TYPES, "Mixtral MoE"
    base_config = _model_config(base, "base_model")
    model_type = base_config.get("model_type")
    if model_type not in source_types:
        raise ConfigError(
            f"the base {base.source} is a {model_type!r} model; a {output} is built from "
            f"{', '.join(source_types)} models"
            + ("" if qwen else " (architecture: qwen with a shared expert also takes qwen2 models)")
        )
    for key, allowed in LLAMA_ONLY.items():
        if base_config.get(key, allowed) != allowed:
            raise ConfigError(
                f"the base {base.source} has {key}={base_config[key]!r}; a {output} has no place for those biases "
                f"(o_proj / MLP biases), so this model cannot become a {output}"
            )
    # (where, entry, checkpoint) of every model whose MLPs the MoE takes: the experts, then the shared expert
    sources = [(f"experts[{i}]", e, c) for i, (e, c) in enumerate(zip(recipe.experts, experts))]
    sources += [(f"shared_experts[{i}]", e, c) for i, (e, c) in enumerate(zip(recipe.shared_experts, shared))]
    for where, entry, ckpt in sources:
        if ckpt.config_dir is None or not (ckpt.config_dir / "config.json").is_file():
            continue  # a bare weights file or an adapter: its tensors are checked below
        config = _model_config(ckpt, where)
        if config.get("model_type") != model_type:
            raise NotSameBaseError(
                f"{where} {entry.source_model} is a {config.get('model_type')!r} model but the base "
                f"{base.source} is {model_type!r}: every expert must have the base's architecture"
            )
        for key in SHAPE_KEYS:
            if key in base_config and config.get(key, base_config[key]) != base_config[key]:
                raise ShapeMismatchError(
                    f"{where} {entry.source_model} has {key}={config.get(key)} but the base has "
                    f"{base_config[key]}: every expert must have the base's shape"
                )

    num_layers = int(base_config.get("num_hidden_layers", 0))
    if num_layers < 1:
        raise ConfigError(f"the base's config.json ({base.source}) gives no num_hidden_layers")
    base_names = base.names()
    base_set = set(base_names)
    infos = {n: base.info(n) for n in base_names}
    embed = "model.embed_tokens.weight"
    if embed not in base_set:
        raise MissingTensorError(
            f"the base {base.source} has no {embed!r}; is it a Llama / Mistral causal LM?"
        )
    hidden = int(infos[embed].shape[1])
    vocab_rows = int(infos[embed].shape[0])

    mlp: dict[tuple[int, str], str] = {}
    skipped = []
    for name in base_names:
        match = _MLP_RE.match(name)
        if match:
            mlp[(int(match.group(1)), match.group(2))] = name
        elif _SKIPPED_RE.search(name):
            skipped.append(name)
        elif ".mlp." in name:
            raise ConfigError(
                f"the base {base.source} has {name!r}, which a {output} expert has no place for (MLP biases or a "
                f"non-Llama MLP); it cannot become a {output}"
            )
    if skipped:
        notes.append(
            f"{len(skipped)} rotary inv_freq buffer(s) of the base not written (the MoE computes them)"
        )
    for layer in range(num_layers):
        for proj in MLP_PROJECTIONS:
            if (layer, proj) not in mlp:
                raise MissingTensorError(
                    f"the base {base.source} has no model.layers.{layer}.mlp.{proj}.weight; a Llama / Mistral "
                    f"base has gate_proj, up_proj and down_proj in each of its {num_layers} layers"
                )
    beyond = sorted(
        {int(m.group(1)) for n in base_names if (m := _LAYER_RE.match(n))} - set(range(num_layers))
    )
    if beyond:
        raise ConfigError(
            f"the base {base.source} has tensors of layer {beyond[0]} but its config says {num_layers} layers"
        )

    order = {name: i for i, name in enumerate(base_names)}
    for where, entry, ckpt in sources:
        names = set(ckpt.names())
        common = base_set & names
        if len(common) * 2 < len(base_set):
            raise NotSameBaseError(
                f"{where} {entry.source_model} shares only {len(common)} of the base's {len(base_set)} tensor "
                "names: it is not a fine-tune of that base (nor of its architecture)"
            )
        for name in sorted(common, key=order.__getitem__):
            b, x = infos[name], ckpt.info(name)
            if tuple(b.shape) != tuple(x.shape):
                raise ShapeMismatchError(
                    f"{name} is {tuple(x.shape)} in {where} {entry.source_model} but {tuple(b.shape)} in the "
                    "base: every expert must have the base's shapes"
                )
        for name in mlp.values():
            if name not in names:
                raise MissingTensorError(
                    f"{where} {entry.source_model} has no {name!r}; each expert gives its MLP to every layer"
                )
            if not ckpt.info(name).dtype.is_floating_point:
                raise DtypeMismatchError(f"{name} of {where} {entry.source_model} is not floating point")

    out_dtype = _output_dtype(recipe, base_config, infos[embed].dtype)
    if qwen:
        config = qwen_lib.qwen2_moe_config(base_config, len(experts), recipe.experts_per_token, out_dtype)
        tensors = qwen_lib.qwen_output_tensors(
            base_config, base_names, infos, mlp, skipped, len(experts), hidden, out_dtype, layout
        )
        qwen_lib.check_loads_as_qwen2_moe(config, tensors)
    else:
        config = mixtral_config(base_config, len(experts), recipe.experts_per_token, out_dtype)
        tensors = _output_tensors(
            base_names, infos, mlp, skipped, num_layers, len(experts), hidden, out_dtype, layout
        )
        _check_against_transformers(config, tensors, layout)

    tokenizer_dir = (
        base.config_dir if base.config_dir is not None and _has_tokenizer(base.config_dir) else None
    )
    if recipe.gate_mode in PROMPT_GATE_MODES and tokenizer_dir is None:
        raise ConfigError(
            f"gate_mode {recipe.gate_mode!r} tokenizes the prompts with the base's tokenizer, but {base.source} has "
            "no tokenizer files; add them to the base dir or use gate_mode: random"
        )
    if recipe.gate_mode in HIDDEN_GATE_MODES and base.config_dir is None:
        raise ConfigError(
            f"gate_mode {recipe.gate_mode!r} runs the base, which needs a model dir, not a file"
        )
    if tokenizer_dir is None:
        notes.append(f"the base {base.source} has no tokenizer files: the output has none")
    if recipe.gate_mode == "hidden_mlp":
        notes.append(
            "gate_mode hidden_mlp is transfuse's (each layer's MLP input, mean over tokens): mergekit-moe does not "
            "accept this recipe; gate_mode hidden is MergeKit's"
        )
    # Qwen2 configs carry a sliding_window that only use_sliding_window switches on; Mistral's is on when set.
    slides = base_config.get("sliding_window") is not None and base_config.get(
        "use_sliding_window", model_type != "qwen2"
    )
    if slides and not qwen:
        notes.append(f"the base's sliding_window {base_config['sliding_window']} is kept (MergeKit drops it)")
    elif slides:
        notes.append(
            f"the base's sliding_window {base_config['sliding_window']} is dropped, as MergeKit does: Qwen2-MoE's "
            "config cannot slide every layer; inputs longer than the window attend to all tokens"
        )
    if qwen and recipe.gate_mode == "uniform_random" and not recipe.shared_experts[0].positive_prompts:
        notes.append(
            "shared_experts[0] has no prompts: mergekit-moe refuses this recipe for gate_mode uniform_random "
            "(it accepts it for random); transfuse gives its gate a uniform random row"
        )
    plan = MoePlan(
        recipe=recipe,
        base=base,
        experts=experts,
        config=config,
        out_dtype=out_dtype,
        num_layers=num_layers,
        hidden_size=hidden,
        layout=layout,
        tensors=tensors,
        tokenizer_dir=tokenizer_dir,
        vocab_rows=vocab_rows,
        notes=notes,
        shared_experts=shared,
    )
    return plan


def _real(p: str) -> str:
    import os

    return os.path.realpath(os.path.expanduser(p))


def _model_config(ckpt: Checkpoint, what: str) -> dict[str, Any]:
    if ckpt.config_dir is None or not (ckpt.config_dir / "config.json").is_file():
        raise ConfigError(
            f"{what} {ckpt.source} has no config.json; a MoE is built from Hugging Face model dirs (config + weights)"
        )
    return read_json(ckpt.config_dir / "config.json", "model config")


def _has_tokenizer(directory: Path) -> bool:
    return any(
        p.name.startswith("tokenizer") or p.name in ("vocab.json", "vocab.txt")
        for p in config_files(directory)
    )


def _output_dtype(recipe: MoeRecipe, base_config: dict[str, Any], stored: torch.dtype) -> torch.dtype:
    if recipe.dtype is not None:
        return torch_dtype(recipe.dtype)
    for key in ("dtype", "torch_dtype"):
        name = base_config.get(key)
        if isinstance(name, str) and name in DTYPE_NAMES:
            return torch_dtype(name)
    return stored if stored.is_floating_point else torch.float32


def mixtral_config(
    base_config: dict[str, Any], num_experts: int, experts_per_token: int, out_dtype: torch.dtype
) -> dict[str, Any]:
    """The MoE's config.json: the base's (sizes, RoPE, norms, token ids, sliding window) as a ``MixtralConfig``
    with ``num_local_experts``, ``num_experts_per_tok`` and the router's defaults (no aux loss logits, no jitter)."""
    from transformers import AutoConfig, MixtralConfig

    values = {k: v for k, v in base_config.items() if k not in DROPPED_CONFIG_KEYS}
    try:
        # Normalise the base's config (legacy RoPE keys, defaults) through its own class first.
        source = AutoConfig.for_model(base_config["model_type"], **values).to_dict()
        source = {k: v for k, v in source.items() if k not in DROPPED_CONFIG_KEYS}
        config = MixtralConfig(
            **source,
            num_local_experts=num_experts,
            num_experts_per_tok=experts_per_token,
            output_router_logits=False,
            router_jitter_noise=0.0,
        )
    except (TypeError, ValueError, KeyError) as exc:
        raise ConfigError(f"cannot turn the base's config into a Mixtral config: {exc}") from exc
    config.architectures = ["MixtralForCausalLM"]
    name = str(out_dtype).removeprefix("torch.")
    if hasattr(config, "dtype"):
        config.dtype = name
    else:  # pragma: no cover - transformers < 4.56
        config.torch_dtype = name
    return json.loads(config.to_json_string(use_diff=False))


def _output_tensors(
    base_names: list[str],
    infos: dict[str, Any],
    mlp: dict[tuple[int, str], str],
    skipped: list[str],
    num_layers: int,
    num_experts: int,
    hidden: int,
    out_dtype: torch.dtype,
    layout: str,
) -> list[OutputTensor]:
    """The output tensors in the base's order, each layer's MoE tensors where its MLP was."""
    out: list[OutputTensor] = []
    done: set[int] = set()
    for name in base_names:
        match = _MLP_RE.match(name)
        if match is None:
            if name not in skipped:
                dtype = out_dtype if infos[name].dtype.is_floating_point else infos[name].dtype
                out.append(OutputTensor(name, tuple(infos[name].shape), dtype, "copy", source=name))
            continue
        layer = int(match.group(1))
        if layer in done:
            continue
        done.add(layer)
        gate_shape = tuple(infos[mlp[(layer, "gate_proj")]].shape)  # [I, H]
        down_shape = tuple(infos[mlp[(layer, "down_proj")]].shape)  # [H, I]
        if layout == "fused":
            prefix = f"model.layers.{layer}.mlp"
            out.append(
                OutputTensor(f"{prefix}.gate.weight", (num_experts, hidden), out_dtype, "router", layer)
            )
            out.append(
                OutputTensor(
                    f"{prefix}.experts.gate_up_proj",
                    (num_experts, 2 * gate_shape[0], gate_shape[1]),
                    out_dtype,
                    "gate_up",
                    layer,
                )
            )
            out.append(
                OutputTensor(
                    f"{prefix}.experts.down_proj", (num_experts, *down_shape), out_dtype, "down", layer
                )
            )
            continue
        prefix = f"model.layers.{layer}.block_sparse_moe"
        out.append(OutputTensor(f"{prefix}.gate.weight", (num_experts, hidden), out_dtype, "router", layer))
        for e in range(num_experts):
            for proj in ("gate_proj", "down_proj", "up_proj"):  # w1, w2, w3: transformers' save order
                shape = tuple(infos[mlp[(layer, proj)]].shape)
                out.append(
                    OutputTensor(
                        f"{prefix}.experts.{e}.{PER_EXPERT_NAMES[proj]}.weight",
                        shape,
                        out_dtype,
                        "expert",
                        layer,
                        e,
                        proj,
                        mlp[(layer, proj)],
                    )
                )
    return out


def _check_against_transformers(config: dict[str, Any], tensors: list[OutputTensor], layout: str) -> None:
    """The planned tensors must be exactly what ``MixtralForCausalLM`` (built on the meta device from the
    output config) has, in the installed transformers' naming, with the same shapes (a tied LM head may be
    absent)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(
        **{k: v for k, v in config.items() if k not in ("model_type", "transformers_version")}
    )
    with torch.device("meta"):
        model = MixtralForCausalLM(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    planned = _in_state_dict_naming(
        tensors, layout, fused=any(k.endswith("experts.gate_up_proj") for k in expected)
    )
    missing = sorted(set(expected) - set(planned))
    if cfg.tie_word_embeddings and "lm_head.weight" in missing:
        missing.remove("lm_head.weight")
    unexpected = sorted(set(planned) - set(expected))
    wrong = sorted(k for k in set(planned) & set(expected) if planned[k] != expected[k])
    if missing or unexpected or wrong:
        first = (missing or unexpected or wrong)[0]
        raise ConfigError(
            f"the MoE would not load as MixtralForCausalLM: {len(missing)} missing, {len(unexpected)} unexpected, "
            f"{len(wrong)} mis-shaped tensor(s), e.g. {first!r}"
            + (f" ({planned[first]} vs {expected[first]})" if first in wrong else "")
        )


def _in_state_dict_naming(
    tensors: list[OutputTensor], layout: str, *, fused: bool
) -> dict[str, tuple[int, ...]]:
    """Planned names and shapes as the model's ``state_dict`` spells them (fused experts in transformers >= 5)."""
    out: dict[str, tuple[int, ...]] = {}
    for t in tensors:
        if t.kind == "copy":
            out[t.name] = t.shape
            continue
        if fused:
            prefix = f"model.layers.{t.layer}.mlp"
            if t.kind == "router":
                out[f"{prefix}.gate.weight"] = t.shape
            elif t.kind in ("gate_up", "down"):
                out[f"{prefix}.experts.{'gate_up_proj' if t.kind == 'gate_up' else 'down_proj'}"] = t.shape
            elif t.proj == "down_proj":
                out[f"{prefix}.experts.down_proj"] = (t.expert + 1, *t.shape)
            else:
                key = f"{prefix}.experts.gate_up_proj"
                rows = t.shape[0] * (2 if t.proj == "up_proj" else 1)
                prev = out.get(key, (0, 0, t.shape[1]))
                out[key] = (max(prev[0], t.expert + 1), max(prev[1], rows), t.shape[1])
        else:
            prefix = f"model.layers.{t.layer}.block_sparse_moe"
            if t.kind == "router":
                out[f"{prefix}.gate.weight"] = t.shape
            elif t.kind == "expert":
                out[t.name] = t.shape
            else:
                return {}  # fused output checked against an unfused transformers: refuse below as unexpected
    return out


# ------------------------------------------------------------------------------------------------ gates


def compute_gates(
    plan: MoePlan, *, gate_dtype: str = "float32", notes: list[str] | None = None
) -> torch.Tensor:
    """``[L, E + S, H]`` float32 gate rows for the plan's gate mode (see :mod:`transfuse.moe.gates`): the ``E``
    experts' router rows, then (Qwen2-MoE, ``S = 1``) the shared expert's ``shared_expert_gate`` row, computed
    from its prompts as one more expert's row (as MergeKit does).

    ``notes``, when given, gets what the user should know about the rows (hidden_avg prompts of unequal length,
    where MergeKit's mean would also count its padding)."""
    recipe = plan.recipe
    mode = recipe.gate_mode
    if mode not in GATE_MODES:  # pragma: no cover - the recipe refuses it
        raise RecipeError(f"gate_mode {mode!r} is not supported")
    entries = [*recipe.experts, *recipe.shared_experts]
    if mode in ("random", "uniform_random"):
        # each tensor from its own name's generator: the router rows do not depend on the shared expert
        rows = gate_lib.random_gates(
            mode, plan.num_layers, plan.num_experts, plan.hidden_size, recipe.seed, plan.router_name
        )
        if recipe.shared_experts:
            shared = gate_lib.random_gates(
                mode, plan.num_layers, 1, plan.hidden_size, recipe.seed, plan.shared_router_name
            )
            rows = torch.cat([rows, shared], dim=1)
        return rows
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(plan.tokenizer_dir))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load the base's tokenizer from {plan.tokenizer_dir}: {exc}") from exc
    rows = plan.vocab_rows
    tokenized = [
        (
            gate_lib.tokenize_prompts(tokenizer, e.positive_prompts, rows),
            gate_lib.tokenize_prompts(tokenizer, e.negative_prompts, rows),
        )
        for e in entries
    ]
    if mode == "cheap_embed":
        embed = plan.base.tensor("model.embed_tokens.weight")
        gates = gate_lib.cheap_embed_gates(embed, tokenized, plan.num_layers)
        _release(plan.base, "model.embed_tokens.weight")
        return gates
    if mode == "hidden_avg" and notes is not None:
        names = [f"experts[{i}]" for i in range(len(recipe.experts))]
        names += [f"shared_experts[{i}]" for i in range(len(recipe.shared_experts))]
        uneven = [
            name
            for name, (positive, negative) in zip(names, tokenized)
            if len({len(ids) for ids in positive}) > 1 or len({len(ids) for ids in negative}) > 1
        ]
        if uneven:
            notes.append(
                f"gate_mode hidden_avg: the prompts of {', '.join(uneven)} differ in token count; transfuse "
                "averages each prompt over its own tokens, mergekit-moe's mean also counts its left padding, so "
                "those router rows differ from MergeKit's (docs/moe.md)"
            )
    site, _ = gate_lib.HIDDEN_MODES[mode]
    probe = gate_lib.HiddenStateProbe(plan.base.config_dir, torch_dtype(gate_dtype), site)  # type: ignore[arg-type]
    try:
        if len(probe.layers) != plan.num_layers:
            raise ConfigError(
                f"the base runs {len(probe.layers)} layers but its config says {plan.num_layers}"
            )
        return gate_lib.hidden_gates(probe, mode, tokenized)
    finally:
        probe.close()
        del probe
        gc.collect()


# ------------------------------------------------------------------------------------------------ build


def build_moe(
    recipe: MoeRecipe | Mapping[str, Any] | str | Path,
    out_dir: str | Path,
    *,
    layout: str = "per_expert",
    gate_dtype: str = "float32",
    seed: int | None = None,
    shard_size: str | int = "5GB",
    overwrite: bool = False,
    allow_all_same: bool = False,
    copy_tokenizer: bool = True,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
) -> MoeResult:
    """Build a MoE from a ``mergekit-moe`` recipe into ``out_dir``; return what was written.

    The recipe's ``architecture`` picks the output: Mixtral (default) or Qwen2-MoE (``qwen``, one shared expert).
    ``layout``: ``"per_expert"`` (default: Mixtral ``block_sparse_moe.experts.{e}.w1/w2/w3``, what transformers
    saves; Qwen2-MoE ``mlp.experts.{e}.gate_proj/up_proj/down_proj``, what MergeKit writes) or ``"fused"``
    (``mlp.experts.gate_up_proj`` / ``down_proj``, transformers >= 5).  ``gate_dtype``: the dtype the base runs in for
    the ``hidden*`` gates (float32 default).  ``seed`` overrides the recipe's (random gates, ``noise_scale``).
    ``allow_all_same``: build even when every expert is the same model.  Everything is checked before the gates
    are computed; the output is written into a temporary dir beside ``out_dir`` and moved into place when complete.
    """
    started = time.perf_counter()
    validate_moe_options(layout, gate_dtype)
    max_shard = parse_size(shard_size)
    say = log or (lambda _msg: None)
    with plan_moe(recipe, layout=layout, seed=seed, allow_all_same=allow_all_same) as plan:
        check_output_location(out_dir, plan.input_paths())
        check_output_target(out_dir, overwrite)
        say(
            f"computing {plan.num_layers} x {plan.num_experts} router rows (gate_mode {plan.recipe.gate_mode})"
        )
        gate_started = time.perf_counter()
        notes = list(plan.notes)
        all_rows = compute_gates(plan, gate_dtype=gate_dtype, notes=notes)
        gate_seconds = time.perf_counter() - gate_started
        gates = all_rows[:, : plan.num_experts]
        shared_gates = all_rows[:, plan.num_experts :] if plan.shared_experts else None
        if not bool(torch.isfinite(all_rows).all()):
            raise NonFiniteOutputError(
                "the router rows hold inf/NaN (the base's activations on the prompts overflowed); nothing was "
                "written: try gate_dtype float32 or other prompts"
            )
        degenerate = gate_lib.degenerate_layers(gates) if plan.recipe.gate_mode in PROMPT_GATE_MODES else []
        if degenerate:
            notes.append(
                f"{len(degenerate)} of {plan.num_layers} layer(s) have nearly dependent router rows (condition "
                f"number > 5, e.g. layer {degenerate[0]}): the prompts may be too alike, some experts will be "
                "under-used"
            )
        metadata = {"transfuse_version": __version__, "moe_recipe": plan.recipe.to_yaml()}
        written = 0
        with ShardedWriter(
            out_dir, max_shard_bytes=max_shard, metadata=metadata, overwrite=overwrite
        ) as writer:
            writer.expect([(t.name, t.shape, t.dtype) for t in plan.tensors])
            bar = _progress_bar(len(plan.tensors)) if progress else None
            try:
                for t, tensor in _stream(plan, gates, shared_gates):
                    writer.add(t.name, tensor)
                    written += 1
                    if bar is not None:
                        bar.advance(bar.task_ids[0])
            finally:
                if bar is not None:
                    bar.stop()
            if plan.tokenizer_dir is not None and copy_tokenizer:
                writer.copy_config_from(plan.tokenizer_dir, skip=("config.json",))
            writer.add_file("config.json", json.dumps(plan.config, indent=2, sort_keys=True) + "\n")
            writer.add_file(
                "moe_recipe.yaml", f"# written by transfuse {__version__}\n{plan.recipe.to_yaml()}"
            )
            total = writer.total_size
            path = writer.finish()
        return MoeResult(
            out_dir=Path(path),
            num_experts=plan.num_experts,
            experts_per_token=plan.recipe.experts_per_token,
            num_layers=plan.num_layers,
            gate_mode=plan.recipe.gate_mode,
            layout=layout,
            out_dtype=str(plan.out_dtype).removeprefix("torch."),
            gates=gates,
            tensors_written=written,
            bytes_written=total,
            gate_seconds=gate_seconds,
            seconds=time.perf_counter() - started,
            notes=notes,
            model_class=plan.model_class,
            shared_gates=shared_gates,
        )


def _stream(
    plan: MoePlan, gates: torch.Tensor, shared_gates: torch.Tensor | None = None
) -> Iterator[tuple[OutputTensor, torch.Tensor]]:
    """Each output tensor in the declared order, read from the memory maps as it is needed."""
    for t in plan.tensors:
        if t.kind == "copy":
            tensor = plan.base.tensor(t.source)
            if tensor.dtype != t.dtype:
                tensor = tensor.to(t.dtype)
            yield t, tensor
            _release(plan.base, t.source)
        elif t.kind == "router":
            yield t, gates[t.layer].to(t.dtype).contiguous()
        elif t.kind == "expert":
            yield t, _expert_tensor(plan, t.expert, t.layer, t.proj).to(t.dtype)
            _release(plan.experts[t.expert], t.source)
        elif t.kind == "shared":
            tensor = _mlp_tensor(
                plan.shared_experts[t.expert],
                plan.recipe.shared_experts[t.expert],
                f"shared_experts[{t.expert}]",
                plan.recipe.seed,
                t.layer,
                t.proj,
            )
            yield t, tensor.to(t.dtype)
            _release(plan.shared_experts[t.expert], t.source)
        elif t.kind == "shared_router":
            assert shared_gates is not None
            yield t, shared_gates[t.layer].to(t.dtype).contiguous()
        elif t.kind == "zeros":
            yield t, torch.zeros(t.shape, dtype=t.dtype)
        else:
            fused = torch.empty(t.shape, dtype=t.dtype)
            projs = ("gate_proj", "up_proj") if t.kind == "gate_up" else ("down_proj",)
            for e in range(plan.num_experts):
                offset = 0
                for proj in projs:
                    part = _expert_tensor(plan, e, t.layer, proj)
                    fused[e, offset : offset + part.shape[0]].copy_(part)
                    offset += part.shape[0]
                    _release(plan.experts[e], f"model.layers.{t.layer}.mlp.{proj}.weight")
            yield t, fused


def _expert_tensor(plan: MoePlan, expert: int, layer: int, proj: str) -> torch.Tensor:
    """Expert ``expert``'s ``proj`` of ``layer`` (see :func:`_mlp_tensor`)."""
    return _mlp_tensor(
        plan.experts[expert], plan.recipe.experts[expert], f"experts[{expert}]", plan.recipe.seed, layer, proj
    )


def _mlp_tensor(
    ckpt: Checkpoint, entry: ExpertEntry, where: str, seed: int, layer: int, proj: str
) -> torch.Tensor:
    """``proj`` of ``layer`` from one expert's checkpoint, with its recipe entry's ``noise_scale`` (gaussian noise
    seeded by ``where`` and the tensor name) and ``residual_scale`` (down_proj only) applied in float32."""
    name = f"model.layers.{layer}.mlp.{proj}.weight"
    tensor = ckpt.tensor(name)
    scale = entry.residual_scale if proj == "down_proj" else None
    if not entry.noise_scale and scale is None:
        return tensor
    value = tensor.float()
    if entry.noise_scale:
        gen = gate_lib.seeded_generator(seed, f"{where}:{name}")
        value = value + torch.randn(value.shape, generator=gen) * entry.noise_scale
    if scale is not None:
        value = value * scale
    return value


def _release(ckpt: Checkpoint, name: str) -> None:
    release = getattr(ckpt, "release", None)
    if release is not None:
        release(name)


def _progress_bar(total: int):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(
        TextColumn("moe"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), transient=False
    )
    bar.add_task("moe", total=total)
    bar.start()
    return bar


__all__ = [
    "LAYOUTS",
    "MoePlan",
    "MoeResult",
    "OutputTensor",
    "build_moe",
    "compute_gates",
    "mixtral_config",
    "plan_moe",
    "validate_moe_options",
]
