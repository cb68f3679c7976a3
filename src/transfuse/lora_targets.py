"""What kind of layer owns each tensor of a checkpoint, for LoRA extraction: a Linear, an input embedding, the output
embedding (LM head), a layer PEFT cannot adapt the same way (GPT-2's Conv1D, convolutions), or another module
(norms).

The kinds come from the model class that ``config.json`` names (``architectures[0]``), built on the meta device (no
memory, no weights read, no remote code).  For the decoder families of :data:`NAMED_BY_CONVENTION` (every 2-D
weight but the embeddings and ``lm_head`` is an ``nn.Linear``, with the usual names), and without a usable config,
they are read from the tensor names and shapes instead, which skips importing the model's code (~3 s of a
60M-parameter extraction's ~5 s): a 2-D ``*.weight`` is a Linear, an embedding when its module name says so
(``embed``, ``wte``, ``wpe``), the LM head when it is ``lm_head`` / ``embed_out``; a weight of more dimensions is
unsupported; 1-D tensors of other modules (norms) are "other".
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

LINEAR = "linear"
EMBEDDING = "embedding"
OUTPUT_EMBEDDING = "output_embedding"
UNSUPPORTED = "unsupported"  # a layer with a weight matrix that PEFT's Linear/Embedding LoRA does not cover
OTHER = "other"  # norms and the like: their changed tensors are saved whole (modules_to_save)

_EMBEDDING_HINTS = ("embed", "wte", "wpe")
# config.json model_type of families whose layer kinds follow from the tensor names (checked in the tests).
NAMED_BY_CONVENTION = frozenset(
    {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "olmo", "olmo2", "granite"}
)
_OUTPUT_NAMES = ("lm_head", "embed_out")


def split_name(tensor_name: str) -> tuple[str, str]:
    """``"a.b.weight"`` -> ``("a.b", "weight")``; a top-level ``"weight"`` -> ``("", "weight")``."""
    module, _, param = tensor_name.rpartition(".")
    return module, param


def module_kinds(
    config_dir: Path | None, shapes: dict[str, tuple[int, ...]]
) -> tuple[dict[str, str], str | None]:
    """Kind of each module owning one of the tensors ``shapes`` describes (name -> shape) and, when the config
    could not be used, a note why the kinds were guessed from the names."""
    from_model, why = _kinds_from_model(config_dir)
    kinds = {}
    for name in shapes:
        module = split_name(name)[0]
        if from_model is not None and module in from_model:
            kinds[module] = from_model[module]
        elif module not in kinds:
            kinds[module] = _kind_from_name(module, shapes.get(f"{module}.weight" if module else "weight"))
    return kinds, why


def task_type(config_dir: Path | None) -> str | None:
    """PEFT's ``task_type`` for the architecture (``CAUSAL_LM`` for ``*ForCausalLM``), else None."""
    arch = _architecture(config_dir)
    return "CAUSAL_LM" if arch and arch.endswith("ForCausalLM") else None


def _config(config_dir: Path | None) -> dict:
    if config_dir is None or not (config_dir / "config.json").is_file():
        return {}
    try:
        config = json.loads((config_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def _architecture(config_dir: Path | None) -> str | None:
    archs = _config(config_dir).get("architectures")
    return archs[0] if isinstance(archs, list) and archs and isinstance(archs[0], str) else None


def _kinds_from_model(config_dir: Path | None) -> tuple[dict[str, str] | None, str | None]:
    if _config(config_dir).get("model_type") in NAMED_BY_CONVENTION:
        return None, None
    return kinds_from_model_class(config_dir)


def kinds_from_model_class(config_dir: Path | None) -> tuple[dict[str, str] | None, str | None]:
    """Module name -> kind for every module of the class ``config.json`` names, built on the meta device; or None
    and why not."""
    arch = _architecture(config_dir)
    if arch is None:
        return None, "no config.json naming the architecture: layer kinds guessed from the tensor names"
    import transformers

    cls = getattr(transformers, arch, None)
    if cls is None:
        return None, f"transformers has no class {arch}: layer kinds guessed from the tensor names"
    try:
        config = transformers.AutoConfig.from_pretrained(config_dir)
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")
            model = cls(config)
    except Exception as exc:  # noqa: BLE001 - any failure to build the skeleton falls back to the names
        return None, f"cannot build {arch} from its config ({exc}): layer kinds guessed from the tensor names"
    embed_in = _get(model, "get_input_embeddings")
    embed_out = _get(model, "get_output_embeddings")
    kinds = {}
    for name, module in model.named_modules():
        if embed_out is not None and module is embed_out:
            kinds[name] = OUTPUT_EMBEDDING
        elif module is embed_in or isinstance(module, torch.nn.Embedding):
            kinds[name] = EMBEDDING
        elif isinstance(module, torch.nn.Linear):
            kinds[name] = LINEAR
        elif any(p.ndim >= 2 for p in module.parameters(recurse=False)):
            kinds[name] = UNSUPPORTED
        else:
            kinds[name] = OTHER
    return kinds, None


def _get(model: torch.nn.Module, method: str) -> torch.nn.Module | None:
    try:
        return getattr(model, method)()
    except (AttributeError, NotImplementedError):
        return None


def _kind_from_name(module: str, weight_shape: tuple[int, ...] | None) -> str:
    if weight_shape is None or len(weight_shape) < 2:
        return OTHER
    if len(weight_shape) > 2:
        return UNSUPPORTED
    leaf = module.rpartition(".")[2]
    if leaf in _OUTPUT_NAMES:
        return OUTPUT_EMBEDDING
    if any(hint in leaf for hint in _EMBEDDING_HINTS):
        return EMBEDDING
    return LINEAR
