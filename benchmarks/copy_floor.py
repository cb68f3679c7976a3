"""Copy floor for the merge-speed benchmark: read every input tensor, write one output, no math.

    python benchmarks/copy_floor.py OUT_DIR BASE_DIR [MODEL_DIR ...] [--shard-size 5GB]

Streams tensor by tensor, like a merge: for each tensor name of the first input (the base), read that tensor
from every input into memory the process owns, keep the first input's tensor and drop the rest, and write the kept tensors to sharded safetensors
in OUT_DIR (plus config.json).  Its wall time is a lower bound for any tool that must read the same inputs
and write an output of the same size through the same libraries.

Reading: safetensors >= 0.8 ``get_tensor`` returns a lazy view of a file mmap by default, which reads
nothing until touched; so by default this opens files with ``backend="pread"`` (each tensor's bytes are
read with pread(2) into an owned buffer, exactly once).  ``--read mmap-clone`` instead takes the mmap view
and ``.clone()``s it (one memcpy out of the page cache); older safetensors without ``backend`` fall back to
that.  Run it in a fresh process, so the timing
includes the torch/safetensors imports a merge CLI also pays.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import time

import torch
from safetensors import safe_open
from safetensors.torch import save_file


def parse_size(text: str) -> int:
    match = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?)(i?B)?\s*", text, re.IGNORECASE)
    if not match:
        raise SystemExit(f"bad size {text!r} (e.g. 5GB, 500MB)")
    number, unit = float(match.group(1)), match.group(2).upper()
    base = 1024 if (match.group(3) or "").lower() == "ib" else 1000
    return int(number * base ** "_KMGT".index(unit or "_"))


def shard_files(model_dir: str) -> list[str]:
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as fh:
            weight_map = json.load(fh)["weight_map"]
        return [os.path.join(model_dir, f) for f in sorted(set(weight_map.values()))]
    single = os.path.join(model_dir, "model.safetensors")
    if os.path.exists(single):
        return [single]
    raise SystemExit(f"{model_dir}: no model.safetensors or model.safetensors.index.json")


def open_file(path: str, read: str):
    if read == "pread":
        return safe_open(path, framework="pt", device="cpu", backend="pread")
    return safe_open(path, framework="pt", device="cpu")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir")
    ap.add_argument("inputs", nargs="+", help="model dirs; the first one's tensors are written")
    ap.add_argument("--shard-size", default="5GB")
    ap.add_argument("--read", choices=["pread", "mmap-clone"], default="pread", help="how tensors are read")
    args = ap.parse_args()
    t0 = time.perf_counter()
    shard_limit = parse_size(args.shard_size)

    clone = args.read == "mmap-clone"
    if not clone:
        try:
            safe_open(shard_files(args.inputs[0])[0], framework="pt", device="cpu", backend="pread")
        except TypeError:  # safetensors without backends: get_tensor already copies, or clone to be sure
            clone, args.read = True, "mmap-clone"

    # name -> open handle, for every input
    handles = []
    locations: list[dict[str, object]] = []
    for model_dir in args.inputs:
        where: dict[str, object] = {}
        for path in shard_files(model_dir):
            handle = open_file(path, args.read)
            handles.append(handle)
            for name in handle.keys():
                where[name] = handle
        locations.append(where)

    os.makedirs(args.out_dir, exist_ok=True)
    names = list(locations[0])
    shard: dict[str, torch.Tensor] = {}
    shard_bytes = 0
    written: list[tuple[str, list[str]]] = []  # (temp file, names)
    total_read = 0
    total_written = 0

    def flush() -> None:
        nonlocal shard, shard_bytes
        if not shard:
            return
        tmp = os.path.join(args.out_dir, f"shard-{len(written):05d}.tmp")
        save_file(shard, tmp, metadata={"format": "pt"})
        written.append((tmp, list(shard)))
        shard, shard_bytes = {}, 0

    for name in names:
        kept = None
        for where in locations:
            tensor = where[name].get_tensor(name)  # type: ignore[attr-defined]
            if clone:
                tensor = tensor.clone()
            total_read += tensor.numel() * tensor.element_size()
            if kept is None:
                kept = tensor
            del tensor
        nbytes = kept.numel() * kept.element_size()
        if shard and shard_bytes + nbytes > shard_limit:
            flush()
        shard[name] = kept
        shard_bytes += nbytes
        total_written += nbytes
    flush()

    weight_map = {}
    count = len(written)
    for i, (tmp, shard_names) in enumerate(written):
        final = "model.safetensors" if count == 1 else f"model-{i + 1:05d}-of-{count:05d}.safetensors"
        os.replace(tmp, os.path.join(args.out_dir, final))
        weight_map.update({n: final for n in shard_names})
    if count > 1:
        with open(os.path.join(args.out_dir, "model.safetensors.index.json"), "w") as fh:
            json.dump({"metadata": {"total_size": total_written}, "weight_map": weight_map}, fh, indent=2)
    config = os.path.join(args.inputs[0], "config.json")
    if os.path.exists(config):
        shutil.copy(config, os.path.join(args.out_dir, "config.json"))
    print(
        json.dumps(
            {
                "tensors": len(names),
                "inputs": len(args.inputs),
                "bytes_read": total_read,
                "bytes_written": total_written,
                "shards": count,
                "read": args.read,
                "seconds_in_process": round(time.perf_counter() - t0, 3),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
