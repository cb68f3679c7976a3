"""A/B of the merge engine between two git revisions on one recipe: alternating runs, medians, one machine.

    python benchmarks/engine_ab.py --recipe /tmp/transfuse-bench/runs/ties-k2.yaml --revs HEAD~1 HEAD
    python benchmarks/engine_ab.py --recipe ... --revs HEAD~1 HEAD --all-big     # every tensor a "big" job

Each revision is checked out into a temporary git worktree; every run is a fresh process that imports that
revision's ``transfuse`` and times ``transfuse.merge`` in-process (imports excluded), writing to a temporary dir
that is deleted after the run.  The revisions alternate (A B A B ...) so that slow phases of a noisy machine hit
both.  ``--all-big`` sets ``PREFETCH_MAX_BYTES = 0``, so every tensor takes the engine's big-job path, as every
tensor of a 70B model does.  The recipe's models are made by ``benchmarks/merge_speed.py`` (it writes its
recipes to ``<workdir>/runs``).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

_CHILD = """
import shutil, sys, tempfile, time
sys.path.insert(0, sys.argv[1])
import transfuse, transfuse.engine as engine
assert transfuse.__file__.startswith(sys.argv[1]), transfuse.__file__
if sys.argv[3] == "1":
    engine.PREFETCH_MAX_BYTES = 0
from transfuse.api import merge
out = tempfile.mkdtemp(prefix="engine-ab-")
try:
    start = time.perf_counter()
    merge(sys.argv[2], out + "/merged", threads=int(sys.argv[4]), progress=False)
    print(time.perf_counter() - start)
finally:
    shutil.rmtree(out, ignore_errors=True)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", type=Path, required=True)
    ap.add_argument("--revs", nargs=2, metavar=("A", "B"), required=True, help="two git revisions")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--all-big", action="store_true", help="route every tensor through the big-job path")
    args = ap.parse_args()
    repo = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory(prefix="engine-ab-trees-") as trees:
        sources = {}
        for i, rev in enumerate(args.revs):
            tree = Path(trees) / f"rev{i}"
            subprocess.run(
                ["git", "-C", str(repo), "worktree", "add", "--detach", "-q", str(tree), rev], check=True
            )
            sources[rev] = tree / "src"
        try:
            times: dict[str, list[float]] = {rev: [] for rev in args.revs}
            for r in range(args.repeat):
                for rev in args.revs:
                    cmd = [sys.executable, "-c", _CHILD, str(sources[rev]), str(args.recipe)]
                    cmd += ["1" if args.all_big else "0", str(args.threads)]
                    seconds = float(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
                    times[rev].append(seconds)
                    print(f"run {r + 1}/{args.repeat} {rev}: {seconds:.2f} s", flush=True)
        finally:
            for tree in sources.values():
                subprocess.run(["git", "-C", str(repo), "worktree", "remove", "--force", str(tree.parent)])
    a, b = (statistics.median(times[rev]) for rev in args.revs)
    print(
        f"\nmedian {args.revs[0]}: {a:.2f} s, {args.revs[1]}: {b:.2f} s, {args.revs[0]}/{args.revs[1]} = {a / b:.2f}"
    )


if __name__ == "__main__":
    main()
