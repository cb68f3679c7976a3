"""A/B of the exact magnitude threshold (TIES/breadcrumbs top-k) between git revisions, in one process.

    python benchmarks/threshold_ab.py --revs e958e88 HEAD          # e.g. before/after a change to _thresholds.py
    python benchmarks/threshold_ab.py --revs HEAD WT               # WT = the working tree's file

Each revision's ``src/transfuse/methods/_thresholds.py`` is loaded as its own module; ``magnitude_thresholds``
then runs on the same task vector, revisions alternating, on one torch thread, and the median time per entry is
printed with the threshold each revision found (they must agree).  The task vector is what a bf16 fine-tune
gives: ``ft - base`` of a bf16 base ``randn * 0.02`` and ``ft = base + 0.002 * randn``, converted to float32
(shape 4096 x 1536 = 6.3M entries, the size of one MLP matrix of the 0.5B model of ``merge_speed.py``).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
# The threshold search's file: split out of methods/_sparsify.py (older revisions) in December 2026.
MODULES = ("src/transfuse/methods/_thresholds.py", "src/transfuse/methods/_sparsify.py")


def _source(rev: str) -> tuple[str, str]:
    for module in MODULES:
        if rev == "WT":
            if (REPO / module).is_file():
                return module, (REPO / module).read_text()
            continue
        shown = subprocess.run(
            ["git", "-C", str(REPO), "show", f"{rev}:{module}"], capture_output=True, text=True
        )
        if shown.returncode == 0:
            return module, shown.stdout
    raise SystemExit(f"revision {rev} has none of {', '.join(MODULES)}")


def load_revision(rev: str) -> types.ModuleType:
    path, source = _source(rev)
    module = types.ModuleType(f"sparsify_{rev}")
    sys.modules[module.__name__] = module  # dataclasses and typing need the module registered
    exec(compile(source, f"{rev}:{path}", "exec"), module.__dict__)
    if not hasattr(module, "Workspace"):  # since the split, the workspace lives in the chunk runtime
        from transfuse.chunks import Workspace

        module.Workspace = Workspace
    return module


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--revs", nargs="+", required=True, help="git revisions (or WT for the working tree)")
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--density", type=float, default=0.5, help="share of entries kept (k = density * n)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    base = (torch.randn(4096, 1536, generator=g) * 0.02).bfloat16()
    ft = (base.float() + 0.002 * torch.randn(4096, 1536, generator=g)).bfloat16()
    delta = ft.float() - base.float()
    n = delta.numel()
    k = max(1, int(args.density * n))
    modules = {rev: load_revision(rev) for rev in args.revs}
    times: dict[str, list[float]] = {rev: [] for rev in args.revs}
    found = {}
    for _ in range(args.repeat):
        for rev, module in modules.items():
            workspace = module.Workspace(n, delta.device)
            start = time.perf_counter()
            (threshold,), _ = module.magnitude_thresholds(delta, [k], workspace)
            times[rev].append(time.perf_counter() - start)
            found[rev] = (threshold.value, threshold.ties, threshold.ties_in_top)
    for rev in args.revs:
        median = statistics.median(times[rev])
        print(
            f"{rev}: median {median * 1e3:.1f} ms = {median / n * 1e9:.2f} ns per entry; threshold {found[rev]}"
        )
    if len(set(found.values())) != 1:
        raise SystemExit("the revisions disagree on the threshold")


if __name__ == "__main__":
    main()
