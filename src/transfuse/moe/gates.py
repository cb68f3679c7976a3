"""Router (gate) weights of a MoE built from dense experts: one row per expert per layer, ``[L, E, H]`` float32.

With ``P_e`` / ``N_e`` the positive / negative prompts of expert ``e`` (each tokenized as ``bos_token + prompt``
without other special tokens, as MergeKit does) and ``x_l(p)`` a ``[T, H]`` activation of prompt ``p`` at layer
``l`` (its ``T`` real tokens):

- ``hidden`` (MergeKit's; ``hidden_last`` is MergeKit's synonym): ``x_l`` = the layer's input (the residual
  stream, ``output_hidden_states[l]``), ``s_l(p)`` = its last token;
  ``v_l = mean_{p∈P_e} s_l(p) − mean_{p∈N_e} s_l(p)``  (no negatives: no second term)
- ``hidden_avg`` (MergeKit's): ``x_l`` = the layer's input, ``s_l(p) = mean_t x_l(p)`` over the real tokens
  (MergeKit's mean also counts its left padding when the prompts of one list differ in length)
- ``hidden_mlp`` (transfuse's): ``x_l`` = the MLP's input (post-attention-layernorm output: what the router will
  see), ``s_l(p) = mean_t x_l(p)``
- ``cheap_embed``: ``u(P) = Σ_{p∈P} Σ_t E[token_t(p)]`` (embedding rows, no forward pass), ``û = u / ‖u‖``;
  ``v = û(P_e) − û(N_e)``, the same for every layer
- every prompt mode then normalises ``row_{l,e} = v_l / max(‖v_l‖₂, 1e-8)`` (MergeKit's formula).
- ``random``: ``N(0, 1)`` rows; ``uniform_random``: ``U(−1/√H, 1/√H)`` rows; each layer's ``[E, H]`` from a
  generator seeded by ``blake2b(seed, router tensor name)``, so the result does not depend on anything else.

The distinct prompts of all experts run through the base in right-padded batches with an attention mask (longest
first, at most ``BATCH_TOKENS`` padded tokens a batch); the base being causal, a real token never sees padding, and
the summaries read real tokens only, so the rows equal the one-prompt-at-a-time computation (tested).  Activations
are computed in ``dtype`` (float32 by default) and reduced in float32.
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


class _StopForward(Exception):
    """Raised by the last layer's hook: the rest of the forward pass is not needed."""


# gate_mode -> (where the activation is read, how a prompt's tokens are reduced)
HIDDEN_MODES = {
    "hidden": ("layer_input", "last"),
    "hidden_last": ("layer_input", "last"),  # MergeKit 0.1.5 accepts it as a synonym of hidden
    "hidden_avg": ("layer_input", "mean"),
    "hidden_mlp": ("mlp_input", "mean"),
}
BATCH_TOKENS = 8192  # padded tokens per forward pass (batch size x longest prompt of the batch)
BATCH_PROMPTS = 64


