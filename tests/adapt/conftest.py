"""A toy multi-task problem for the AdaMerging tests: a small MLP body, one linear head per task, experts
fine-tuned from the base on linearly separable synthetic data."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch


class Body(torch.nn.Module):
    def __init__(self, d_in: int, hidden: int) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList([torch.nn.Linear(d_in, hidden), torch.nn.Linear(hidden, hidden)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


@dataclass
class Toy:
    body: Body
    base: dict[str, torch.Tensor]
    vectors: dict[str, dict[str, torch.Tensor]]
    heads: dict[str, torch.nn.Linear]
    test_x: dict[str, torch.Tensor]
    test_y: dict[str, torch.Tensor]

    def forward(self, params, task, x):
        return self.heads[task](torch.func.functional_call(self.body, dict(params), (x,)))

    def accuracy(self, params) -> float:
        with torch.no_grad():
            scores = [
                float((self.forward(params, t, self.test_x[t]).argmax(-1) == self.test_y[t]).float().mean())
                for t in self.heads
            ]
        return sum(scores) / len(scores)


def _labels(x: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    return (x @ direction > 0).long()


@pytest.fixture(autouse=True)
def _one_thread():
    """These tensors are tiny: one intra-op thread is ~10x faster than two on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def toy() -> Toy:
    """Two tasks (labels = the side of a hyperplane), experts trained 60 Adam steps each from one base."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train_toy()
    finally:
        torch.set_num_threads(threads)


def _train_toy() -> Toy:
    torch.manual_seed(0)
    d_in, hidden = 6, 12
    body = Body(d_in, hidden)
    base = {k: v.detach().clone() for k, v in body.state_dict().items()}
    directions = {"a": torch.randn(d_in), "b": torch.randn(d_in)}
    vectors, heads, test_x, test_y = {}, {}, {}, {}
    for task, direction in directions.items():
        expert = Body(d_in, hidden)
        expert.load_state_dict(base)
        head = torch.nn.Linear(hidden, 2)
        x = torch.randn(256, d_in)
        y = _labels(x, direction)
        optimizer = torch.optim.Adam([*expert.parameters(), *head.parameters()], lr=2e-2)
        for _ in range(60):
            loss = torch.nn.functional.cross_entropy(head(expert(x)), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        vectors[task] = {k: v.detach() - base[k] for k, v in expert.state_dict().items()}
        heads[task] = head.requires_grad_(False)
        test_x[task] = torch.randn(128, d_in)
        test_y[task] = _labels(test_x[task], direction)
    return Toy(body, base, vectors, heads, test_x, test_y)
