"""Merging models with different vocabularies (tokenizer_source union / a model, the tokenizer: block) and
chat templates, against MergeKit 0.1.5 and by hand."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

import transfuse
from transfuse.errors import RecipeError
from transfuse.recipe import Recipe

mergekit = pytest.importorskip("mergekit")

WORDS = [f"w{i}" for i in range(40)]
SPECIALS = ["<unk>", "<s>", "</s>"]


def _tokenizer(words):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate([*SPECIALS, *words])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny Llama base (43 tokens) and two fine-tunes that each learned new tokens (one token shared)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("vocab")
    vocabularies = {
        "base": WORDS,
        "ft0": [*WORDS, "alpha", "shared"],
        "ft1": [*WORDS, "shared", "beta", "gamma"],
    }
    torch.manual_seed(0)
    base = None
    for name, words in vocabularies.items():
        tok = _tokenizer(words)
        config = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                             num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)  # fmt: skip
        model = LlamaForCausalLM(config)
        if base is not None:
            state = {k: v.clone() for k, v in base.state_dict().items()}
            for k, v in state.items():
                if v.shape[0] == len(SPECIALS) + len(WORDS) and k.endswith(
                    ("embed_tokens.weight", "lm_head.weight")
                ):
                    grown = torch.randn(len(tok), v.shape[1]) * 0.02
                    grown[: v.shape[0]] = v
                    state[k] = grown
            state = {k: v + 0.01 * torch.randn_like(v) for k, v in state.items()}
            model.load_state_dict(state)
        else:
            base = model
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    return root


def _tensors(folder):
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _run_both(root, recipe: dict, tmp_path):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    recipe = json.loads(json.dumps(recipe))
    recipe.setdefault("dtype", "float32")
    if "base_model" in recipe:
        recipe["base_model"] = str(root / recipe["base_model"])
    recipe["models"] = [{**m, "model": str(root / m["model"])} for m in recipe["models"]]
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    run_merge(
        MergeConfiguration.model_validate(yaml.safe_load(path.read_text())),
        str(tmp_path / "mk"),
        options=MergeOptions(copy_tokenizer=True, write_model_card=False, quiet=True),
    )
    transfuse.merge(path, tmp_path / "tf", progress=False)
    return _tensors(tmp_path / "mk"), _tensors(tmp_path / "tf")


def _vocab(folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder).get_vocab()


def _assert_same_by_token(mk, tf, mk_dir, tf_dir, *, same_rows: bool = True):
    """Same tensors, vocabulary rows compared token by token: MergeKit orders a union's new tokens by iterating
    a set of models, which changes from process to process (string hashing), so only the token -> row map is
    defined."""
    mk_vocab, tf_vocab = _vocab(mk_dir), _vocab(tf_dir)
    assert mk_vocab.keys() == tf_vocab.keys()
    assert set(mk) == set(tf)
    for name in mk:
        assert mk[name].shape == tf[name].shape, name
        if name.endswith(("embed_tokens.weight", "lm_head.weight")):
            for token, i in tf_vocab.items():
                assert torch.allclose(mk[name][mk_vocab[token]], tf[name][i], atol=1e-6, rtol=0), (
                    name,
                    token,
                )
            if same_rows:  # padding rows: the mean of the real ones
                n = len(tf_vocab)
                assert torch.allclose(mk[name][n:], tf[name][n:], atol=1e-6, rtol=0), name
        else:
            assert torch.allclose(mk[name], tf[name], atol=1e-6, rtol=0), name


MODELS = [{"model": "ft0", "parameters": {"weight": 0.6}}, {"model": "ft1", "parameters": {"weight": 0.4}}]


@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "ties"])
def test_union_vocabulary_matches_mergekit(models, tmp_path, method):
    recipe = {"merge_method": method, "base_model": "base", "models": MODELS, "tokenizer_source": "union"}
    if method == "ties":
        recipe["parameters"] = {"density": 0.5}
    if method == "linear":  # no base: the first model's tokenizer leads the union
        del recipe["base_model"]
    mk, tf = _run_both(models, recipe, tmp_path)
    _assert_same_by_token(mk, tf, tmp_path / "mk", tmp_path / "tf")
    config = json.loads((tmp_path / "tf" / "config.json").read_text())
    assert config["vocab_size"] == len(_vocab(tmp_path / "tf")) == 43 + 4


def test_union_rows_by_hand(models, tmp_path):
    """Each token's row: its own in every model that has it; for the others the only owner's, or the mean."""
    recipe = {"merge_method": "linear", "base_model": str(models / "base"),
              "models": [str(models / "ft0"), str(models / "ft1")], "tokenizer_source": "union", "dtype": "float32"}  # fmt: skip
    transfuse.merge(recipe, tmp_path / "out", progress=False)
    out = _tensors(tmp_path / "out")["model.embed_tokens.weight"]
    vocab = _vocab(tmp_path / "out")
    e0 = _tensors(models / "ft0")["model.embed_tokens.weight"]
    e1 = _tensors(models / "ft1")["model.embed_tokens.weight"]
    v0, v1 = _vocab(models / "ft0"), _vocab(models / "ft1")
    assert torch.allclose(out[vocab["w7"]], (e0[v0["w7"]] + e1[v1["w7"]]) / 2, atol=1e-6)  # everyone has it
    assert torch.equal(out[vocab["alpha"]], e0[v0["alpha"]])  # only ft0 has it: linear of two equal rows
    assert torch.equal(out[vocab["gamma"]], e1[v1["gamma"]])
    assert torch.allclose(out[vocab["shared"]], (e0[v0["shared"]] + e1[v1["shared"]]) / 2, atol=1e-6)


def test_tokenizer_block_with_forced_and_sourced_tokens_and_padding_matches_mergekit(models, tmp_path):
    recipe = {
        "merge_method": "task_arithmetic",
        "base_model": "base",
        "models": MODELS,
        "tokenizer": {
            "source": "union",
            "tokens": {
                "alpha": {"source": str(models / "ft0"), "force": True},
                "w3": {"source": {"kind": "zero"}, "force": True},
                "delta": {"source": {"kind": "model_token", "model": str(models / "ft1"), "token": "beta"}},
            },
            "pad_to_multiple_of": 8,
        },
    }
    mk, tf = _run_both(models, recipe, tmp_path)
    _assert_same_by_token(mk, tf, tmp_path / "mk", tmp_path / "tf")
    rows = tf["model.embed_tokens.weight"]
    vocab = _vocab(tmp_path / "tf")
    assert rows.shape[0] % 8 == 0 and rows.shape[0] >= len(vocab)
    assert torch.count_nonzero(rows[vocab["w3"]]) == 0


def test_a_models_tokenizer_as_the_output_vocabulary(models, tmp_path):
    recipe = {"merge_method": "task_arithmetic", "base_model": "base", "models": MODELS,
              "tokenizer_source": "ft1"}  # fmt: skip
    recipe_ft1 = {**recipe, "tokenizer_source": str(models / "ft1")}
    mk, tf = _run_both(models, recipe_ft1, tmp_path)
    _assert_same_by_token(mk, tf, tmp_path / "mk", tmp_path / "tf")
    assert _vocab(tmp_path / "tf") == _vocab(models / "ft1")


def test_chat_template_named_auto_and_jinja(models, tmp_path):
    from transformers import AutoTokenizer

    base = {"merge_method": "linear", "base_model": str(models / "base"), "models": [str(models / "ft0")],
            "tokenizer_source": "base"}  # fmt: skip
    transfuse.merge({**base, "chat_template": "chatml"}, tmp_path / "chatml", progress=False)
    tok = AutoTokenizer.from_pretrained(tmp_path / "chatml")
    text = tok.apply_chat_template(
        [{"role": "user", "content": "w1 w2"}], tokenize=False, add_generation_prompt=True
    )
    assert text == "<|im_start|>user\nw1 w2<|im_end|>\n<|im_start|>assistant\n"
    jinja = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{% endfor %}"
    transfuse.merge({**base, "chat_template": jinja}, tmp_path / "jinja", progress=False)
    tok = AutoTokenizer.from_pretrained(tmp_path / "jinja")
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "[user] hi"
    transfuse.merge(
        {**base, "chat_template": "auto"}, tmp_path / "auto", progress=False
    )  # none has one: none
    assert AutoTokenizer.from_pretrained(tmp_path / "auto").chat_template is None
    with pytest.raises(RecipeError, match="neither a known name"):
        transfuse.merge({**base, "chat_template": "chatmlx"}, tmp_path / "bad", progress=False)
    assert not (tmp_path / "bad").exists()


def test_tokenizer_recipe_errors(models):
    def recipe(**extra):
        return {
            "merge_method": "linear",
            "base_model": str(models / "base"),
            "models": [str(models / "ft0")],
            **extra,
        }

    with pytest.raises(RecipeError, match="not both"):
        Recipe.from_dict(recipe(tokenizer_source="union", tokenizer={"source": "union"}))
    for block, fragment in [
        ({"source": "union", "bogus": 1}, "unknown key"),
        ({"pad_to_multiple_of": 0}, "positive integer"),
        ({"tokens": {"x": {"source": {"kind": "nope"}}}}, "source must be"),
        ({"tokens": {"x": {"source": {"kind": "model_token", "model": "m"}}}}, "exactly one of"),
        ({"tokens": {"x": {"force": "yes"}}}, "true or false"),
    ]:
        with pytest.raises(RecipeError, match=fragment):
            Recipe.from_dict(recipe(tokenizer=block))
    again = Recipe.from_dict(recipe(tokenizer={"source": "union", "tokens": {"x": {"source": {"kind": "zero"}}},
                                               "pad_to_multiple_of": 8}))  # fmt: skip
    assert Recipe.from_dict(yaml.safe_load(again.to_yaml())).to_dict() == again.to_dict()
