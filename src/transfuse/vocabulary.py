"""Merging models with different vocabularies: the output tokenizer, and embedding rows aligned by token.

MergeKit's ``tokenizer_source`` / ``tokenizer:`` semantics, planned before any tensor is read:

- the output vocabulary is the base's tokenizer (``base``), one model's (``<model path>``), or the **union** of
  every input's (the base's tokens first, in its order, then each model's new tokens, then their added special
  tokens), plus any token named under ``tokenizer.tokens``; tokens whose id is not below a model's config
  ``vocab_size`` (padding rows) are not part of that model's vocabulary;
- every vocabulary tensor (embeddings, LM head: rows indexed by token id) of every input is permuted into the output
  vocabulary before the merge, so row ``i`` of every input is token ``i`` of the output;
- a token one input lacks gets, in that input, a **default row**: the ``tokens:`` entry's source if one is given
  (a model's own row for that token, another token's row of a model, or zeros); else the row of the only input that
  has it; else the base's row if the base has it; else the mean of the inputs that have it; zeros if none has it
  (``force: true`` puts the default row in every input, even those that have the token);
- ``pad_to_multiple_of`` pads the rows to a multiple with the mean of the real rows.

A merge method then sees K task vectors that are zero on the rows a model lacked (the default is the same in every
input), so a token one expert added keeps that expert's row exactly.
"""

from __future__ import annotations

import json
import tempfile
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from transfuse.errors import ConfigError, RecipeError
from transfuse.io.checkpoint import Checkpoint, CheckpointBase, TensorInfo

# Name parts of the tensors whose first axis is the vocabulary.
VOCAB_NAMES = ("embed_tokens", "word_embeddings", "wte", "lm_head", "embed_out", "tok_embeddings", "shared")


def is_vocab_tensor(name: str, shape: Sequence[int]) -> bool:
    """Embedding / LM-head matrices: 2-D, a name part naming a vocabulary table (whole parts only)."""
    return len(shape) == 2 and any(part in VOCAB_NAMES for part in name.split("."))


@dataclass(frozen=True)
class TokenSource:
    """Where a token's default row comes from (``tokenizer.tokens.<token>.source``)."""

    kind: str  # "model" (that model's row for the token), "model_token" (a given token's row), "zero"
    model: str | None = None
    token: str | None = None
    token_id: int | None = None


@dataclass(frozen=True)
class TokenSetting:
    source: TokenSource | None = None
    force: bool = False


@dataclass(frozen=True)
class TokenizerSpec:
    """The recipe's tokenizer choice: ``tokenizer_source`` or the ``tokenizer:`` block."""

    source: str  # "base", "union" or a model path
    tokens: dict[str, TokenSetting] = field(default_factory=dict)
    pad_to_multiple_of: int | None = None


def parse_tokenizer_block(block: Any, resolve: Any) -> TokenizerSpec:
    """MergeKit's ``tokenizer: {source, tokens: {tok: {source, force}}, pad_to_multiple_of}``."""
    if not isinstance(block, dict):
        raise RecipeError(
            f"`tokenizer` must be a mapping with `source`, `tokens`, `pad_to_multiple_of`; got {block!r}"
        )
    extra = set(block) - {"source", "tokens", "pad_to_multiple_of"}
    if extra:
        raise RecipeError(
            f"unknown key(s) {sorted(extra)} in `tokenizer`; allowed: pad_to_multiple_of, source, tokens"
        )
    source = block.get("source", "union")
    if not isinstance(source, str) or not source:
        raise RecipeError(f"tokenizer.source must be `union`, `base` or a model path, got {source!r}")
    if source not in ("union", "base"):
        source = resolve(source, "tokenizer.source")
    pad = block.get("pad_to_multiple_of")
    if pad is not None and (isinstance(pad, bool) or not isinstance(pad, int) or pad < 1):
        raise RecipeError(f"tokenizer.pad_to_multiple_of must be a positive integer, got {pad!r}")
    tokens = {}
    raw_tokens = block.get("tokens") or {}
    if not isinstance(raw_tokens, dict):
        raise RecipeError(f"tokenizer.tokens must map token strings to settings, got {raw_tokens!r}")
    for token, setting in raw_tokens.items():
        where = f"tokenizer.tokens[{token!r}]"
        if not isinstance(token, str) or not token:
            raise RecipeError(f"{where}: a token must be a non-empty string")
        setting = setting or {}
        if not isinstance(setting, dict) or set(setting) - {"source", "force"}:
            raise RecipeError(f"{where} must be a mapping with `source` and/or `force`, got {setting!r}")
        force = setting.get("force", False)
        if not isinstance(force, bool):
            raise RecipeError(f"{where}.force must be true or false, got {force!r}")
        tokens[token] = TokenSetting(source=_token_source(setting.get("source"), where, resolve), force=force)
    return TokenizerSpec(source=source, tokens=tokens, pad_to_multiple_of=pad)


