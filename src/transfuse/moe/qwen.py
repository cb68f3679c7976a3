"""Qwen2-MoE output of ``transfuse moe`` (MergeKit's ``architecture: qwen``): ``Qwen2MoeForCausalLM`` from dense
Llama / Mistral / Qwen2 fine-tunes of one base, with one always-on shared expert.

A Qwen2-MoE layer (Qwen team, "Qwen1.5-MoE", 2024; transformers' ``Qwen2MoeSparseMoeBlock``) computes, for an MLP
input ``x``::

    y = Σ_{e ∈ topk(p)} (p_e / Σ_{topk} p) · MLP_e(x)  +  σ(g · x) · MLP_shared(x),      p = softmax(R x)

with ``R`` the ``[E, H]`` router (``mlp.gate.weight``), ``g`` the ``[1, H]`` shared-expert gate
(``mlp.shared_expert_gate.weight``) and ``norm_topk_prob: true`` (the division by ``Σ_topk p``).  What is built, as
MergeKit 0.1.5's ``mergekit/moe/qwen.py`` builds it:

- the base's embeddings, attention, norms and LM head; Llama / Mistral bases get zero ``q_proj`` / ``k_proj`` /
  ``v_proj`` biases (Qwen2 attention has them; zero biases compute what the base computes), Qwen2 bases keep theirs;
- expert ``e``'s ``gate_proj`` / ``up_proj`` / ``down_proj`` as ``mlp.experts.{e}.*`` (``per_expert``, MergeKit's
  names) or fused ``mlp.experts.gate_up_proj`` ``[E, 2I, H]`` / ``down_proj`` ``[E, H, I]`` (``fused``);
- the shared expert's MLP as ``mlp.shared_expert.*`` and its gate row ``g`` from the gate mode, as one more
  expert's row (the same formula as the router rows, see :mod:`transfuse.moe.gates`);
- config: ``Qwen2MoeConfig`` from the base's, with ``num_experts = E``, ``num_experts_per_tok = experts_per_token``,
  ``moe_intermediate_size = shared_expert_intermediate_size = intermediate_size``, ``decoder_sparse_step = 1``
  (every layer sparse), ``mlp_only_layers = []``, ``norm_topk_prob = true``, ``qkv_bias = true``, no sliding window.
"""

from __future__ import annotations

import json
from typing import Any

import torch

from transfuse.errors import ConfigError
from transfuse.moe.build import DROPPED_CONFIG_KEYS, MLP_PROJECTIONS, OutputTensor

SOURCE_MODEL_TYPES = ("llama", "mistral", "qwen2")  # MergeKit's qwen output takes these (all of one type)
ATTENTION_BIASES = ("q_proj", "k_proj", "v_proj")
# Keys of the base's config that Qwen2-MoE's own values replace (sliding window: Qwen2-MoE's layer pattern cannot
# slide every layer as Mistral does; MergeKit drops it too).
QWEN_DROPPED_KEYS = (*DROPPED_CONFIG_KEYS, "layer_types", "use_sliding_window", "sliding_window")
QWEN_DROPPED_KEYS += ("max_window_layers", "qkv_bias", "mlp_only_layers")


def qwen2_moe_config(
    base_config: dict[str, Any], num_experts: int, experts_per_token: int, out_dtype: torch.dtype
) -> dict[str, Any]:
    """The Qwen2-MoE's config.json: the base's (sizes, RoPE, norms, token ids, tied embeddings) normalised through
    its own config class, as a ``Qwen2MoeConfig`` with MergeKit's MoE values (module docstring)."""
    from transformers import AutoConfig, Qwen2MoeConfig

    values = {k: v for k, v in base_config.items() if k not in DROPPED_CONFIG_KEYS}
    try:
        source = AutoConfig.for_model(base_config["model_type"], **values).to_dict()
        source = {k: v for k, v in source.items() if k not in QWEN_DROPPED_KEYS}
        intermediate = int(source["intermediate_size"])
        config = Qwen2MoeConfig(
            **source,
            num_experts=num_experts,
            num_experts_per_tok=experts_per_token,
            moe_intermediate_size=intermediate,
            shared_expert_intermediate_size=intermediate,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            norm_topk_prob=True,
            qkv_bias=True,
            use_sliding_window=False,
            output_router_logits=False,
        )
    except (TypeError, ValueError, KeyError) as exc:
        raise ConfigError(f"cannot turn the base's config into a Qwen2-MoE config: {exc}") from exc
    config.architectures = ["Qwen2MoeForCausalLM"]
    config.sliding_window = (
        None  # transformers stores 0 when use_sliding_window is false; null is unambiguous
    )
    name = str(out_dtype).removeprefix("torch.")
    if hasattr(config, "dtype"):
        config.dtype = name
    else:  # pragma: no cover - transformers < 4.56
        config.torch_dtype = name
    return json.loads(config.to_json_string(use_diff=False))


def head_dim(base_config: dict[str, Any]) -> int:
    """The attention head size: the config's ``head_dim``, else ``hidden_size // num_attention_heads``."""
    value = base_config.get("head_dim")
    if value:
        return int(value)
    return int(base_config["hidden_size"]) // int(base_config["num_attention_heads"])


