"""RegMean++ against a hand-built block-by-block least-squares fit on the merged model's own features."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from transfuse import merge_state_dicts
from transfuse.statistics import StatisticsError, collect_gram
from transfuse.statistics.regmean_plusplus import find_blocks, regmean_plusplus


class Stack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Sequential(nn.Linear(4, 4), nn.Tanh()) for _ in range(2)])
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def _setup():
    torch.manual_seed(0)
    base = Stack()
    base_state = {k: v.detach().clone() for k, v in base.state_dict().items()}
    experts = []
    for _ in range(2):
        experts.append({k: v + 0.5 * torch.randn_like(v) for k, v in base_state.items()})
    data = [torch.randn(30, 4), torch.randn(30, 4) * 2 + 1]
    return base, base_state, experts, data


def _lstsq(inputs, experts, name):
    x = torch.cat(inputs).double()
    y = torch.cat([h.double() @ e[name].double().T for h, e in zip(inputs, experts)])
    return torch.linalg.lstsq(x, y).solution.T.float()


def test_regmean_plusplus_fits_each_block_on_the_merged_models_features():
    module, base, experts, data = _setup()
    merged = regmean_plusplus(module, base, experts, [[(x,)] for x in data], alpha=1.0)
    mean = lambda name: (experts[0][name] + experts[1][name]) / 2  # noqa: E731
    w0 = _lstsq(data, experts, "layers.0.0.weight")
    torch.testing.assert_close(merged["layers.0.0.weight"], w0, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(merged["layers.0.0.bias"], mean("layers.0.0.bias"))
    h = [torch.tanh(x @ w0.T + mean("layers.0.0.bias")) for x in data]  # the MERGED block 0's outputs
    w1 = _lstsq(h, experts, "layers.1.0.weight")
    torch.testing.assert_close(merged["layers.1.0.weight"], w1, atol=1e-4, rtol=1e-4)
    z = [torch.tanh(x @ w1.T + mean("layers.1.0.bias")) for x in h]
    torch.testing.assert_close(merged["head.weight"], _lstsq(z, experts, "head.weight"), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(merged["head.bias"], mean("head.bias"))


def test_it_differs_from_regmean_after_the_first_block_and_equals_it_on_it():
    module, base, experts, data = _setup()
    plus = regmean_plusplus(module, base, experts, [[(x,)] for x in data], alpha=0.9)
    stats = []
    for expert, x in zip(experts, data):
        m = Stack()
        m.load_state_dict(expert)
        stats.append(collect_gram(m, [(x,)]))
    plain = merge_state_dicts(base, experts, "regmean", statistics=stats, alpha=0.9)
    torch.testing.assert_close(plus["layers.0.0.weight"], plain["layers.0.0.weight"])  # same inputs there
    assert not torch.allclose(plus["layers.1.0.weight"], plain["layers.1.0.weight"], atol=1e-3)
    assert find_blocks(module) == ["layers.0", "layers.1"]


def test_regmean_plusplus_errors():
    module, base, experts, data = _setup()
    with pytest.raises(StatisticsError, match="one list of batches per expert"):
        regmean_plusplus(module, base, experts, [[(data[0],)]])
    with pytest.raises(StatisticsError, match="no submodule 'nope'"):
        regmean_plusplus(module, base, experts, [[(x,)] for x in data], blocks=["nope"])
    with pytest.raises(StatisticsError, match="no nn.ModuleList"):
        find_blocks(nn.Linear(2, 2))
    with pytest.raises(StatisticsError, match="base's tensors"):
        regmean_plusplus(module, base, [experts[0], {"x": torch.zeros(1)}], [[(x,)] for x in data])
