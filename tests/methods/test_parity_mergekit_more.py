"""End-to-end parity with MergeKit 0.1.5 for nuslerp, multislerp, karcher, sce, nearswap, arcee_fusion, ram and
ramplus_tl (and linear's inert int8_mask): the same YAML recipe through both tools, tensors compared in float32.
nuslerp, multislerp and karcher with and without a ``base_model`` (MergeKit computes each differently then).

A small harness like ``tests/test_parity_mergekit.py``'s (that file exposes no importable helpers): tiny float32
Llama checkpoints, a base and three fine-tunes.  Fine-tune 0 leaves one tensor exactly equal to the base and the
fine-tunes change a random half of the entries each (RAM's counts and SCE's sign election need overlaps and
untouched entries).
"""

from __future__ import annotations

import pytest
import torch
import yaml
from safetensors.torch import load_file

pytest.importorskip("mergekit")

from transfuse import merge  # noqa: E402
from transfuse.methods.context import MethodContext  # noqa: E402

TOL = 1e-6
NO_BASE = MethodContext(has_base=False)
FROZEN = "model.layers.0.self_attn.k_proj.weight"  # identical to the base in ft0


@pytest.fixture(scope="module")
def tiny_llamas(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("llamas_more")
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    base = LlamaForCausalLM(config)
    base.save_pretrained(root / "base")
    g = torch.Generator().manual_seed(1)
    for i in range(3):
        model = LlamaForCausalLM(config)
        state = {}
        for name, v in base.state_dict().items():
            changed = torch.rand(v.shape, generator=g) < 0.5
            state[name] = v + changed * 0.02 * (i + 1) * torch.randn(v.shape, generator=g)
        if i == 0:
            state[FROZEN] = base.state_dict()[FROZEN].clone()
        model.load_state_dict(state)
        model.save_pretrained(root / f"ft{i}")
    return root


def _tensors(folder):
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _run_both(root, recipe: dict, tmp_path):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    recipe = dict(recipe)
    if "base_model" in recipe:
        recipe["base_model"] = str(root / recipe["base_model"])
    recipe["models"] = [{**m, "model": str(root / m["model"])} for m in recipe["models"]]
    recipe.setdefault("dtype", "float32")
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    run_merge(
        MergeConfiguration.model_validate(yaml.safe_load(path.read_text())),
        str(tmp_path / "mk"),
        options=MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True),
    )
    merge(path, tmp_path / "tf", progress=False)
    return _tensors(tmp_path / "mk"), _tensors(tmp_path / "tf")


def _models(params_list):
    return [{"model": f"ft{i}", "parameters": p} for i, p in enumerate(params_list)]


def _case(method, params_list, base=True, **parameters):
    recipe = {"merge_method": method, "models": _models(params_list)}
    if base:
        recipe["base_model"] = "base"
    if parameters:
        recipe["parameters"] = parameters
    return recipe


