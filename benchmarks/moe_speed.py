"""MoE build benchmark: ``transfuse moe`` vs ``mergekit-moe`` on the same dense Llama experts and recipe.

    python benchmarks/moe_speed.py --json docs/results/moe-speed-100M.json      # 100M-param base + 4 experts
    python benchmarks/moe_speed.py --params 60M --gate-modes random              # quicker
    python benchmarks/moe_speed.py --tools transfuse                             # without MergeKit

What it does:

1. Builds (or reuses) merge_speed.py's random Llama-shaped bf16 base and fine-tunes 1..E (imported, not copied:
   a fine-tune is base + 0.002·randn on every tensor), under ``--workdir``, plus a character-level tokenizer in
   each model dir (the prompt gate modes need one).  ``--params 100M`` (the default) is vocab 32000, hidden 768,
   intermediate 2048, 8 layers, 12 heads, untied: 105,788,160 parameters per model; the MoE of 4 is 219.1M.
2. Writes one ``mergekit-moe`` recipe per gate mode (``dtype: bfloat16``, ``experts_per_token: 2``, three short
   prompts per expert), the same file for both tools.
3. Runs each tool as a fresh subprocess through merge_speed.py's launcher (wall time from fork to reap, start-up
   and imports included; the child's own peak RSS from ``wait4``), on a warm page cache, and checks the output
   loads as ``MixtralForCausalLM`` without missing or unexpected keys (once per tool and mode, outside the timing).
   - transfuse: ``transfuse moe R OUT --no-progress --overwrite`` (per_expert layout, gates in float32)
   - MergeKit 0.1.5: ``mergekit-moe R OUT --device cpu --out-shard-size 5B`` (fused layout, gates in bfloat16)
   Both tools' ``hidden`` compute the same rows (each layer's input at the prompt's last token) and run the
   prompts as padded batches: MergeKit one left-padded batch per expert's prompt list, in bfloat16; transfuse
   every distinct prompt in right-padded batches (one here), in float32, stopping after the last layer's input.
4. Prints a markdown table (tool, gate mode, wall s, CPU s, peak RSS GB, output GB) and writes ``--json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import merge_speed  # noqa: E402 - the model builder and the launcher live there

merge_speed.CONFIGS.setdefault(
    "100M",
    dict(
        vocab_size=32000,
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=8,
        num_attention_heads=12,
        num_key_value_heads=12,
    ),
)

PROMPTS = [
    ["add the two numbers 17 and 25", "what is the square root of 144", "solve 3x + 5 = 20 for x"],
    ["write a short poem about the sea", "a haiku on autumn leaves", "rhymes for the word light"],
    ["def fibonacci(n): return", "fix this python loop", "import numpy as np and sum an array"],
    ["translate good morning to french", "how do you say thank you in german", "spanish word for house"],
    ["summarise the plot of hamlet", "who wrote pride and prejudice", "the main themes of moby dick"],
    ["explain photosynthesis simply", "what is a black hole", "why is the sky blue"],
    ["plan a three day trip to rome", "cheap flights to tokyo", "packing list for a hike"],
    ["a recipe for pancakes", "how long to boil an egg", "vegetarian dinner ideas"],
]


def write_tokenizer(model_dir: Path) -> None:
    """A character-level tokenizer (ids < 100, inside the 32000 embedding rows), built offline."""
    if (model_dir / "tokenizer.json").exists():
        return
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>"] + [chr(c) for c in range(32, 127)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(model_dir)


def moe_recipe(base: Path, experts: list[Path], gate_mode: str) -> dict:
    return {
        "base_model": str(base),
        "gate_mode": gate_mode,
        "dtype": "bfloat16",
        "experts_per_token": 2,
        "experts": [
            {"source_model": str(e), "positive_prompts": PROMPTS[i % len(PROMPTS)]}
            for i, e in enumerate(experts)
        ],
    }


def command(tool: str, recipe_path: Path, out_dir: Path, extra: list[str]) -> list[str]:
    if tool == "transfuse":
        return [merge_speed.script_path("transfuse"), "moe", str(recipe_path), str(out_dir), "--no-progress"]
    if tool == "mergekit":
        cmd = [merge_speed.script_path("mergekit-moe"), str(recipe_path), str(out_dir)]
        return cmd + ["--device", "cpu", "--out-shard-size", "5B", *extra]
    raise SystemExit(f"unknown tool {tool!r}")


def check_loads(out_dir: Path) -> str | None:
    """None when OUT loads as MixtralForCausalLM with no missing / unexpected keys, else what is wrong."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            str(out_dir), dtype=torch.bfloat16, output_loading_info=True
        )
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        return f"does not load: {exc}"
    bad = {k: sorted(v)[:3] for k, v in info.items() if v}
    if type(model).__name__ != "MixtralForCausalLM" or bad:
        return f"{type(model).__name__}: {bad}"
    return None


