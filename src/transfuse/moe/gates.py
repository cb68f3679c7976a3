"""Router (gate) weights of a MoE built from dense experts: one row per expert per layer, ``[L, E, H]`` float32.

With ``P_e`` / ``N_e`` the positive / negative prompts of expert ``e`` (each tokenized as ``bos_token + prompt``
without other special tokens, as MergeKit does) and ``x_l(p)`` a ``[T, H]`` activation of prompt ``p`` at layer
``l``:

- ``hidden``:      ``x_l`` = the MLP's input (post-attention-layernorm output: what the router will see),
  ``s_l(p) = mean_t x_l(p)``;  ``v_l = mean_{p∈P_e} s_l(p) − mean_{p∈N_e} s_l(p)``  (no negatives: no second term)
- ``hidden_last``: ``x_l`` = the layer's input (``output_hidden_states[l]``), ``s_l(p)`` = its last token
- ``hidden_avg``:  ``x_l`` = the layer's input, ``s_l(p) = mean_t x_l(p)``
- ``cheap_embed``: ``u(P) = Σ_{p∈P} Σ_t E[token_t(p)]`` (embedding rows, no forward pass), ``û = u / ‖u‖``;
  ``v = û(P_e) − û(N_e)``, the same for every layer
- every prompt mode then normalises ``row_{l,e} = v_l / max(‖v_l‖₂, 1e-8)`` (MergeKit's formula).
- ``random``: ``N(0, 1)`` rows; ``uniform_random``: ``U(−1/√H, 1/√H)`` rows; each layer's ``[E, H]`` from a
  generator seeded by ``blake2b(seed, router tensor name)``, so the result does not depend on anything else.

Each prompt is run alone (batch 1), so no padding enters a mean; activations are computed in ``dtype``
(float32 by default).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from transfuse.errors import ConfigError, RecipeError

NORM_EPS = 1e-8


def seeded_generator(seed: int, name: str) -> torch.Generator:
    """A CPU generator seeded from ``blake2b(seed, name)``."""
    digest = hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


def normalize_rows(v: torch.Tensor) -> torch.Tensor:
    """``v / max(‖v‖₂, 1e-8)`` along the last dim."""
    return v / v.norm(p=2, dim=-1, keepdim=True).clamp(min=NORM_EPS)


def random_gates(
    mode: str, num_layers: int, num_experts: int, hidden: int, seed: int, router_name: Callable[[int], str]
) -> torch.Tensor:
    """``[L, E, H]`` seeded random router rows (``random``: N(0, 1); ``uniform_random``: U(±1/√H))."""
    rows = []
    for layer in range(num_layers):
        gen = seeded_generator(seed, router_name(layer))
        if mode == "random":
            rows.append(torch.randn(num_experts, hidden, generator=gen))
        else:
            scale = hidden**-0.5
            rows.append(torch.rand(num_experts, hidden, generator=gen) * (2 * scale) - scale)
    return torch.stack(rows)


def tokenize_prompts(tokenizer, prompts: Sequence[str], vocab_rows: int) -> list[torch.Tensor]:
    """Each prompt as ``bos_token + prompt`` token ids (no other special tokens), checked against the rows."""
    out = []
    for prompt in prompts:
        ids = tokenizer((tokenizer.bos_token or "") + prompt, add_special_tokens=False)["input_ids"]
        if not ids:
            raise RecipeError(f"prompt {prompt!r} tokenizes to no tokens; give it some text")
        if max(ids) >= vocab_rows:
            raise ConfigError(
                f"prompt {prompt!r} has token id {max(ids)} but the base's embedding has {vocab_rows} rows: the "
                "tokenizer does not belong to the base"
            )
        out.append(torch.tensor(ids, dtype=torch.long))
    return out


def cheap_embed_gates(
    embed: torch.Tensor, tokenized: Sequence[tuple[list[torch.Tensor], list[torch.Tensor]]], num_layers: int
) -> torch.Tensor:
    """``[L, E, H]`` rows from summed token embeddings (``embed`` is the ``[V, H]`` input embedding)."""

    def unit_sum(prompts: list[torch.Tensor]) -> torch.Tensor:
        total = torch.zeros(embed.shape[1], dtype=torch.float32)
        for ids in prompts:
            total += embed.index_select(0, ids).float().sum(dim=0)
        return normalize_rows(total)

    rows = []
    for positive, negative in tokenized:
        v = unit_sum(positive)
        if negative:
            v = v - unit_sum(negative)
        rows.append(normalize_rows(v))
    return torch.stack(rows).unsqueeze(0).repeat(num_layers, 1, 1)


class HiddenStateProbe:
    """The base model (transformers, no LM head) on CPU, with hooks on each layer's MLP input."""

    def __init__(self, model_dir: str | Path, dtype: torch.dtype) -> None:
        import transformers
        from transformers import AutoModel

        key = "dtype" if _transformers_major_minor(transformers.__version__) >= (4, 56) else "torch_dtype"
        verbosity = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()  # "lm_head.weight UNEXPECTED": the head is not needed here
        try:
            self.model = AutoModel.from_pretrained(str(model_dir), **{key: dtype}).eval()
        except (OSError, ValueError, RuntimeError) as exc:
            raise ConfigError(
                f"cannot load the base {model_dir} with transformers for gate_mode hidden: {exc}"
            ) from exc
        finally:
            transformers.logging.set_verbosity(verbosity)
        layers = getattr(self.model, "layers", None)
        if layers is None:
            raise ConfigError(
                f"the base {model_dir} loads as {type(self.model).__name__}, which has no `layers`"
            )
        self.layers = list(layers)
        self._mlp_inputs: list[torch.Tensor | None] = [None] * len(self.layers)
        self._hooks = [
            layer.mlp.register_forward_pre_hook(self._capture(i)) for i, layer in enumerate(self.layers)
        ]

    def _capture(self, i: int):
        def hook(module, args):
            self._mlp_inputs[i] = args[0].detach()

        return hook

    def activations(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(layer inputs, MLP inputs)`` of one prompt, each ``[L, T, H]`` float32."""
        with torch.no_grad():
            out = self.model(input_ids=ids.unsqueeze(0), output_hidden_states=True, return_dict=True)
        layer_inputs = torch.stack([h[0] for h in out.hidden_states[: len(self.layers)]]).float()
        mlp_inputs = torch.stack([h[0] for h in self._mlp_inputs]).float()  # type: ignore[index]
        return layer_inputs, mlp_inputs

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()
        del self.model
        self.layers = []


def hidden_gates(
    probe: HiddenStateProbe, mode: str, tokenized: Sequence[tuple[list[torch.Tensor], list[torch.Tensor]]]
) -> torch.Tensor:
    """``[L, E, H]`` rows from the base's activations on the prompts (``mode``: hidden / hidden_last / hidden_avg)."""

    def summary(ids: torch.Tensor) -> torch.Tensor:
        layer_inputs, mlp_inputs = probe.activations(ids)
        if mode == "hidden":
            return mlp_inputs.mean(dim=1)
        if mode == "hidden_avg":
            return layer_inputs.mean(dim=1)
        return layer_inputs[:, -1, :]

    def mean_over(prompts: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack([summary(ids) for ids in prompts]).mean(dim=0)

    rows = []
    for positive, negative in tokenized:
        v = mean_over(positive)
        if negative:
            v = v - mean_over(negative)
        rows.append(normalize_rows(v))
    return torch.stack(rows, dim=1)  # [L, E, H]


def degenerate_layers(gates: torch.Tensor, threshold: float = 5.0) -> list[int]:
    """Layers whose ``[E, H]`` router has condition number > ``threshold`` (prompts too alike), as MergeKit
    warns."""
    out = []
    for layer in range(gates.shape[0]):
        if gates.shape[1] > 1 and float(torch.linalg.cond(gates[layer].double())) > threshold:
            out.append(layer)
    return out


def _transformers_major_minor(version: str) -> tuple[int, int]:
    parts = version.split(".")
    try:
        return int(parts[0]), int("".join(c for c in parts[1] if c.isdigit()) or 0)
    except (IndexError, ValueError):
        return (0, 0)


__all__ = [
    "HiddenStateProbe",
    "cheap_embed_gates",
    "degenerate_layers",
    "hidden_gates",
    "normalize_rows",
    "random_gates",
    "seeded_generator",
    "tokenize_prompts",
]