def _token_source(raw: Any, where: str, resolve: Any) -> TokenSource | None:
    if raw is None:
        return None
    if isinstance(raw, str):
        return TokenSource("model", model=resolve(raw, f"{where}.source"))
    if not isinstance(raw, dict) or raw.get("kind") not in ("model_token", "zero"):
        raise RecipeError(
            f"{where}.source must be a model path, {{kind: zero}} or {{kind: model_token, model, token | token_id}}; "
            f"got {raw!r}"
        )
    if raw["kind"] == "zero":
        if set(raw) != {"kind"}:
            raise RecipeError(f"{where}.source: `kind: zero` takes no other keys")
        return TokenSource("zero")
    if set(raw) - {"kind", "model", "token", "token_id"} or "model" not in raw:
        raise RecipeError(f"{where}.source: `kind: model_token` needs `model` and one of `token`, `token_id`")
    if ("token" in raw) == ("token_id" in raw):
        raise RecipeError(f"{where}.source: give exactly one of `token` or `token_id`")
    token_id = raw.get("token_id")
    if token_id is not None and (isinstance(token_id, bool) or not isinstance(token_id, int) or token_id < 0):
        raise RecipeError(f"{where}.source.token_id must be a non-negative integer, got {token_id!r}")
    return TokenSource("model_token", model=resolve(raw["model"], f"{where}.source.model"), token=raw.get("token"),
                       token_id=token_id)  # fmt: skip


# ------------------------------------------------------------------ the output vocabulary


@dataclass
class VocabularyPlan:
    """The output tokenizer and, per input (by key), the row of each output token in that input (-1: none)."""

    tokenizer: Any  # a transformers tokenizer, saved into the output
    vocab: dict[str, int]  # output token -> id
    rows: int  # output vocabulary rows (>= len(vocab) with padding)
    positions: dict[str, torch.Tensor]  # input key -> [len(vocab)] int64 row in that input, -1 when absent
    base_key: str | None
    settings: dict[str, TokenSetting]
    input_vocabs: dict[str, dict[str, int]]  # each input's own (stripped) vocabulary, for model_token sources

    def save_tokenizer(self) -> dict[str, bytes]:
        """The output tokenizer's files, as ``{name: bytes}``."""
        with tempfile.TemporaryDirectory() as tmp:
            self.tokenizer.save_pretrained(tmp)
            return {p.name: p.read_bytes() for p in Path(tmp).iterdir() if p.is_file()}


def _load_tokenizer(directory: Path, label: str) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(directory), use_fast=True)
    except Exception as exc:  # OSError (no files), ValueError, ... from transformers
        raise ConfigError(
            f"cannot load the tokenizer of {label} ({directory}): {str(exc).splitlines()[0][:300]}"
        ) from None


def _config_vocab_size(directory: Path) -> int | None:
    try:
        value = json.loads((directory / "config.json").read_text(encoding="utf-8")).get("vocab_size")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _usable_vocab(tokenizer: Any, vocab_size: int | None) -> dict[str, int]:
    """The tokenizer's tokens whose id has a row in the model (id < config vocab_size)."""
    vocab = tokenizer.get_vocab()
    if vocab_size is None:
        return dict(vocab)
    return {t: i for t, i in vocab.items() if i < vocab_size}