CASES = {
    "nuslerp": _case("nuslerp", [{"weight": 0.5}, {"weight": 0.5}]),
    "nuslerp_weights": _case("nuslerp", [{"weight": 0.2}, {"weight": 0.7}]),
    "nuslerp_rows": _case("nuslerp", [{"weight": 0.6}, {"weight": 0.4}], nuslerp_flatten=False),
    "nuslerp_columns": _case(
        "nuslerp", [{"weight": 0.3}, {"weight": 0.6}], nuslerp_flatten=False, nuslerp_row_wise=True
    ),
    "nuslerp_no_base": _case("nuslerp", [{"weight": 0.5}, {"weight": 0.5}], base=False),
    "nuslerp_no_base_weights": _case("nuslerp", [{"weight": 0.2}, {"weight": 0.7}], base=False),
    "nuslerp_no_base_rows": _case(
        "nuslerp", [{"weight": 0.6}, {"weight": 0.4}], base=False, nuslerp_flatten=False
    ),
    "nuslerp_no_base_columns": _case(
        "nuslerp",
        [{"weight": 0.3}, {"weight": 0.6}],
        base=False,
        nuslerp_flatten=False,
        nuslerp_row_wise=True,
    ),
    "multislerp_no_base_k2": _case("multislerp", [{"weight": 0.3}, {"weight": 0.7}], base=False),
    "multislerp_no_base_k3": _case(
        "multislerp", [{"weight": 0.5}, {"weight": 0.3}, {"weight": 0.2}], base=False
    ),
    "multislerp_no_base_unnormalized": _case(
        "multislerp", [{"weight": 0.4}, {"weight": 0.4}, {"weight": 0.4}], base=False, normalize_weights=False
    ),
    "karcher_base_k1": _case("karcher", [{}]),
    "karcher_base_k2": _case("karcher", [{}, {}]),
    "karcher_base_k3": _case("karcher", [{}, {}, {}], max_iter=3, tol=1e-4),
    "multislerp_k2": _case("multislerp", [{"weight": 0.3}, {"weight": 0.7}]),
    "multislerp_k3": _case("multislerp", [{"weight": 0.5}, {"weight": 0.3}, {"weight": 0.2}]),
    "multislerp_unnormalized": _case(
        "multislerp", [{"weight": 0.4}, {"weight": 0.4}, {"weight": 0.4}], normalize_weights=False
    ),
    "karcher_k2": _case("karcher", [{}, {}], base=False),
    "karcher_k3": _case("karcher", [{}, {}, {}], base=False),
    "karcher_few_steps": _case("karcher", [{}, {}, {}], base=False, max_iter=2, tol=1e-4),
    "sce_k2": _case("sce", [{}, {}]),
    "sce_k3_topk": _case("sce", [{}, {}, {}], select_topk=0.3),
    "sce_int8": _case("sce", [{}, {}, {}], select_topk=0.7, int8_mask=True),
    "nearswap": _case("nearswap", [{}], t=0.01),
    "nearswap_large_t": _case("nearswap", [{}], t=0.05),
    "arcee_fusion": _case("arcee_fusion", [{}]),
    "ram_k2": _case("ram", [{}, {}]),
    "ram_k3": _case("ram", [{}, {}, {}], epsilon=0.01),
    "ramplus_tl_k2": _case("ramplus_tl", [{}, {}]),
    "ramplus_tl_k3": _case("ramplus_tl", [{}, {}, {}], r=0.5, alpha=0.8, epsilon=0.005),
    "linear_int8_mask": _case("linear", [{"weight": 0.5}, {"weight": 0.3}], base=False, int8_mask=True),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_same_tensors_as_mergekit(case, tiny_llamas, tmp_path):
    mk, tf = _run_both(tiny_llamas, CASES[case], tmp_path)
    assert set(mk) == set(tf)
    worst = max((mk[k].float() - tf[k].float()).abs().max().item() for k in mk)
    assert worst <= TOL, f"{case}: max abs difference {worst:.3g}"
    base = _tensors(tiny_llamas / "base")
    assert any(not torch.equal(base[k], tf[k]) for k in tf)  # the merge changed something


@pytest.mark.parametrize("method", ["multislerp", "karcher"])
def test_base_also_listed_under_models(method, tiny_llamas, tmp_path):
    """A base also listed under `models` is the base, not one more model (MergeKit sets it apart too)."""
    recipe = _case(method, [{"weight": 0.3}, {"weight": 0.7}])
    recipe["models"] = [{"model": "base"}, *recipe["models"]]
    mk, tf = _run_both(tiny_llamas, recipe, tmp_path)
    # MergeKit averages the points in listed order (base first here), transfuse with the base last: the
    # iterative Karcher mean then differs by float32 rounding (measured 1.03e-6).
    assert max((mk[k].float() - tf[k].float()).abs().max().item() for k in mk) <= 2 * TOL


# ---- function level: MergeKit's kernels on odd shapes (1-D, single rows/columns, 3-D) ------------------------

SHAPES = [(8, 6), (6,), (3, 4, 5), (1,), (1, 7), (7, 1)]


def _kernel(module, name):
    import importlib

    return getattr(importlib.import_module(f"mergekit.merge_methods.{module}"), name)


def _mergekit(fn, tensors, base_index, **parameters):
    from mergekit.merge_methods.base import TensorGroup

    return fn([TensorGroup.from_tensors(tensors, base_index=base_index)], parameters=parameters)[0]


def _inputs(shape, k, seed):
    g = torch.Generator().manual_seed(seed)
    base = 0.1 * torch.randn(shape, generator=g)
    fts = [
        base + 0.02 * torch.randn(shape, generator=g) * (torch.rand(shape, generator=g) < 0.6)
        for _ in range(k)
    ]
    return base, fts, torch.stack(fts) - base


def _ours(name, base, deltas, weights=None, **params):
    from transfuse.methods import get_method

    weights = torch.ones(deltas.shape[0]) if weights is None else torch.tensor(weights)
    return get_method(name).fn(base.clone(), deltas.clone(), weights, **params)


@pytest.mark.parametrize("shape", SHAPES)
def test_kernels_on_odd_shapes(shape):
    base, fts, deltas = _inputs(shape, 3, seed=len(shape) + shape[0])
    checks = []
    for row_wise, flatten in ((False, True), (False, False), (True, False)):
        p = {"nuslerp_row_wise": row_wise, "nuslerp_flatten": flatten}
        expected = _mergekit(
            _kernel("nuslerp", "nuslerp_merge_method"), [base, *fts[:2]], 0, weight=[0.3, 0.6], **p
        )
        checks.append((expected, _ours("nuslerp", base, deltas[:2], [0.3, 0.6], **p)))
        expected = _mergekit(
            _kernel("nuslerp", "nuslerp_merge_method"), fts[:2], None, weight=[0.3, 0.6], **p
        )
        ref = torch.stack(fts[:2]) - fts[0]
        checks.append((expected, _ours("nuslerp", fts[0], ref, [0.3, 0.6], ctx=NO_BASE, **p)))
    for k in (2, 3):
        w = [0.5, 0.3, 0.2][:k]
        expected = _mergekit(_kernel("multislerp", "multislerp"), [base, *fts[:k]], 0, weight=w)
        checks.append((expected, _ours("multislerp", base, deltas[:k], w, normalize_weights=True, eps=1e-8)))
        ref = torch.stack(fts[:k]) - fts[0]  # no base: the first model is the reference
        expected = _mergekit(_kernel("multislerp", "multislerp"), fts[:k], None, weight=w)
        out = _ours("multislerp", fts[0], ref, w, normalize_weights=True, eps=1e-8, ctx=NO_BASE)
        checks.append((expected, out))
        expected = _mergekit(_kernel("karcher", "karcher_merge_method"), fts[:k], None)
        checks.append((expected, _ours("karcher", fts[0], ref, max_iter=10, tol=1e-5, ctx=NO_BASE)))
        # MergeKit orders the base last
        expected = _mergekit(_kernel("karcher", "karcher_merge_method"), [*fts[:k], base], k)
        checks.append((expected, _ours("karcher", base, deltas[:k], max_iter=10, tol=1e-5)))
        for topk in (1.0, 0.4):
            expected = _mergekit(_kernel("sce", "sce_merge"), [base, *fts[:k]], 0, select_topk=topk)
            checks.append((expected, _ours("sce", base, deltas[:k], select_topk=topk)))
        expected = _mergekit(_kernel("ram", "ram_merge"), [base, *fts[:k]], 0)
        checks.append((expected, _ours("ram", base, deltas[:k], epsilon=1e-5)))
        expected = _mergekit(_kernel("ram", "ramplus_tl_merge"), [base, *fts[:k]], 0, r=0.3, alpha=0.5)
        checks.append((expected, _ours("ramplus_tl", base, deltas[:k], r=0.3, alpha=0.5, epsilon=1e-5)))
    for t in (0.0, 0.005, 0.05):
        expected = _mergekit(_kernel("nearswap", "nearswap_merge"), [base, fts[0]], 0, t=t)
        checks.append((expected, _ours("nearswap", base, deltas[:1], t=t)))
    expected = _mergekit(_kernel("arcee_fusion", "arcee_fusion_merge_method"), [base, fts[0]], 0)
    checks.append((expected, _ours("arcee_fusion", base, deltas[:1])))
    for i, (expected, out) in enumerate(checks):
        assert out.shape == expected.shape
        assert (out - expected).abs().max().item() <= TOL, i
