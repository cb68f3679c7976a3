"""Transferability-metric speed benchmark: every ``transfuse.select`` metric on random features, plus a
thuml-style LogME (the reference code's per-class loop, same math) for a side-by-side ratio.

    python benchmarks/select_speed.py                              # N {1000, 10000} x D {384, 1024} x C {10, 100}
    python benchmarks/select_speed.py --quick                      # N 1000, D 384, C 10: a smoke test
    python benchmarks/select_speed.py --metrics logme h_score --n 10000 --d 1024 --c 100 --json out.json

What it does, per (N, D, C) cell:

1. Draws seeded random data: features ``randn(N, D)`` (float32, as a backbone would give them) with a weak
   class signal (``+1`` on column ``y mod D``), labels uniform over C classes, and for LEEP/NCE source
   probabilities ``softmax(2 randn(N, 1000))`` (a 1000-class source head) and their argmax.
2. Times each metric in-process (``time.perf_counter`` around the call, input conversion included) and keeps
   the median of ``--repeat`` runs; a metric whose first run exceeds ``--max-seconds`` is run once.
3. Times the reference LogME (``reference_logme`` below: thuml/LogME's ``_fit_fixed_point`` algorithm in
   numpy, one class at a time) and prints ours vs reference and their ratio.

Timings are wall-clock on a possibly shared machine: the 1-minute load average before each cell is printed and
stored, and ``--threads`` fixes torch's thread count (numpy's BLAS threads follow the OMP/OPENBLAS env vars).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from transfuse import select
from transfuse.select.rank import FEATURE_METRICS, HEAD_METRICS

ALL_METRICS = [*HEAD_METRICS, *FEATURE_METRICS]
SOURCE_CLASSES = 1000


def reference_logme(f: np.ndarray, y: np.ndarray) -> float:
    """thuml/LogME's ``_fit_fixed_point`` (numpy, per-class loop, 11 fixed-point steps at most, ``D/2 log
    alpha`` with the nonzero eigenvalues only), written here for timing; not used by transfuse."""
    f = f.astype(np.float64)
    n, d = f.shape
    if n > d:  # "truncated SVD" via the D x D Gram matrix
        u_, s, vh = np.linalg.svd(f.T @ f)
        s = np.sqrt(s)
        k = int(np.sum(s > 1e-10))
        s, vh = s[:k], vh[:k]
        u = (f @ vh.T) / s[None, :]
    else:
        u, s, vh = np.linalg.svd(f, full_matrices=False)
    s = s.reshape(-1, 1)
    sigma = s**2
    evidences = []
    for c in range(int(y.max()) + 1):
        y_ = (y == c).astype(np.float64).reshape(-1, 1)
        x = u.T @ y_
        x2 = x**2
        res_x2 = (y_**2).sum() - x2.sum()
        alpha, beta = 1.0, 1.0
        for _ in range(11):
            t = alpha / beta
            gamma = (sigma / (sigma + t)).sum()
            m2 = (sigma * x2 / ((t + sigma) ** 2)).sum()
            res2 = (x2 / ((1 + sigma / t) ** 2)).sum() + res_x2
            alpha = gamma / (m2 + 1e-5)
            beta = (n - gamma) / (res2 + 1e-5)
            t_ = alpha / beta
            if abs(t_ - t) / t <= 1e-3:
                break
        evidence = (
            d / 2.0 * np.log(alpha)
            + n / 2.0 * np.log(beta)
            - 0.5 * np.sum(np.log(alpha + beta * sigma))
            - beta / 2.0 * res2
            - alpha / 2.0 * m2
            - n / 2.0 * np.log(2 * np.pi)
        )
        evidences.append(evidence / n)
    return float(np.mean(evidences))


def make_data(n: int, d: int, c: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, c, n)
    features = rng.standard_normal((n, d), dtype=np.float32)
    features[np.arange(n), labels % d] += 1.0
    logits = 2.0 * rng.standard_normal((n, SOURCE_CLASSES))
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    return dict(features=features, labels=labels, source_probs=probs, source_labels=probs.argmax(axis=1))


def call(metric: str, data: dict) -> float:
    if metric == "leep":
        return select.leep(data["source_probs"], data["labels"])
    if metric == "nce":
        return select.nce(data["source_labels"], data["labels"])
    if metric == "reference_logme":
        return reference_logme(data["features"], data["labels"])
    return getattr(select, metric)(data["features"], data["labels"])


def time_metric(metric: str, data: dict, repeat: int, max_seconds: float) -> tuple[float, float, int]:
    times, value = [], None
    for i in range(repeat):
        t0 = time.perf_counter()
        value = call(metric, data)
        times.append(time.perf_counter() - t0)
        if i == 0 and times[0] > max_seconds:
            break
    return statistics.median(times), value, len(times)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, nargs="+", default=[1000, 10000], help="numbers of samples")
    p.add_argument("--d", type=int, nargs="+", default=[384, 1024], help="feature dimensions")
    p.add_argument("--c", type=int, nargs="+", default=[10, 100], help="numbers of classes")
    p.add_argument("--metrics", nargs="+", default=ALL_METRICS, choices=ALL_METRICS)
    p.add_argument("--no-reference", action="store_true", help="skip the thuml-style reference LogME")
    p.add_argument("--repeat", type=int, default=3, help="runs per metric and cell (median is reported)")
    p.add_argument("--max-seconds", type=float, default=10.0, help="run once if the first run is slower")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="N 1000, D 384, C 10, one repeat")
    p.add_argument("--json", type=str, default=None, help="write the results here")
    args = p.parse_args(argv)
    if args.quick:
        args.n, args.d, args.c, args.repeat = [1000], [384], [10], 1
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    env = dict(
        python=platform.python_version(),
        torch=torch.__version__,
        numpy=np.__version__,
        torch_threads=torch.get_num_threads(),
        cpu_count=os.cpu_count(),
        machine=platform.machine(),
        processor=platform.processor(),
    )
    print(f"[env] {json.dumps(env)}", flush=True)
    metrics = list(args.metrics)
    if not args.no_reference and "logme" in metrics:
        metrics.append("reference_logme")
    rows = []
    for n in args.n:
        for d in args.d:
            for c in args.c:
                data = make_data(n, d, c, args.seed)
                load = os.getloadavg()[0]
                row = dict(n=n, d=d, c=c, load_1min=round(load, 2), seconds={}, values={}, runs={})
                for metric in metrics:
                    sec, value, runs = time_metric(metric, data, args.repeat, args.max_seconds)
                    row["seconds"][metric], row["values"][metric], row["runs"][metric] = sec, value, runs
                    print(
                        f"[run] N={n} D={d} C={c} {metric}: {sec:.3f}s ({runs} runs) = {value:.6g}",
                        flush=True,
                    )
                if "reference_logme" in row["seconds"]:
                    row["logme_speedup"] = row["seconds"]["reference_logme"] / row["seconds"]["logme"]
                rows.append(row)
    print()
    header = ["N", "D", "C", "load"] + metrics + (["ref/ours"] if "reference_logme" in metrics else [])
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        cells = [str(row["n"]), str(row["d"]), str(row["c"]), f"{row['load_1min']:.1f}"]
        cells += [f"{row['seconds'][m]:.2f}" for m in metrics]
        if "logme_speedup" in row:
            cells.append(f"{row['logme_speedup']:.1f}x")
        print("| " + " | ".join(cells) + " |")
    print("\nSeconds per call (median of the runs); ref/ours = reference LogME time / transfuse LogME time.")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(env=env, args=vars(args), rows=rows), indent=2))
        print(f"[json] {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