def qwen_output_tensors(
    base_config: dict[str, Any],
    base_names: list[str],
    infos: dict[str, Any],
    mlp: dict[tuple[int, str], str],
    skipped: list[str],
    num_experts: int,
    hidden: int,
    out_dtype: torch.dtype,
    layout: str,
) -> list[OutputTensor]:
    """The Qwen2-MoE's tensors in the base's order: each layer's router, shared-expert gate, experts and shared
    expert where its MLP was, a zero bias after each q / k / v projection that has none."""
    base_set = set(base_names)
    heads = int(base_config["num_attention_heads"])
    kv_heads = int(base_config.get("num_key_value_heads") or heads)
    size = head_dim(base_config)
    layer_of = {name: layer for (layer, _proj), name in mlp.items()}
    out: list[OutputTensor] = []
    done: set[int] = set()
    for name in base_names:
        layer = layer_of.get(name)
        if layer is None:
            if name in skipped:
                continue
            dtype = out_dtype if infos[name].dtype.is_floating_point else infos[name].dtype
            out.append(OutputTensor(name, tuple(infos[name].shape), dtype, "copy", source=name))
            for proj in ATTENTION_BIASES:
                if name.endswith(f".self_attn.{proj}.weight"):
                    bias = name.removesuffix(".weight") + ".bias"
                    if bias not in base_set:
                        rows = (heads if proj == "q_proj" else kv_heads) * size
                        out.append(OutputTensor(bias, (rows,), out_dtype, "zeros"))
            continue
        if layer in done:
            continue
        done.add(layer)
        prefix = f"model.layers.{layer}.mlp"
        out.append(OutputTensor(f"{prefix}.gate.weight", (num_experts, hidden), out_dtype, "router", layer))
        out.append(
            OutputTensor(
                f"{prefix}.shared_expert_gate.weight", (1, hidden), out_dtype, "shared_router", layer
            )
        )
        shapes = {proj: tuple(infos[mlp[(layer, proj)]].shape) for proj in MLP_PROJECTIONS}
        if layout == "fused":
            gate_shape = shapes["gate_proj"]  # [I, H]
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
                    f"{prefix}.experts.down_proj",
                    (num_experts, *shapes["down_proj"]),
                    out_dtype,
                    "down",
                    layer,
                )
            )
        else:
            for e in range(num_experts):
                for proj in MLP_PROJECTIONS:
                    out.append(
                        OutputTensor(
                            f"{prefix}.experts.{e}.{proj}.weight",
                            shapes[proj],
                            out_dtype,
                            "expert",
                            layer,
                            e,
                            proj,
                            mlp[(layer, proj)],
                        )
                    )
        for proj in MLP_PROJECTIONS:
            out.append(
                OutputTensor(
                    f"{prefix}.shared_expert.{proj}.weight",
                    shapes[proj],
                    out_dtype,
                    "shared",
                    layer,
                    0,
                    proj,
                    mlp[(layer, proj)],
                )
            )
    return out


def check_loads_as_qwen2_moe(config: dict[str, Any], tensors: list[OutputTensor]) -> None:
    """The planned tensors must be exactly what ``Qwen2MoeForCausalLM`` (built on the meta device from the output
    config) has, in the installed transformers' naming, with the same shapes (a tied LM head may be absent)."""
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    cfg = Qwen2MoeConfig(
        **{k: v for k, v in config.items() if k not in ("model_type", "transformers_version")}
    )
    with torch.device("meta"):
        model = Qwen2MoeForCausalLM(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    fused = any(k.endswith("mlp.experts.gate_up_proj") for k in expected)
    planned: dict[str, tuple[int, ...]] = {}
    for t in tensors:
        if t.kind != "expert" or not fused:
            planned[t.name] = t.shape
            continue
        # transformers >= 5 holds the experts fused: [E, 2I, H] gate rows then up rows, and [E, H, I]
        prefix = f"model.layers.{t.layer}.mlp.experts"
        if t.proj == "down_proj":
            key, shape = f"{prefix}.down_proj", (t.expert + 1, *t.shape)
        else:
            key = f"{prefix}.gate_up_proj"
            rows = t.shape[0] * (2 if t.proj == "up_proj" else 1)
            prev = planned.get(key, (0, 0, t.shape[1]))
            shape = (max(prev[0], t.expert + 1), max(prev[1], rows), t.shape[1])
        planned[key] = shape
    if not fused and any(t.kind in ("gate_up", "down") for t in tensors):
        raise ConfigError(
            "the fused layout (mlp.experts.gate_up_proj) needs transformers >= 5; the installed transformers "
            "holds Qwen2-MoE experts one by one: use layout per_expert"
        )
    missing = sorted(set(expected) - set(planned))
    if cfg.tie_word_embeddings and "lm_head.weight" in missing:
        missing.remove("lm_head.weight")
    unexpected = sorted(set(planned) - set(expected))
    wrong = sorted(k for k in set(planned) & set(expected) if planned[k] != expected[k])
    if missing or unexpected or wrong:
        first = (missing or unexpected or wrong)[0]
        raise ConfigError(
            f"the MoE would not load as Qwen2MoeForCausalLM: {len(missing)} missing, {len(unexpected)} "
            f"unexpected, {len(wrong)} mis-shaped tensor(s), e.g. {first!r}"
            + (f" ({planned[first]} vs {expected[first]})" if first in wrong else "")
        )


__all__ = [
    "ATTENTION_BIASES",
    "SOURCE_MODEL_TYPES",
    "check_loads_as_qwen2_moe",
    "head_dim",
    "qwen2_moe_config",
    "qwen_output_tensors",
]
