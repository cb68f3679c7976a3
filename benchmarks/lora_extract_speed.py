"""LoRA-extraction benchmark: ``transfuse lora extract`` vs ``mergekit-extract-lora`` on the same model and rank.

    python benchmarks/lora_extract_speed.py --params 60M --rank 32 --json docs/results/lora-extract-60M.json
    python benchmarks/lora_extract_speed.py --params 0.5B --tools transfuse      # MergeKit's exact SVDs take long

What it does:

1. Builds (or reuses) merge_speed.py's random Llama-shaped bf16 base and fine-tune 1 (imported, not copied): the
   fine-tune is base + 0.002·randn, a full-rank, flat-spectrum delta (the hard case for a low-rank adapter).
   ``--delta lowrank`` adds a second fine-tune derived from that base whose Linear deltas have a decaying spectrum
   (rank-64 with singular values falling 100× + 1/10 of the noise), closer to a real fine-tune.
2. Runs each tool as a fresh subprocess through merge_speed.py's launcher (wall time from fork to reap, the child's
   own peak RSS from ``wait4``), on a warm page cache.
3. Measures every adapter the same way: PEFT's merge ``W_base + (alpha/r)·B A`` of each factored matrix, computed by
   transfuse's LoRA reader (checked against PEFT in tests/io/test_lora.py), against the fine-tune:
   ``‖W_ft − W'‖_F / ‖W_ft − W_base‖_F`` per matrix and overall (over the matrices both adapters factor).
4. Prints a markdown table and writes --json.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import merge_speed  # noqa: E402 - the builder and the launcher live there

LOWRANK = 64


def lowrank_fine_tune(base_dir: Path, noise_dir: Path, out_dir: Path) -> Path:
    """base + a decaying-spectrum delta on every Linear weight (rank 64, singular values falling 100×) + 1/10 of
    fine-tune 1's noise; other tensors are fine-tune 1's.  Same shards, index and config as the base."""
    if (out_dir / "BUILD_OK.json").exists():
        return out_dir
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    gen = torch.Generator().manual_seed(1234)
    decay = torch.logspace(0, -2, LOWRANK)
    for shard in sorted(base_dir.glob("*.safetensors")):
        tensors = {}
        with safe_open(shard, "pt") as b, safe_open(noise_dir / shard.name, "pt") as n:
            for name in b.keys():
                base, noisy = b.get_tensor(name).float(), n.get_tensor(name).float()
                if base.ndim == 2 and "embed" not in name and "lm_head" not in name:
                    m, k = base.shape
                    u = torch.randn(m, LOWRANK, generator=gen) / math.sqrt(m)
                    v = torch.randn(LOWRANK, k, generator=gen) / math.sqrt(k)
                    delta = 0.002 * math.sqrt(m * k / decay.square().sum()) * (u * decay) @ v
                    noisy = base + delta + 0.1 * (noisy - base)
                tensors[name] = noisy.to(torch.bfloat16)
        save_file(tensors, str(out_dir / shard.name), metadata={"format": "pt"})
    for extra in ("config.json", "model.safetensors.index.json"):
        if (base_dir / extra).exists():
            shutil.copy(base_dir / extra, out_dir / extra)
    (out_dir / "BUILD_OK.json").write_text("{}")
    return out_dir


def tool_command(tool: str, ft: Path, base: Path, out: Path, rank: int, svd: str) -> list[str]:
    threads = str(merge_speed.os.cpu_count() or 1)
    if tool == "transfuse":
        cmd = [merge_speed.script_path("transfuse"), "lora", "extract", str(out), "--model", str(ft)]
        return cmd + ["--base", str(base), "--rank", str(rank), "--svd", svd, "--overwrite", "--no-progress"]
    return [
        merge_speed.script_path("mergekit-extract-lora"),
        "--model", str(ft), "--base-model", str(base), "--out-path", str(out), "--max-rank", str(rank),
        "--lazy-unpickle", "--quiet", "-j", threads, "--no-copy-tokenizer",
    ]  # fmt: skip


def adapter_errors(adapter: Path, base: Path, ft: Path) -> dict[str, tuple[float, float]]:
    """tensor name -> (‖W_ft − W'‖², ‖W_ft − W_base‖²) for every matrix the adapter factors."""
    import torch

    from transfuse.io import open_checkpoint

    config = json.loads((adapter / "adapter_config.json").read_text())
    from safetensors import safe_open

    with safe_open(adapter / "adapter_model.safetensors", "pt") as fh:
        factored = sorted(
            k.removeprefix("base_model.model.").rsplit(".lora_A", 1)[0] + ".weight"
            for k in fh.keys()
            if ".lora_A" in k
        )
    out = {}
    with (
        open_checkpoint(base) as b,
        open_checkpoint(ft) as f,
        open_checkpoint(adapter, lora_base=b) as merged,
    ):
        for name in factored:
            w_base, w_ft = b.tensor(name).float(), f.tensor(name).float()
            w_new = merged.tensor(name).float()
            out[name] = (float(torch.sum((w_ft - w_new) ** 2)), float(torch.sum((w_ft - w_base) ** 2)))
    del config
    return out


def overall(errors: dict[str, tuple[float, float]], names) -> float:
    err = sum(errors[n][0] for n in names)
    tot = sum(errors[n][1] for n in names)
    return math.sqrt(err / tot) if tot else 0.0


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="60M", choices=sorted(merge_speed.CONFIGS))
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--tools", nargs="+", default=["transfuse", "transfuse-exact", "mergekit"])
    ap.add_argument("--delta", nargs="+", default=["noise", "lowrank"], choices=["noise", "lowrank"])
    ap.add_argument("--workdir", default="/tmp/transfuse-bench")
    ap.add_argument("--wait-quiet", type=float, default=20.0)
    ap.add_argument("--json", type=Path)
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    workdir = Path(args.workdir)
    root = workdir / "models" / merge_speed.cache_key(args.params)
    base, noise_ft = merge_speed.build_models(root, args.params, 1)
    fts = {"noise": noise_ft}
    if "lowrank" in args.delta:
        fts["lowrank"] = lowrank_fine_tune(base, noise_ft, root / "ft-lowrank")
    runs_dir = workdir / "lora-runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for delta in args.delta:
        ft = fts[delta]
        errors = {}
        for tool in args.tools:
            out = runs_dir / f"{tool}-{delta}"
            shutil.rmtree(out, ignore_errors=True)
            svd = "exact" if tool == "transfuse-exact" else "randomized"
            cmd = tool_command(tool.split("-")[0], ft, base, out, args.rank, svd)
            merge_speed.warm_cache([base, ft])
            merge_speed.wait_for_quiet(args.wait_quiet)
            print(f"[run] {delta} {tool}: {' '.join(cmd)}", flush=True)
            run = merge_speed.run_measured(cmd, runs_dir / f"{tool}-{delta}.log")
            if run.rc != 0:
                print(run.log[-3000:])
                raise SystemExit(f"{tool} failed with exit code {run.rc}")
            errors[tool] = adapter_errors(out, base, ft)
            size = sum(p.stat().st_size for p in out.iterdir())
            rows.append(
                {
                    "delta": delta,
                    "tool": tool,
                    "command": cmd,
                    "wall_s": run.wall_s,
                    "cpu_s": run.cpu_s,
                    "peak_rss_gb": run.peak_rss_bytes / 1e9,
                    "others_cores_during": run.others_cpu_s / run.wall_s if run.wall_s else 0.0,
                    "adapter_mb": size / 1e6,
                    "matrices": len(errors[tool]),
                }
            )
        shared = sorted(set.intersection(*(set(e) for e in errors.values())))
        for row in rows:
            if row["delta"] == delta:
                row["relative_error"] = overall(errors[row["tool"]], shared)
                row["shared_matrices"] = len(shared)
    mk = {r["delta"]: r for r in rows if r["tool"] == "mergekit"}
    print(f"\n{args.params}, rank {args.rank}\n")
    print("| delta | tool | wall s | CPU s | peak RSS GB | adapter MB | rel. error | MergeKit/this wall |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        ratio = mk[r["delta"]]["wall_s"] / r["wall_s"] if r["delta"] in mk else float("nan")
        r["mergekit_over_this"] = ratio
        print(
            f"| {r['delta']} | {r['tool']} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | {r['peak_rss_gb']:.2f} | "
            f"{r['adapter_mb']:.0f} | {r['relative_error']:.5f} | {ratio:.1f}× |"
        )
    if args.json:
        doc = {
            "params": args.params,
            "rank": args.rank,
            "environment": merge_speed.environment(_Env()),
            "runs": rows,
        }
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
    return 0


class _Env:
    device = "cpu"


if __name__ == "__main__":
    raise SystemExit(main())