def plan_vocabulary(
    spec: TokenizerSpec,
    inputs: Mapping[str, Path],
    base_key: str | None,
    labels: Mapping[str, str],
) -> VocabularyPlan:
    """Build the output tokenizer for ``spec`` and every input's token permutation.

    ``inputs`` maps an input key to its model dir (holding tokenizer files and config.json); ``base_key`` is the
    base's key (``None`` without a base: the first input then plays its part for ``base``/``union``).
    """
    tokenizers = {key: _load_tokenizer(path, labels[key]) for key, path in inputs.items()}
    vocabs = {key: _usable_vocab(tok, _config_vocab_size(inputs[key])) for key, tok in tokenizers.items()}
    reference = base_key if base_key is not None else next(iter(inputs))
    if spec.source == "base":
        out = _copy_tokenizer(tokenizers[reference])
        _keep_only(out, vocabs[reference], labels[reference])
    elif spec.source == "union":
        out = _copy_tokenizer(tokenizers[reference])
        _keep_only(out, vocabs[reference], labels[reference])
        known = set(out.get_vocab())
        for key, tok in tokenizers.items():
            special = {
                info.content: info
                for i, info in tok.added_tokens_decoder.items()
                if i in vocabs[key].values()
            }
            plain = [t for t, _ in sorted(vocabs[key].items(), key=lambda kv: kv[1]) if t not in special]
            new = [t for t in plain if t not in known]
            if new:
                out.add_tokens(new)
                known.update(new)
            extra = [info for t, info in special.items() if t not in known]
            if extra:
                out.add_tokens(extra)
                known.update(info.content for info in extra)
    else:
        source = Path(spec.source)
        key = next((k for k, p in inputs.items() if Path(p).resolve() == source.resolve()), None)
        out = _load_tokenizer(source, spec.source)
        if key is not None:
            _keep_only(out, vocabs[key], labels[key])
        elif (vs := _config_vocab_size(source)) is not None:
            _keep_only(out, _usable_vocab(out, vs), spec.source)
    missing = [t for t in spec.tokens if t not in out.get_vocab()]
    if missing:
        out.add_tokens(missing)
    vocab = dict(out.get_vocab())
    n = len(vocab)
    if sorted(vocab.values()) != list(range(n)):
        raise ConfigError(
            f"the output tokenizer's ids are not 0..{n - 1} without gaps; cannot lay out its rows"
        )
    rows = n
    if spec.pad_to_multiple_of and rows % spec.pad_to_multiple_of:
        rows += spec.pad_to_multiple_of - rows % spec.pad_to_multiple_of
    positions = {}
    for key, own in vocabs.items():
        pos = torch.full((n,), -1, dtype=torch.int64)
        for token, new_id in vocab.items():
            old = own.get(token)
            if old is not None:
                pos[new_id] = old
        positions[key] = pos
    settings = {}
    for token, setting in spec.tokens.items():
        src = setting.source
        if src is not None and src.kind != "zero":
            key = _key_of(src.model, inputs)
            if key is None:
                raise RecipeError(
                    f"tokenizer.tokens[{token!r}].source names {src.model}, which is not an input"
                )
            if src.kind == "model_token" and src.token is not None and src.token not in vocabs[key]:
                raise RecipeError(f"tokenizer.tokens[{token!r}]: {labels[key]} has no token {src.token!r}")
            setting = replace(setting, source=replace(src, model=key))
        settings[token] = setting
    return VocabularyPlan(out, vocab, rows, positions, base_key, settings, vocabs)


def _key_of(path: str | None, inputs: Mapping[str, Path]) -> str | None:
    if path is None:
        return None
    target = Path(path).expanduser().resolve()
    return next((k for k, p in inputs.items() if Path(p).resolve() == target), None)


def _copy_tokenizer(tokenizer: Any) -> Any:
    """An independent copy (save and reload), so adding tokens never changes the input's tokenizer object."""
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        return AutoTokenizer.from_pretrained(tmp, use_fast=True)


def _keep_only(tokenizer: Any, usable: dict[str, int], label: str) -> None:
    """Refuse a tokenizer whose tokens past the model's rows cannot simply be left out (they would shift ids)."""
    unusable = len(tokenizer.get_vocab()) - len(usable)
    if unusable and max(usable.values(), default=-1) + 1 != len(usable):
        raise ConfigError(f"{label}: the tokenizer's usable token ids are not contiguous; cannot strip it")
    if unusable:
        # Tokens at ids >= vocab_size have no row; they are always the highest ids, so dropping them keeps the rest.
        tokenizer_json = json.loads(tokenizer.backend_tokenizer.to_str())
        tokenizer_json["added_tokens"] = [
            t for t in tokenizer_json.get("added_tokens", []) if t["id"] < len(usable)
        ]
        vocab = tokenizer_json.get("model", {}).get("vocab")
        if isinstance(vocab, dict):
            tokenizer_json["model"]["vocab"] = {t: i for t, i in vocab.items() if i < len(usable)}
        from tokenizers import Tokenizer

        tokenizer._tokenizer = Tokenizer.from_str(json.dumps(tokenizer_json))


# ------------------------------------------------------------------ rows aligned by token


