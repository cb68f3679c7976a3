"""Small modules and their experts for the routed-model tests."""

from __future__ import annotations

import pytest
import torch
from torch import nn


class TinyMLP(nn.Module):
    """4 -> 8 -> 3 with an integer buffer (shared, never routed)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 8)
        self.out = nn.Linear(8, 3)
        self.register_buffer("version", torch.tensor([3]))

    def forward(self, x: torch.Tensor, *, scale: float = 1.0) -> torch.Tensor:
        return self.out(torch.relu(self.inp(x))) * scale


def perturbed(state: dict, seed: int, *, frozen: tuple[str, ...] = ()) -> dict:
    """`state` with every float tensor moved by N(0, 0.1) noise, except those named in `frozen`."""
    g = torch.Generator().manual_seed(seed)
    return {
        k: v.clone()
        if (not v.is_floating_point() or k in frozen)
        else v + 0.1 * torch.randn(v.shape, generator=g, dtype=v.dtype)
        for k, v in state.items()
    }


@pytest.fixture
def mlp_experts():
    """(base state, {task: expert state}) for TinyMLP; ``out.bias`` is left unchanged by every expert."""
    torch.manual_seed(0)
    base = {k: v.clone() for k, v in TinyMLP().state_dict().items()}
    experts = {name: perturbed(base, seed, frozen=("out.bias",)) for seed, name in enumerate("abc", start=1)}
    return base, experts


def tiny_bert():
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=40,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        type_vocab_size=2,
    )
    torch.manual_seed(0)
    return BertModel(config).eval()


@pytest.fixture
def bert_experts():
    """(a fresh tiny BertModel, base state, {task: expert state})."""
    model = tiny_bert()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    experts = {name: perturbed(base, seed) for seed, name in enumerate(("sst", "nli"), start=10)}
    return tiny_bert(), base, experts
