"""WEMoE on an all-MiniLM-L6-v2-shaped BertModel (random weights, 8 synthetic experts): build time, one router
training step (8 tasks x batch 16 x length 48), and the forward time against the plain model.

    python benchmarks/wemoe_speed.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import BertConfig, BertModel

import transfuse
from transfuse.routed.store import save_routed
from transfuse.routed.wemoe import feed_forward_blocks, wemoe_merge
from transfuse.routed.wemoe_train import train_wemoe_router

TASKS = 8
BATCH = 16
LENGTH = 48


def minilm() -> BertModel:
    config = BertConfig(
        vocab_size=30522,
        hidden_size=384,
        num_hidden_layers=6,
        num_attention_heads=12,
        intermediate_size=1536,
        max_position_embeddings=512,
    )
    return BertModel(config, add_pooling_layer=True).eval()


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    plain = minilm()
    base = {k: v.clone() for k, v in plain.state_dict().items()}
    print(f"parameters: {sum(t.numel() for t in base.values()):,}; torch threads {torch.get_num_threads()}")
    g = torch.Generator().manual_seed(1)
    experts = {
        f"task{i}": {
            k: v + 0.01 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
            for k, v in base.items()
        }
        for i in range(TASKS)
    }
    start = time.perf_counter()
    model = wemoe_merge(base, experts, minilm(), feed_forward_blocks(plain)).eval()
    print(f"wemoe_merge: {time.perf_counter() - start:.2f} s")
    routed = sum(
        t.numel()
        for b in model.parts.blocks
        for j in range(len(b.param_names))
        for t in [b.task_vector(j)[0]]
    )
    print(f"routed parameters per task: {routed:,}")

    ids = {t: torch.randint(0, 30522, (BATCH, LENGTH), generator=g) for t in experts}
    mask = torch.ones(BATCH, LENGTH, dtype=torch.long)
    heads = {t: torch.nn.Linear(384, 4).requires_grad_(False) for t in experts}
    batches = {t: [ids[t]] for t in experts}

    def forward(m, task, x):
        return heads[task](m(input_ids=x, attention_mask=mask).last_hidden_state[:, 0])

    # reference: the plain model's forward + backward down to its first layer, the least a router step costs
    plain.requires_grad_(False)
    plain.embeddings.LayerNorm.weight.requires_grad_(True)

    def plain_step():
        for t in experts:
            logits = heads[t](plain(input_ids=ids[t], attention_mask=mask).last_hidden_state[:, 0])
            logits.logsumexp(-1).mean().backward()

    ref = timed(plain_step, args.repeats)
    print(
        f"plain forward+backward, {TASKS} x {BATCH} x {LENGTH}: min {min(ref):.2f} s, median {statistics.median(ref):.2f} s"
    )
    for reduce in (True, False):
        steps = timed(
            lambda r=reduce: train_wemoe_router(model, forward, batches, steps=1, batch_reduce=r),
            args.repeats,
        )
        print(
            f"one router step, {TASKS} tasks x {BATCH} x {LENGTH}, batch_reduce={reduce}: "
            f"min {min(steps):.2f} s, median {statistics.median(steps):.2f} s"
        )

    x = ids["task0"]
    with torch.no_grad():
        plain_s = timed(lambda: plain(input_ids=x, attention_mask=mask), args.repeats + 2)
        wemoe_s = timed(lambda: model(input_ids=x, attention_mask=mask), args.repeats + 2)
    print(
        f"forward {BATCH}x{LENGTH}, no grad: plain min {min(plain_s):.3f} s (median {statistics.median(plain_s):.3f}), "
        f"wemoe per example min {min(wemoe_s):.3f} s (median {statistics.median(wemoe_s):.3f}), "
        f"ratio {min(wemoe_s) / min(plain_s):.1f}x"
    )

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        directory = save_routed(model, Path(tmp) / "wemoe")
        saved = time.perf_counter() - start
        start = time.perf_counter()
        loaded = transfuse.load(directory).eval()
        print(f"save_routed {saved:.2f} s, load {time.perf_counter() - start:.2f} s")
        for f in sorted(directory.iterdir())[:4]:
            print(f"  {f.name}: {f.stat().st_size:,} bytes")
        with torch.no_grad():
            same = torch.equal(
                loaded(input_ids=x, attention_mask=mask)[0], model(input_ids=x, attention_mask=mask)[0]
            )
        print(f"loaded model's outputs bit-identical: {same}")


if __name__ == "__main__":
    main()
