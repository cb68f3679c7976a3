"""`transfuse statistics` on Hugging Face model dirs, statistics files, and recipes that name them."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from transfuse import merge, merge_state_dicts
from transfuse.cli import app
from transfuse.methods import MissingStatisticsError
from transfuse.statistics import StatisticsError, StatisticsSet
from transfuse.statistics.store import load_statistics

VOCAB, HIDDEN = 99, 16
TEXTS = ["the cat sat on the mat", "a dog ran far", "birds can fly high", "x", "numbers 1 2 3 and more"]


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    special = ["<unk>", "<s>", "</s>"]
    vocab = {w: i for i, w in enumerate(special + [chr(c) for c in range(32, 127)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module")
def llamas(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("stats_models")
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    base = LlamaForCausalLM(config).eval()
    paths = {}
    for name in ("base", "a", "b"):
        model = LlamaForCausalLM(config).eval()
        state = {k: v.clone() for k, v in base.state_dict().items()}
        if name != "base":
            g = torch.Generator().manual_seed(hash(name) % 1000)
            state = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in state.items()}
        model.load_state_dict(state)
        model.save_pretrained(root / name)
        _tokenizer().save_pretrained(root / name)
        paths[name] = root / name
    (root / "a.txt").write_text("\n".join(TEXTS[:3]) + "\n")
    (root / "b.txt").write_text("\n\n".join(TEXTS[2:]) + "\n")
    return root, paths


def _run(*args):
    result = CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})
    return result.exit_code, result.output


def test_cli_gram_matches_the_layer_inputs_computed_by_hand(llamas):
    from transformers import AutoModelForCausalLM

    root, paths = llamas
    out = root / "a.gram.safetensors"
    code, text = _run("statistics", paths["a"], out, "--data", root / "a.txt", "--no-progress")
    assert code == 0, text
    assert "wrote" in text
    stats = load_statistics(out)
    model = AutoModelForCausalLM.from_pretrained(paths["a"], dtype=torch.float32).eval()
    tok = _tokenizer()
    rows = []
    with torch.no_grad():
        for t in TEXTS[:3]:  # one text at a time: no padding to exclude
            ids = torch.tensor([tok(t)["input_ids"]])
            hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[0]
            rows.append(model.model.layers[0].input_layernorm(hidden)[0])
    x = torch.cat(rows)
    name = "model.layers.0.self_attn.q_proj.weight"
    torch.testing.assert_close(stats.tensors["gram"][name], x.T @ x / x.shape[0], atol=1e-5, rtol=1e-4)
    assert stats.examples == 3 and stats.tokens == x.shape[0]
    assert "lm_head.weight" in stats.tensors["gram"]


@pytest.fixture(scope="module")
def both_stats(llamas):
    root, paths = llamas
    files = {}
    for name in ("a", "b"):
        out = root / f"{name}.both.safetensors"
        code, text = _run(
            "statistics", paths[name], out, "--data", root / f"{name}.txt", "--kind", "gram", "--kind", "fisher",
            "--labels", "given", "--batch-size", "2", "--no-progress",
        )  # fmt: skip
        assert code == 0, text
        files[name] = out
    return files


@pytest.mark.parametrize("method", ["regmean", "fisher"])
def test_recipe_with_statistics_files_merges_as_merge_state_dicts(llamas, both_stats, tmp_path, method):
    from transformers import AutoModelForCausalLM

    root, paths = llamas
    recipe = {
        "merge_method": method,
        "base_model": str(paths["base"]),
        "models": [
            {"model": str(paths["a"]), "statistics": str(both_stats["a"]), "parameters": {"weight": 2.0}},
            {"model": str(paths["b"]), "statistics": str(both_stats["b"])},
        ],
        "dtype": "float32",
    }
    result = merge(recipe, tmp_path / "out", progress=False)
    written = {}
    for shard in (tmp_path / "out").glob("*.safetensors"):
        written.update(load_file(shard))
    states = [load_file(paths[n] / "model.safetensors") for n in ("base", "a", "b")]
    expected = merge_state_dicts(
        states[0], states[1:], method, statistics=[both_stats["a"], both_stats["b"]], weight=[2.0, 1.0]
    )
    assert set(written) == set(expected)
    for k in expected:
        torch.testing.assert_close(written[k], expected[k])
    assert not torch.equal(
        written["model.layers.0.mlp.up_proj.weight"], states[1]["model.layers.0.mlp.up_proj.weight"]
    )
    replay = yaml.safe_load((tmp_path / "out" / "recipe.yaml").read_text())
    assert replay["models"][0]["statistics"] == str(both_stats["a"])
    AutoModelForCausalLM.from_pretrained(tmp_path / "out")  # loads
    assert result.warnings == []


def test_given_and_sampled_lm_fisher_differ_and_a_fisher_needs_a_head(llamas, tmp_path):
    from transformers import BertConfig, BertModel

    root, paths = llamas
    code, _ = _run("statistics", paths["a"], tmp_path / "s.safetensors", "--data", root / "a.txt", "--kind",
                   "fisher", "--no-progress")  # fmt: skip
    assert code == 0
    sampled = load_statistics(tmp_path / "s.safetensors").tensors["fisher"]["lm_head.weight"]
    code, _ = _run("statistics", paths["a"], tmp_path / "g.safetensors", "--data", root / "a.txt", "--kind",
                   "fisher", "--labels", "given", "--no-progress")  # fmt: skip
    given = load_statistics(tmp_path / "g.safetensors").tensors["fisher"]["lm_head.weight"]
    assert code == 0 and not torch.allclose(sampled, given) and bool((given > 0).any())
    bert = tmp_path / "bert"
    BertModel(BertConfig(vocab_size=VOCAB, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=16)).save_pretrained(bert)  # fmt: skip
    _tokenizer().save_pretrained(bert)
    code, text = _run(
        "statistics", bert, tmp_path / "f.safetensors", "--data", root / "a.txt", "--kind", "fisher"
    )
    assert code == 2 and "no output head" in text
    code, text = _run(
        "statistics", bert, tmp_path / "gb.safetensors", "--data", root / "a.txt", "--no-progress"
    )
    assert code == 0, text


def test_statistics_cli_errors(llamas, tmp_path):
    root, paths = llamas
    cases = [
        (["--data", tmp_path / "none.txt"], "does not exist"),
        (["--data", root / "a.txt", "--kind", "hessian"], "statistic kinds must be among"),
        (["--data", root / "a.txt", "--labels", "true"], "labels must be one of"),
        (["--data", root / "a.txt", "--examples", "0"], "--examples must be >= 1"),
        (["--data", root / "a.txt", "--device", "tpu"], "use cpu, cuda"),
    ]
    for extra, message in cases:
        code, text = _run("statistics", paths["a"], tmp_path / "x.safetensors", *extra)
        assert code == 2 and message in text, (extra, text)
    code, text = _run("statistics", paths["a"], paths["a"] / "stats.safetensors", "--data", root / "a.txt")
    assert (
        code == 2 and "OutputOverlapsInputError" in text and not (paths["a"] / "stats.safetensors").exists()
    )
    (tmp_path / "exists.safetensors").write_bytes(b"x")
    code, text = _run("statistics", paths["a"], tmp_path / "exists.safetensors", "--data", root / "a.txt")
    assert code == 2 and "--overwrite" in text and (tmp_path / "exists.safetensors").read_bytes() == b"x"
    (tmp_path / "bad.jsonl").write_text('{"text": "a", "label": "x"}\n')
    code, text = _run("statistics", paths["a"], tmp_path / "y.safetensors", "--data", tmp_path / "bad.jsonl")
    assert code == 2 and "label must be a whole number" in text


def test_merge_refuses_missing_lying_and_foreign_statistics(llamas, both_stats, tmp_path):
    root, paths = llamas
    base = {"merge_method": "regmean", "base_model": str(paths["base"])}
    no_file = {**base, "models": [{"model": str(paths["a"]), "statistics": str(both_stats["a"])},
                                  {"model": str(paths["b"])}]}  # fmt: skip
    with pytest.raises(MissingStatisticsError, match=r"none given for .*b.*transfuse statistics"):
        merge(no_file, tmp_path / "o1", progress=False)
    code, text = _run("merge", _write(tmp_path / "r.yaml", no_file), tmp_path / "o2", "--dry-run")
    assert code == 2 and "MissingStatisticsError" in text
    plain = tmp_path / "plain.safetensors"
    save_file({"gram/x": torch.eye(2)}, str(plain))
    lying = tmp_path / "lying.safetensors"
    save_file({"gram/x": torch.eye(2)}, str(lying), metadata={"transfuse": json.dumps({"format": "transfuse.statistics", "version": 9})})  # fmt: skip
    foreign = tmp_path / "foreign.safetensors"
    save_file({"gram/model.layers.0.mlp.up_proj.weight": torch.eye(3), "gram_input_dim/model.layers.0.mlp.up_proj.weight": torch.tensor(1)},
              str(foreign), metadata={"transfuse": json.dumps({"format": "transfuse.statistics", "version": 1})})  # fmt: skip
    for bad, message in [
        (tmp_path / "absent.safetensors", "does not exist"),
        (plain, "no transfuse statistics header"),
        (lying, "version 9"),
        (foreign, "are in the file of"),
    ]:
        recipe = {**base, "models": [{"model": str(paths["a"]), "statistics": str(both_stats["a"])},
                                     {"model": str(paths["b"]), "statistics": str(bad)}]}  # fmt: skip
        with pytest.raises(StatisticsError, match=message):
            merge(recipe, tmp_path / "o3", progress=False)
        assert not (tmp_path / "o3").exists()
    both_foreign = {**base, "models": [{"model": str(paths["a"]), "statistics": str(foreign)},
                                       {"model": str(paths["b"]), "statistics": str(foreign)}]}  # fmt: skip
    with pytest.raises(StatisticsError, match=r"Gram matrix has shape \[3, 3\]"):
        merge(both_foreign, tmp_path / "o4", progress=False)
    ta = {"merge_method": "task_arithmetic", "base_model": str(paths["base"]),
          "models": [{"model": str(paths["a"]), "statistics": str(both_stats["a"])}]}  # fmt: skip
    assert "are not used" in merge(ta, tmp_path / "o5", progress=False).warnings[0]


def test_statistics_set_reads_lazily_in_model_order(both_stats):
    stats = StatisticsSet([both_stats["a"], both_stats["b"]])
    name = "model.layers.1.self_attn.o_proj.weight"
    got = stats[name]
    a, b = load_statistics(both_stats["a"]), load_statistics(both_stats["b"])
    torch.testing.assert_close(got["gram"][0], a.tensors["gram"][name])
    torch.testing.assert_close(got["fisher"][1], b.tensors["fisher"][name])
    assert set(stats.kinds(name)) == {"gram", "gram_input_dim", "fisher"}
    assert stats.get("nope") is None and len(stats) > 10


def _write(path, recipe):
    path.write_text(yaml.safe_dump(recipe))
    return path