def align_rows(plan: VocabularyPlan, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every input's vocabulary tensor (rows = its token ids) laid out in the output vocabulary (see the module
    docstring for the default rows).  ``tensors`` maps input keys to ``[rows_i, hidden]``; returns
    ``[plan.rows, hidden]`` float32 tensors."""
    keys = list(tensors)
    n = len(plan.vocab)
    hidden = next(iter(tensors.values())).shape[1:]
    present = torch.stack([(plan.positions[k] >= 0) for k in keys])  # [K, n]
    for k in keys:
        if int(plan.positions[k].max()) >= tensors[k].shape[0]:
            raise ConfigError(
                f"input {k}: its tokenizer has ids beyond its {tensors[k].shape[0]} embedding rows"
            )
    defaults: dict[int, torch.Tensor] = {}
    forced: set[int] = set()
    for token, token_id in plan.vocab.items():
        setting = plan.settings.get(token)
        count = int(present[:, token_id].sum())
        if setting is None and count == len(keys):
            continue
        if setting is not None and setting.force:
            forced.add(token_id)
        if setting is not None and setting.source is not None:
            defaults[token_id] = _row_from(plan, tensors, token, token_id, setting.source)
        elif count == 0:
            defaults[token_id] = torch.zeros(hidden)
        elif count == 1:
            donor = keys[int(present[:, token_id].float().argmax())]
            defaults[token_id] = tensors[donor][plan.positions[donor][token_id]].float()
        elif plan.base_key in tensors and plan.positions[plan.base_key][token_id] >= 0:
            base = plan.base_key
            defaults[token_id] = tensors[base][plan.positions[base][token_id]].float()
        else:
            rows = [
                tensors[k][plan.positions[k][token_id]].float()
                for k in keys
                if plan.positions[k][token_id] >= 0
            ]
            defaults[token_id] = torch.stack(rows).mean(0)
    out = {}
    for k in keys:
        pos = plan.positions[k]
        aligned = torch.zeros((plan.rows, *hidden), dtype=torch.float32)
        have = (pos >= 0).nonzero().squeeze(1)
        aligned[have] = tensors[k][pos[have]].float()
        for token_id, row in defaults.items():
            if pos[token_id] < 0 or token_id in forced:
                aligned[token_id] = row
        if plan.rows > n:
            aligned[n:] = aligned[:n].mean(0)
        out[k] = aligned
    return out


def _row_from(plan, tensors, token: str, token_id: int, source: TokenSource) -> torch.Tensor:
    hidden = next(iter(tensors.values())).shape[1:]
    if source.kind == "zero":
        return torch.zeros(hidden)
    key = source.model  # resolved to an input key by plan_vocabulary
    assert key is not None
    if source.kind == "model_token":
        row = source.token_id if source.token_id is not None else plan.input_vocabs[key][source.token]
        if not 0 <= row < tensors[key].shape[0]:
            raise ConfigError(f"tokenizer.tokens[{token!r}]: token id {row} is out of range for {key}")
        return tensors[key][row].float()
    row = int(plan.positions[key][token_id])
    if row < 0:
        raise ConfigError(f"tokenizer.tokens[{token!r}].source {key} does not have the token {token!r}")
    return tensors[key][row].float()


class AlignedVocabulary:
    """Computes, once per vocabulary tensor name, every input's aligned rows (thread-safe; one name cached)."""

    def __init__(self, plan: VocabularyPlan, checkpoints: Mapping[str, Checkpoint]) -> None:
        self.plan = plan
        self.checkpoints = dict(checkpoints)
        self._lock = threading.Lock()
        self._name: str | None = None
        self._rows: dict[str, torch.Tensor] = {}
        self._served: set[str] = set()

    def rows(self, key: str, name: str) -> torch.Tensor:
        with self._lock:
            if self._name != name:
                raw = {k: c.tensor(name) for k, c in self.checkpoints.items()}
                self._rows = align_rows(self.plan, raw)
                self._name, self._served = name, set()
            row = self._rows[key]
            self._served.add(key)
            if self._served >= set(self._rows):  # every input has its copy: free the cache
                self._name, self._rows = None, {}
            return row


class VocabularyAlignedCheckpoint(CheckpointBase):
    """A checkpoint whose vocabulary tensors are laid out in the output vocabulary (other tensors unchanged)."""

    def __init__(self, inner: Checkpoint, key: str, aligned: AlignedVocabulary) -> None:
        self.inner = inner
        self.key = key
        self.aligned = aligned
        self.source = inner.source
        self.config_dir = inner.config_dir

    def names(self) -> list[str]:
        return self.inner.names()

    def info(self, name: str) -> TensorInfo:
        info = self.inner.info(name)
        if is_vocab_tensor(name, info.shape):
            return TensorInfo(name, (self.aligned.plan.rows, *info.shape[1:]), info.dtype)
        return info

    def tensor(self, name: str) -> torch.Tensor:
        info = self.inner.info(name)
        if is_vocab_tensor(name, info.shape):
            return self.aligned.rows(self.key, name).to(info.dtype)
        return self.inner.tensor(name)

    def release(self, name: str) -> None:
        release = getattr(self.inner, "release", None)
        if release is not None:
            release(name)

    def close(self) -> None:
        """The inner checkpoint is closed by whoever opened it."""

    def __getattr__(self, attr: str) -> Any:  # adapter_config, base, ... of the wrapped reader
        if attr == "inner":
            raise AttributeError(attr)
        return getattr(self.inner, attr)