def output_bytes(out_dir: Path) -> int:
    return merge_speed.model_bytes(out_dir)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", default="100M", choices=sorted(merge_speed.CONFIGS))
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--gate-modes", nargs="+", default=["random", "cheap_embed", "hidden"])
    p.add_argument("--tools", nargs="+", default=["transfuse", "mergekit"], choices=["transfuse", "mergekit"])
    p.add_argument("--repeat", type=int, default=1, help="runs per (tool, mode); the median is reported")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/transfuse-bench"))
    p.add_argument("--mergekit-flags", default="", help="extra flags for mergekit-moe, e.g. =--lazy-unpickle")
    p.add_argument("--keep", action="store_true", help="keep the outputs")
    p.add_argument("--json", type=Path)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    root = args.workdir / "models" / merge_speed.cache_key(args.params)
    dirs = merge_speed.build_models(root, args.params, args.experts)
    for d in dirs:
        write_tokenizer(d)
    base, experts = dirs[0], dirs[1 : args.experts + 1]
    runs = args.workdir / "moe-runs"
    runs.mkdir(parents=True, exist_ok=True)
    rows = []
    for mode in args.gate_modes:
        recipe_path = runs / f"moe-{mode}-e{args.experts}.yaml"
        recipe_path.write_text(json.dumps(moe_recipe(base, experts, mode), indent=2))  # JSON is YAML
        for tool in args.tools:
            out_dir = runs / f"out-{tool}-{mode}"
            results = []
            for attempt in range(args.repeat):
                shutil.rmtree(out_dir, ignore_errors=True)
                merge_speed.warm_cache(dirs)
                cmd = command(tool, recipe_path, out_dir, args.mergekit_flags.split())
                result = merge_speed.run_measured(cmd, runs / f"{tool}-{mode}-{attempt}.log")
                if result.rc != 0:
                    print(result.log[-3000:])
                    raise SystemExit(f"{tool} {mode} failed (rc {result.rc}); log in {runs}")
                results.append(result)
            problem = check_loads(out_dir)
            row = {
                "tool": tool,
                "gate_mode": mode,
                "experts": args.experts,
                "params": args.params,
                "wall_s": statistics.median(r.wall_s for r in results),
                "cpu_s": statistics.median(r.cpu_s for r in results),
                "peak_rss_gb": statistics.median(r.peak_rss_bytes for r in results) / 1e9,
                "others_cores_during": max(r.others_cpu_s / max(r.wall_s, 1e-9) for r in results),
                "output_gb": output_bytes(out_dir) / 1e9,
                "loads": problem is None,
                "problem": problem,
                "command": cmd,
                "runs": [
                    {"wall_s": r.wall_s, "cpu_s": r.cpu_s, "peak_rss_bytes": r.peak_rss_bytes}
                    for r in results
                ],
            }
            rows.append(row)
            print(
                f"{tool:9s} {mode:12s} wall {row['wall_s']:6.1f} s  cpu {row['cpu_s']:6.1f} s  "
                f"peak RSS {row['peak_rss_gb']:.2f} GB  out {row['output_gb']:.2f} GB  "
                f"{'loads' if problem is None else problem}",
                flush=True,
            )
            if not args.keep:
                shutil.rmtree(out_dir, ignore_errors=True)
    print()
    print("| tool | gate_mode | wall s | CPU s | peak RSS GB | output GB | loads as Mixtral |")
    print("|---|---|---:|---:|---:|---:|---|")
    for r in rows:
        busy = "*" if r["others_cores_during"] > merge_speed.BUSY_CORES else ""
        print(
            f"| {r['tool']} | {r['gate_mode']} | {r['wall_s']:.1f}{busy} | {r['cpu_s']:.1f} | "
            f"{r['peak_rss_gb']:.2f} | {r['output_gb']:.2f} | {'yes' if r['loads'] else r['problem']} |"
        )
    if args.json:
        import torch
        import transformers

        env = {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "cpus": os.cpu_count(),
            "params": args.params,
            "config": merge_speed.CONFIGS[args.params],
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"environment": env, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
