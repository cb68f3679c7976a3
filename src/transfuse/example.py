"""A small built-in merge example: a tiny random BERT base (with a letter tokenizer), three "fine-tuned" experts
of it, and a TIES recipe.

Nothing is downloaded: the models are made from a ``transformers`` config with a fixed seed, so the example runs on
any machine, offline, in seconds.
"""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

EXPERTS = ("expert_sentiment", "expert_topic", "expert_language")


def write_example(folder: str | Path, *, hidden: int = 64, layers: int = 2, seed: int = 0) -> Path:
    """Write ``base/``, three expert dirs and ``recipe.yaml`` into ``folder``; return the recipe path."""
    from transformers import BertConfig, BertModel

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=1000,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=4 * hidden,
        max_position_embeddings=128,
    )
    base = BertModel(config).eval()
    base.save_pretrained(folder / "base")
    _letter_tokenizer(config.vocab_size).save_pretrained(folder / "base")  # copied into the merged model
    generator = torch.Generator().manual_seed(seed + 1)
    for i, name in enumerate(EXPERTS):
        expert = BertModel(config).eval()
        state = {k: v.clone() for k, v in base.state_dict().items()}
        for value in state.values():
            if value.is_floating_point():
                # A sparse-ish task vector: fine-tuning moves a few weights a lot and most a little.
                noise = torch.randn(value.shape, generator=generator) * 0.002
                spikes = (torch.rand(value.shape, generator=generator) < 0.05) * torch.randn(
                    value.shape, generator=generator
                )
                value.add_(noise + 0.02 * (i + 1) * spikes)
        expert.load_state_dict(state)
        expert.save_pretrained(folder / name)
    recipe = {
        "merge_method": "ties",
        "base_model": "base",
        "models": [{"model": name, "parameters": {"weight": 1.0, "density": 0.3}} for name in EXPERTS],
        "parameters": {"lambda": 1.0},
        "dtype": "float32",
    }
    path = folder / "recipe.yaml"
    path.write_text(
        "# transfuse example: TIES-merge three experts of a tiny BERT\n"
        + yaml.safe_dump(recipe, sort_keys=False)
    )
    return path


def _letter_tokenizer(vocab_size: int):
    """A WordPiece tokenizer over single letters (plus filler tokens up to ``vocab_size``), built offline."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    words = special + letters + [f"##{c}" for c in letters]
    words += [f"[unused{i}]" for i in range(vocab_size - len(words))]
    tokenizer = Tokenizer(models.WordPiece({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )
