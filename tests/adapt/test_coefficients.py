"""Coefficient layouts (task / layer / block) on BERT-, Llama- and GPT-2-style tensor names."""

from __future__ import annotations

import pytest

from transfuse.adapt import AdaptParameterError, CoefficientLayout, UnknownTaskError, block_group

BERT = [
    "embeddings.word_embeddings.weight",
    "embeddings.LayerNorm.weight",
    "encoder.layer.0.attention.self.query.weight",
    "encoder.layer.0.output.dense.weight",
    "encoder.layer.1.attention.self.query.weight",
    "encoder.layer.1.output.dense.weight",
    "encoder.layer.11.output.dense.weight",
    "pooler.dense.weight",
]
LLAMA = [
    "model.embed_tokens.weight",
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.0.mlp.down_proj.weight",
    "model.layers.1.self_attn.q_proj.weight",
    "model.layers.10.self_attn.q_proj.weight",
    "model.norm.weight",
    "lm_head.weight",
]


@pytest.mark.parametrize(
    ("name", "group"),
    [
        ("encoder.layer.3.attention.self.key.bias", "block 3"),
        ("model.layers.10.mlp.up_proj.weight", "block 10"),
        ("transformer.h.2.attn.c_attn.weight", "block 2"),
        ("h.0.mlp.c_fc.weight", "block 0"),
        ("vision.blocks.4.attn.qkv.weight", "block 4"),
        ("layer.7.weight", "block 7"),
        ("embeddings.word_embeddings.weight", "other"),
        ("model.norm.weight", "other"),
        ("layers.3", "other"),  # an index must be followed by the tensor's own name
        ("player.3.weight", "other"),  # "layer" must start a name component
        ("pooler.dense.weight", "other"),
    ],
)
def test_block_group_reads_the_first_block_index(name, group):
    assert block_group(name) == group


def test_task_granularity_has_one_coefficient_per_task():
    layout = CoefficientLayout.build({"a": BERT, "b": BERT}, "task")
    assert layout.names == ("a/all", "b/all")
    assert {layout.index("a", n) for n in BERT} == {0}
    assert {layout.index("b", n) for n in BERT} == {1}


def test_layer_granularity_has_one_coefficient_per_task_per_tensor():
    layout = CoefficientLayout.build({"a": LLAMA, "b": LLAMA[:3]}, "layer")
    assert len(layout) == len(LLAMA) + 3
    assert layout.names[0] == "a/model.embed_tokens.weight"
    assert layout.names[len(LLAMA)] == "b/model.embed_tokens.weight"
    indices = [layout.index("a", n) for n in LLAMA] + [layout.index("b", n) for n in LLAMA[:3]]
    assert indices == list(range(len(LLAMA) + 3))
    assert not layout.has("b", "lm_head.weight")
    assert layout.tensors("b") == tuple(LLAMA[:3])


def test_block_granularity_groups_tensors_by_block_and_the_rest_into_other():
    layout = CoefficientLayout.build({"a": BERT, "b": LLAMA}, "block")
    assert layout.names == (
        "a/other",
        "a/block 0",
        "a/block 1",
        "a/block 11",
        "b/other",
        "b/block 0",
        "b/block 1",
        "b/block 10",
    )
    other = layout.index("a", "pooler.dense.weight")
    assert layout.index("a", "embeddings.word_embeddings.weight") == other
    assert layout.index("a", "encoder.layer.1.attention.self.query.weight") == layout.index(
        "a", "encoder.layer.1.output.dense.weight"
    )
    assert layout.index("b", "lm_head.weight") == layout.index("b", "model.norm.weight") == 4
    assert layout.coefficient_task == ["a"] * 4 + ["b"] * 4
    assert layout.coefficient_group[3] == "block 11"


def test_values_by_task_expands_the_coefficients_to_every_tensor():
    layout = CoefficientLayout.build({"a": BERT[:3], "b": BERT[:2]}, "block")
    by_task = layout.values_by_task([0.1, 0.2, 0.3])
    assert by_task == {
        "a": {BERT[0]: 0.1, BERT[1]: 0.1, BERT[2]: 0.2},
        "b": {BERT[0]: 0.3, BERT[1]: 0.3},
    }
    with pytest.raises(AdaptParameterError, match="expected 3 coefficient values, got 2"):
        layout.values_by_task([0.1, 0.2])


def test_layout_errors_are_named():
    with pytest.raises(AdaptParameterError, match="granularity must be one of task, layer, block"):
        CoefficientLayout.build({"a": BERT}, "row")
    with pytest.raises(AdaptParameterError, match="at least one task"):
        CoefficientLayout.build({}, "task")
    layout = CoefficientLayout.build({"a": BERT}, "layer")
    with pytest.raises(UnknownTaskError, match=r"unknown task 'z'; the tasks are \['a'\]"):
        layout.index("z", BERT[0])
    with pytest.raises(UnknownTaskError, match="task 'a' has no tensor 'lm_head.weight'"):
        layout.index("a", "lm_head.weight")
    with pytest.raises(UnknownTaskError, match="unknown task"):
        layout.tensors("z")