class HiddenStateProbe:
    """The base model (transformers, no LM head) on CPU, with forward pre-hooks on each decoder layer
    (``site="layer_input"``: the residual stream entering the layer, ``output_hidden_states[l]``) or on each
    layer's MLP (``site="mlp_input"``: the post-attention-layernorm output).  The hooks reduce each prompt's
    activation over its real tokens as the batch passes, so memory holds ``[L, B, H]``, not every activation."""

    def __init__(self, model_dir: str | Path, dtype: torch.dtype, site: str = "layer_input") -> None:
        import transformers
        from transformers import AutoModel

        if site not in ("layer_input", "mlp_input"):
            raise ValueError(f"site must be layer_input or mlp_input, got {site!r}")
        key = "dtype" if _transformers_major_minor(transformers.__version__) >= (4, 56) else "torch_dtype"
        verbosity = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()  # "lm_head.weight UNEXPECTED": the head is not needed here
        try:
            self.model = AutoModel.from_pretrained(str(model_dir), **{key: dtype}).eval()
        except (OSError, ValueError, RuntimeError) as exc:
            raise ConfigError(
                f"cannot load the base {model_dir} with transformers for the hidden gate modes: {exc}"
            ) from exc
        finally:
            transformers.logging.set_verbosity(verbosity)
        layers = getattr(self.model, "layers", None)
        if layers is None:
            raise ConfigError(
                f"the base {model_dir} loads as {type(self.model).__name__}, which has no `layers`"
            )
        self.layers = list(layers)
        self.site = site
        self._reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
        self._summaries: list[torch.Tensor | None] = [None] * len(self.layers)
        if site == "layer_input":
            self._hooks = [
                layer.register_forward_pre_hook(self._capture(i), with_kwargs=True)
                for i, layer in enumerate(self.layers)
            ]
        else:
            self._hooks = [
                layer.mlp.register_forward_pre_hook(self._capture(i), with_kwargs=True)
                for i, layer in enumerate(self.layers)
            ]

    def _capture(self, i: int):
        last = i == len(self.layers) - 1

        def hook(module, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            self._summaries[i] = self._reduce(x.detach())  # type: ignore[misc]
            if last:  # nothing after the last layer's input (or its MLP's) enters a summary: skip the rest
                raise _StopForward

        return hook

    def summaries(self, prompts: Sequence[torch.Tensor], reduce: str) -> torch.Tensor:
        """``[B, L, H]`` float32: each prompt's activation at each layer, at its last token (``reduce="last"``)
        or averaged over its tokens (``"mean"``).  The prompts run as one right-padded batch with an attention
        mask; padding positions never enter a summary (and, the model being causal, never reach a real token)."""
        if reduce not in ("last", "mean"):
            raise ValueError(f"reduce must be last or mean, got {reduce!r}")
        lengths = torch.tensor([len(ids) for ids in prompts], dtype=torch.long)
        width = int(lengths.max())
        input_ids = torch.zeros(len(prompts), width, dtype=torch.long)
        mask = torch.zeros(len(prompts), width, dtype=torch.long)
        for row, ids in enumerate(prompts):
            input_ids[row, : len(ids)] = ids
            mask[row, : len(ids)] = 1
        real = mask.unsqueeze(-1).float()  # [B, T, 1]
        counts = lengths.unsqueeze(1).float()  # [B, 1]
        last = lengths - 1
        rows = torch.arange(len(prompts))

        def summarise(x: torch.Tensor) -> torch.Tensor:  # [B, T, H] -> [B, H] float32
            if reduce == "last":
                return x[rows, last].float()
            return (x.float() * real).sum(dim=1) / counts

        self._reduce = summarise
        self._summaries = [None] * len(self.layers)
        try:
            with torch.no_grad():
                self.model(input_ids=input_ids, attention_mask=mask, use_cache=False, return_dict=True)
        except _StopForward:
            pass
        finally:
            self._reduce = None
        if any(s is None for s in self._summaries):
            raise ConfigError("the base's forward pass did not run every layer; cannot compute hidden gates")
        return torch.stack(self._summaries, dim=1)  # type: ignore[arg-type]

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        del self.model
        self.layers = []


def prompt_batches(
    prompts: Sequence[torch.Tensor], max_tokens: int = BATCH_TOKENS, max_prompts: int = BATCH_PROMPTS
) -> list[list[int]]:
    """Indices of ``prompts`` grouped into batches, longest first (so little padding), each holding at most
    ``max_prompts`` prompts and ``max_tokens`` padded tokens (a longer prompt runs alone)."""
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    batches: list[list[int]] = []
    for i in order:
        if batches:
            batch = batches[-1]
            width = len(prompts[batch[0]])  # the longest, as the batch is filled longest first
            if len(batch) < max_prompts and (len(batch) + 1) * width <= max_tokens:
                batch.append(i)
                continue
        batches.append([i])
    return batches


def hidden_gates(
    probe: HiddenStateProbe,
    mode: str,
    tokenized: Sequence[tuple[list[torch.Tensor], list[torch.Tensor]]],
    *,
    max_tokens: int = BATCH_TOKENS,
    max_prompts: int = BATCH_PROMPTS,
) -> torch.Tensor:
    """``[L, E, H]`` rows from the base's activations on the prompts (``mode``: one of ``HIDDEN_MODES``).

    Every distinct prompt of every expert runs once, in padded batches (``max_prompts=1``: one at a time)."""
    site, reduce = HIDDEN_MODES[mode]
    if site != probe.site:
        raise ValueError(f"gate_mode {mode} reads {site}, the probe hooks {probe.site}")
    unique: dict[tuple[int, ...], int] = {}
    prompts: list[torch.Tensor] = []
    for positive, negative in tokenized:
        for ids in (*positive, *negative):
            key = tuple(ids.tolist())
            if key not in unique:
                unique[key] = len(prompts)
                prompts.append(ids)
    summaries: list[torch.Tensor | None] = [None] * len(prompts)
    for batch in prompt_batches(prompts, max_tokens, max_prompts):
        out = probe.summaries([prompts[i] for i in batch], reduce)
        for row, i in enumerate(batch):
            summaries[i] = out[row]

    def mean_over(group: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack([summaries[unique[tuple(ids.tolist())]] for ids in group]).mean(dim=0)  # type: ignore[misc]

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
    "BATCH_PROMPTS",
    "BATCH_TOKENS",
    "HIDDEN_MODES",
    "HiddenStateProbe",
    "cheap_embed_gates",
    "degenerate_layers",
    "hidden_gates",
    "normalize_rows",
    "prompt_batches",
    "random_gates",
    "seeded_generator",
    "tokenize_prompts",
]
