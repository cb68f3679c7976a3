"""Merge-speed benchmark: transfuse vs MergeKit vs a read-everything/write-once copy floor.

    python benchmarks/merge_speed.py                      # default: 0.5B Llama, see --help for the matrix
    python benchmarks/merge_speed.py --quick              # ~60M params, K=2, smoke test
    python benchmarks/merge_speed.py --tools mergekit copy --methods ties --models 2 --json out.json

What it does:

1. Builds random Llama-shaped checkpoints (no download): a base and K "fine-tunes" (base + 0.002*randn per
   tensor), bfloat16, sharded safetensors + config.json, loadable with AutoModelForCausalLM.  They are cached
   in --workdir keyed by the config and reused.
2. Reads every input file once (like ``cat > /dev/null``) so every tool sees a warm page cache; dropping the
   cache is not possible here, so all numbers are warm-cache numbers.
3. For each K, method and tool, writes one MergeKit YAML recipe (the same file for both tools), runs the tool
   as a fresh subprocess (wall time includes interpreter start and imports, as a user sees it), measures wall
   time and the child's peak RSS (``os.wait4`` ru_maxrss; a psutil poller also checks the child spawns no
   processes of its own), checks the output's tensor names/shapes/dtype against the base, deletes it.
4. Prints a markdown table and writes --json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
BUILDER_VERSION = 1  # bump when the checkpoint layout/content changes, to invalidate caches

# Llama shapes.  Untied embeddings, MHA (kv heads = heads), head_dim = hidden / heads.
CONFIGS: dict[str, dict] = {
    "0.5B": dict(
        vocab_size=32000,
        hidden_size=1536,
        intermediate_size=4096,
        num_hidden_layers=18,
        num_attention_heads=12,
        num_key_value_heads=12,
    ),
    "60M": dict(
        vocab_size=32000,
        hidden_size=512,
        intermediate_size=1376,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=8,
    ),
}
BASE_STD = 0.02
DELTA_STD = 0.002
INPUT_SHARD_BYTES = 1_000_000_000  # inputs are written as several shards + index (0.5B bf16 ~ 1.2 GB)
BUSY_CORES = 0.25  # flag runs during which other processes used more than this many cores
OUT_SHARD = "5GB"  # transfuse --shard-size / copy floor; MergeKit: --out-shard-size 5B (parameters)

ALL_METHODS = ["linear", "task_arithmetic", "ties", "dare_ties", "breadcrumbs"]
# Layer-slice recipes (MergeKit's `slices:`), only run when named with --methods (not in the default matrix):
# `passthrough` stacks fine-tune 1's layers [0, 3L/4) on fine-tune 2's [L/4, L) (a deeper model, as SOLAR-style
# depth up-scaling does; K is always 2); `ties_slices` is TIES over two slices, [0, L/2) and [L/2, L), of the
# base and K fine-tunes with density gradients.
SLICE_METHODS = ["passthrough", "ties_slices"]
ALL_TOOLS = ["transfuse", "mergekit", "copy"]
# Default matrix, sized to stay near 20 minutes with MergeKit on 2 CPU cores: every method at K=2, and
# the sparsifying methods again at K=4.  Naming --models/--methods explicitly runs the full cross product.
DEFAULT_PLAN = [(k, m) for k in (2, 4) for m in ALL_METHODS]  # the matrix of issue #2: base+2 and base+4


# --------------------------------------------------------------------------------------------- checkpoints


def llama_config(name: str):
    from transformers import LlamaConfig

    config = LlamaConfig(
        **CONFIGS[name],
        tie_word_embeddings=False,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
    )
    config.architectures = ["LlamaForCausalLM"]
    config.dtype = "bfloat16"
    return config


def tensor_specs(config) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every saved tensor, in HF state-dict order, from a meta-device model (no memory)."""
    import torch
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    return [(name, tuple(t.shape)) for name, t in model.state_dict().items()]


def count_params(specs) -> int:
    n = 0
    for _, shape in specs:
        p = 1
        for d in shape:
            p *= d
        n += p
    return n


def cache_key(params: str) -> str:
    blob = json.dumps(
        {
            "cfg": CONFIGS[params],
            "base_std": BASE_STD,
            "delta_std": DELTA_STD,
            "shard": INPUT_SHARD_BYTES,
            "v": BUILDER_VERSION,
        },
        sort_keys=True,
    )
    return f"llama-{params}-" + hashlib.sha256(blob.encode()).hexdigest()[:10]


def seed_for(model_index: int, name: str) -> int:
    digest = hashlib.sha256(f"transfuse-bench:{model_index}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def shard_plan(specs, limit: int) -> dict[str, str]:
    """name -> shard file name, greedy in order, like HF's splitter."""
    groups: list[list[str]] = [[]]
    size = 0
    for name, shape in specs:
        nbytes = 2
        for d in shape:
            nbytes *= d
        if groups[-1] and size + nbytes > limit:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    n = len(groups)
    out = {}
    for i, group in enumerate(groups):
        fname = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        out.update({name: fname for name in group})
    return out


def build_models(root: Path, params: str, k_max: int) -> list[Path]:
    """Ensure base (index 0) and fine-tunes 1..k_max exist under root; return their dirs (base first)."""
    import torch
    from safetensors.torch import save_file

    config = llama_config(params)
    specs = tensor_specs(config)
    dirs = [root / ("base" if i == 0 else f"ft{i}") for i in range(k_max + 1)]
    missing = [i for i, d in enumerate(dirs) if not (d / "BUILD_OK.json").exists()]
    if not missing:
        return dirs
    n_params = count_params(specs)
    print(
        f"[build] {params}: {n_params:,} params; building {[dirs[i].name for i in missing]} in {root}",
        flush=True,
    )
    t0 = time.perf_counter()
    plan = shard_plan(specs, INPUT_SHARD_BYTES)
    for i in missing:
        if dirs[i].exists():
            shutil.rmtree(dirs[i])
        dirs[i].mkdir(parents=True)
    # One pass over tensors: the base tensor is generated once and each missing model gets its copy.
    buffers: dict[int, dict[str, torch.Tensor]] = {i: {} for i in missing}
    order = [name for name, _ in specs]
    shard_of = plan
    gen = torch.Generator()
    for pos, (name, shape) in enumerate(specs):
        gen.manual_seed(seed_for(0, name))
        base32 = torch.randn(shape, generator=gen, dtype=torch.float32).mul_(BASE_STD)
        if name.endswith("norm.weight"):
            base32.add_(1.0)  # RMSNorm weights sit around 1
        base = base32.to(torch.bfloat16)
        del base32
        for i in missing:
            if i == 0:
                tensor = base
            else:
                gen.manual_seed(seed_for(i, name))
                delta = torch.randn(shape, generator=gen, dtype=torch.float32).mul_(DELTA_STD)
                tensor = delta.add_(base.float()).to(torch.bfloat16)
                del delta
            buffers[i][name] = tensor
        # flush a shard when this was its last tensor
        last = pos == len(order) - 1 or shard_of[order[pos + 1]] != shard_of[name]
        if last:
            for i in missing:
                save_file(buffers[i], str(dirs[i] / shard_of[name]), metadata={"format": "pt"})
                buffers[i] = {}
    files = sorted(set(plan.values()))
    total_size = 2 * n_params
    for i in missing:
        if len(files) > 1:
            with open(dirs[i] / "model.safetensors.index.json", "w") as fh:
                json.dump({"metadata": {"total_size": total_size}, "weight_map": plan}, fh, indent=2)
        config.save_pretrained(dirs[i])
    print(f"[build] wrote {len(missing)} model(s) in {time.perf_counter() - t0:.1f}s", flush=True)
    if 0 in missing:
        verify_loads(dirs[0], specs)
    for i in missing:
        (dirs[i] / "BUILD_OK.json").write_text(
            json.dumps({"params": params, "n_params": n_params, "model_index": i, "config": CONFIGS[params]})
        )
    return dirs


def verify_loads(model_dir: Path, specs) -> None:
    """The checkpoint must load with AutoModelForCausalLM and hold exactly the tensors we wrote."""
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    state = model.state_dict()
    assert [n for n, _ in specs] == list(state), "state-dict names differ from the written tensors"
    name = specs[1][0]
    index = model_dir / "model.safetensors.index.json"
    fname = json.loads(index.read_text())["weight_map"][name] if index.exists() else "model.safetensors"
    with safe_open(str(model_dir / fname), framework="pt") as fh:
        assert torch.equal(fh.get_tensor(name), state[name]), f"{name} differs after loading"
    del model, state
    print(
        f"[build] verified: AutoModelForCausalLM loads {model_dir.name} ({time.perf_counter() - t0:.1f}s)",
        flush=True,
    )


def tensor_bytes(model_dir: Path) -> dict[str, int]:
    """name -> bytes of every tensor in a safetensors model dir (from the headers)."""
    out = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        with open(path, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        out.update(
            {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"}
        )
    return out


def model_bytes(model_dir: Path) -> int:
    """Bytes of all tensors (not headers) in a safetensors model dir."""
    return sum(tensor_bytes(model_dir).values())


def warm_cache(dirs: list[Path]) -> float:
    t0 = time.perf_counter()
    buf = bytearray(64 << 20)
    view = memoryview(buf)
    for d in dirs:
        for path in sorted(d.glob("*.safetensors")):
            with open(path, "rb", buffering=0) as fh:
                while fh.readinto(view):
                    pass
    return time.perf_counter() - t0


# ------------------------------------------------------------------------------------------------ recipes


def slice_ranges(n_layers: int) -> tuple[int, int]:
    """The frankenmerge's cut: A's layers [0, hi) + B's [lo, L), hi = ceil(3L/4), lo = L - hi (SOLAR: 24/8 of 32)."""
    hi = (3 * n_layers + 3) // 4
    return hi, n_layers - hi


def slice_recipe(method: str, base: Path, fts: list[Path], n_layers: int) -> dict:
    """One `slices:` recipe, the same YAML for both tools (see SLICE_METHODS)."""
    if method == "passthrough":
        hi, lo = slice_ranges(n_layers)
        return {
            "merge_method": "passthrough",
            "slices": [
                {"sources": [{"model": str(fts[0]), "layer_range": [0, hi]}]},
                {"sources": [{"model": str(fts[1]), "layer_range": [lo, n_layers]}]},
            ],
            "dtype": "bfloat16",
        }
    if method == "ties_slices":
        half = n_layers // 2

        def sources(a: int, b: int) -> list[dict]:
            return [{"model": str(p), "layer_range": [a, b]} for p in (base, *fts)]

        return {
            "merge_method": "ties",
            "base_model": str(base),
            "slices": [
                {"sources": sources(0, half)},
                # a slice's own parameters rank above the global ones: the gradient runs the other way here
                {"sources": sources(half, n_layers), "parameters": {"density": [0.7, 0.3]}},
            ],
            "parameters": {"weight": round(1.0 / len(fts), 4), "density": [0.3, 0.7]},
            "dtype": "bfloat16",
        }
    raise SystemExit(f"unknown slice method {method}")


def output_layers(method: str, n_layers: int) -> int:
    """Layer count of the merged model (more than the base's for the frankenmerge)."""
    if method == "passthrough":
        hi, lo = slice_ranges(n_layers)
        return hi + (n_layers - lo)
    return n_layers


def recipe(method: str, base: Path, fts: list[Path], n_layers: int | None = None) -> dict:
    if method in SLICE_METHODS:
        assert n_layers is not None
        return slice_recipe(method, base, fts, n_layers)
    k = len(fts)
    w = round(1.0 / k, 4)
    doc: dict = {"merge_method": method}
    if method == "linear":
        models = [{"model": str(p), "parameters": {"weight": 1.0}} for p in fts]
    elif method == "task_arithmetic":
        models = [{"model": str(p), "parameters": {"weight": 0.5}} for p in fts]
    elif method in ("ties", "dare_ties", "breadcrumbs"):
        models = [{"model": str(p), "parameters": {"weight": w, "density": 0.5}} for p in fts]
    else:
        raise SystemExit(f"unknown method {method}")
    if method != "linear":
        doc["base_model"] = str(base)
    doc["models"] = models
    if method == "breadcrumbs":
        doc["parameters"] = {"gamma": 0.01}
    doc["dtype"] = "bfloat16"
    return doc


def recipe_inputs(doc: dict) -> list[Path]:
    paths = [doc["base_model"]] if "base_model" in doc else []
    if "slices" in doc:
        paths += [s["model"] for sl in doc["slices"] for s in sl["sources"]]
    else:
        paths += [m["model"] for m in doc["models"]]
    return [Path(p) for p in dict.fromkeys(paths)]  # unique, in order


LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def recipe_read_bytes(doc: dict) -> int | None:
    """Bytes of the input tensors a `slices:` recipe reads (its layer ranges; the embeddings from the first slice's
    sources, final norm and head from the last slice's); None for a whole-model recipe."""
    if "slices" not in doc:
        return None
    slices = doc["slices"]
    total = 0
    for i, sl in enumerate(slices):
        for src in sl["sources"]:
            a, b = src["layer_range"]
            for name, nbytes in tensor_bytes(Path(src["model"])).items():
                m = LAYER_RE.match(name)
                if m:
                    total += nbytes if a <= int(m.group(1)) < b else 0
                elif "embed" in name:
                    total += nbytes if i == 0 else 0
                else:  # final norm, lm_head
                    total += nbytes if i == len(slices) - 1 else 0
    return total


# ------------------------------------------------------------------------------------------------ running


def script_path(name: str) -> str:
    """The console script next to this interpreter (skips pyenv shims' extra startup); else PATH."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if not found:
        raise SystemExit(f"{name} not found")
    return found


def tool_command(tool: str, recipe_path: Path, out_dir: Path, args, inputs: list[Path]) -> list[str]:
    threads = str(os.cpu_count() or 1)
    if tool == "transfuse":
        cmd = [
            script_path("transfuse"),
            "merge",
            str(recipe_path),
            str(out_dir),
            "--device",
            args.device,
            "--shard-size",
            OUT_SHARD,
            "--threads",
            threads,
            "--seed",
            "0",
            "--overwrite",
            "--no-progress",
        ]
    elif tool == "mergekit":
        cmd = [
            script_path("mergekit-yaml"),
            str(recipe_path),
            str(out_dir),
            "--lazy-unpickle",
            "--out-shard-size",
            "5B",
            "--no-copy-tokenizer",
            "--no-write-model-card",
            "--quiet",
            "--random-seed",
            "0",
            "-j",
            threads,
        ] + list(args.mergekit_flags)
        if args.device != "cpu":
            cmd += ["--device", args.device]
    elif tool == "copy":
        cmd = [
            sys.executable,
            str(HERE / "copy_floor.py"),
            str(out_dir),
            *map(str, inputs),
            "--shard-size",
            OUT_SHARD,
        ]
    else:
        raise SystemExit(f"unknown tool {tool}")
    return cmd


@dataclass
class RunResult:
    rc: int
    wall_s: float
    peak_rss_bytes: int
    max_processes: int
    max_tree_rss_bytes: int
    max_threads: int
    max_anon_bytes: int  # polled peak of RssAnon (private memory; RSS also counts mmap'd file pages)
    log: str
    load_before: float | None = None  # other processes' cores busy just before the run
    cpu_s: float = 0.0  # the tool's user+system CPU time
    others_cpu_s: float = 0.0  # CPU time the rest of the machine used meanwhile (contention)


# The tool is started by this tiny launcher, not straight from the benchmark process: Linux charges a child's
# ru_maxrss with the RSS of the process it was forked/vforked from (the image it replaced at exec), and this
# benchmark holds torch + transformers (~0.9 GB).  The launcher is a bare `python -S` (~10 MB); it forks and
# execs the tool, times it from fork to reap, and reports the tool's own wait4 rusage.
LAUNCHER = r"""
import json, os, sys, time
out, cmd = sys.argv[1], sys.argv[2:]
t0 = time.perf_counter()
pid = os.fork()
if pid == 0:
    try:
        os.execvp(cmd[0], cmd)
    finally:
        os._exit(127)
_, status, ru = os.wait4(pid, 0)
wall = time.perf_counter() - t0
code = os.waitstatus_to_exitcode(status)
with open(out, "w") as fh:
    json.dump({"wall_s": wall, "rc": code, "maxrss_kib": ru.ru_maxrss, "utime": ru.ru_utime,
               "stime": ru.ru_stime, "launcher_maxrss_kib": __import__("resource").getrusage(0).ru_maxrss}, fh)
sys.exit(code if 0 <= code < 256 else 1)
"""


def run_measured(cmd: list[str], log_path: Path) -> RunResult:
    import psutil

    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    meas_path = log_path.with_suffix(".rusage.json")
    if meas_path.exists():
        meas_path.unlink()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-S", "-c", LAUNCHER, str(meas_path), *cmd],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        stats = {"procs": 0, "tree_rss": 0, "threads": 0, "anon": 0}
        done = threading.Event()

        def poll() -> None:
            # Everything below the launcher: the tool and anything it spawns.
            try:
                launcher = psutil.Process(proc.pid)
            except psutil.Error:
                return
            while not done.is_set():
                try:
                    family = launcher.children(recursive=True)
                except psutil.Error:
                    return
                rss = threads = anon = 0
                for p in family:
                    try:
                        rss += p.memory_info().rss
                        threads += p.num_threads()
                        anon += rss_anon(p.pid)
                    except psutil.Error:
                        pass
                stats["procs"] = max(stats["procs"], len(family))
                stats["tree_rss"] = max(stats["tree_rss"], rss)
                stats["threads"] = max(stats["threads"], threads)
                stats["anon"] = max(stats["anon"], anon)
                done.wait(0.2)

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        t0 = time.perf_counter()
        busy0 = cpu_busy_seconds()
        proc.wait()
        busy1 = cpu_busy_seconds()
        outer_wall = time.perf_counter() - t0
        done.set()
        poller.join()
    try:
        meas = json.loads(meas_path.read_text())
    except (OSError, ValueError):  # the launcher itself failed
        meas = {"wall_s": outer_wall, "rc": proc.returncode, "maxrss_kib": 0}
    return RunResult(
        rc=meas["rc"],
        wall_s=meas["wall_s"],
        peak_rss_bytes=meas["maxrss_kib"] * 1024,  # Linux: KiB
        max_processes=stats["procs"],
        max_tree_rss_bytes=stats["tree_rss"],
        max_threads=stats["threads"],
        max_anon_bytes=stats["anon"],
        log=log_path.read_text(errors="replace"),
        cpu_s=meas.get("utime", 0.0) + meas.get("stime", 0.0),
        others_cpu_s=max(0.0, (busy1 - busy0) - meas.get("utime", 0.0) - meas.get("stime", 0.0)),
    )


def rss_anon(pid: int) -> int:
    """RssAnon of a process in bytes (Linux), 0 where unavailable."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def cpu_busy_seconds() -> float:
    """Machine-wide non-idle CPU seconds so far (from /proc/stat), 0 where unavailable."""
    try:
        with open("/proc/stat") as fh:
            fields = [int(x) for x in fh.readline().split()[1:]]
    except (OSError, ValueError):
        return 0.0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def wait_for_quiet(max_wait: float, threshold: float = 0.25) -> float:
    """Wait (up to max_wait s) until other processes use < threshold cores over 2 s; return that load."""
    deadline = time.monotonic() + max_wait
    while True:
        b0, t0 = cpu_busy_seconds(), time.monotonic()
        time.sleep(2.0)
        load = (cpu_busy_seconds() - b0) / (time.monotonic() - t0)
        if load < threshold or time.monotonic() >= deadline:
            return load


def check_output(out_dir: Path, base_dir: Path, n_layers: int | None = None) -> str | None:
    """None if out_dir holds the base's tensor names and shapes in bfloat16; else what is wrong.

    With ``n_layers`` (a frankenmerge's deeper model) the expected names are the base's with layers 0..n_layers-1,
    each shaped like the base's layer 0, and config.json must say ``num_hidden_layers: n_layers``."""

    def headers(d: Path) -> dict:
        out = {}
        for path in d.glob("*.safetensors"):
            with open(path, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                out.update({k: v for k, v in json.loads(fh.read(n)).items() if k != "__metadata__"})
        return out

    if not (out_dir / "config.json").exists():
        return "no config.json in output"
    got, want = headers(out_dir), headers(base_dir)
    if n_layers is not None:
        layer0 = {m.group(2): v for k, v in want.items() if (m := LAYER_RE.match(k)) and m.group(1) == "0"}
        want = {k: v for k, v in want.items() if not LAYER_RE.match(k)}
        want.update({f"model.layers.{i}.{rest}": v for i in range(n_layers) for rest, v in layer0.items()})
        config_layers = json.loads((out_dir / "config.json").read_text()).get("num_hidden_layers")
        if config_layers != n_layers:
            return f"config.json num_hidden_layers {config_layers}, want {n_layers}"
    if set(got) != set(want):
        missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
        return f"tensor names differ: missing {missing[:3]}... ({len(missing)}), extra {extra[:3]}... ({len(extra)})"
    for name, info in want.items():
        if got[name]["shape"] != info["shape"] or got[name]["dtype"] != "BF16":
            return f"{name}: got {got[name]['dtype']} {got[name]['shape']}, want BF16 {info['shape']}"
    return None


def measure_once(
    tool, method, k, cmd, out_dir, inputs, base, input_bytes, args, runs_dir, label, n_layers=None
):
    """One timed run of one cell: warm inputs, wait for quiet, run, check and delete the output."""
    if out_dir.exists():
        shutil.rmtree(out_dir)
    warm_cache(inputs)  # keep the inputs hot even if a previous run evicted something
    before = wait_for_quiet(args.wait_quiet) if args.wait_quiet > 0 else None
    print(f"[run] {tool} {method} K={k} {label}: {shlex.join(cmd)}", flush=True)
    res = run_measured(cmd, runs_dir / f"{tool}-{method}-k{k}.log")
    problem = None if res.rc != 0 else check_output(out_dir, base, n_layers)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    res.load_before = before
    status = "ok" if res.rc == 0 and problem is None else f"FAILED rc={res.rc} {problem or ''}"
    print(
        f"      {status}: {res.wall_s:.1f}s, peak RSS {res.peak_rss_bytes / 1e9:.2f} GB "
        f"(anon {res.max_anon_bytes / 1e9:.2f}), {input_bytes / res.wall_s / 1e9:.2f} GB/s in; "
        f"processes {res.max_processes}, threads {res.max_threads}; CPU {res.cpu_s:.1f}s; others used "
        f"{res.others_cpu_s / res.wall_s:.2f} cores meanwhile, {before if before is None else round(before, 2)} before",
        flush=True,
    )
    if res.rc != 0 or problem:
        print("----- output (last 4000 chars) -----\n" + res.log[-4000:] + "\n-----", flush=True)
    return res, problem


# ------------------------------------------------------------------------------------------------ report


def fmt(x, nd=2):
    return "—" if x is None else f"{x:.{nd}f}"


def markdown(rows: list[dict], summary: list[dict]) -> str:
    lines = [
        "| tool | method | K | wall s | CPU s | input GB/s | peak RSS GB | anon RSS GB | MergeKit / transfuse: wall (CPU) | transfuse / copy floor |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    by_key = {(s["method"], s["k"]): s for s in summary}
    for r in rows:
        s = by_key.get((r["method"], r["k"]), {})
        ratios = ("—", "—")
        if r["tool"] == "transfuse":
            speedup = fmt(s.get("speedup_mergekit_over_transfuse"))
            if s.get("speedup_cpu_time_mergekit_over_transfuse") is not None:
                speedup += f" ({fmt(s['speedup_cpu_time_mergekit_over_transfuse'])})"
            ratios = (speedup, fmt(s.get("transfuse_over_copy_floor")))
        if r["ok"]:
            busy = "*" if r["others_cores_during"] > BUSY_CORES else ""
            lines.append(
                f"| {r['tool']} | {r['method']} | {r['k']} | {r['wall_s']:.1f}{busy} | {r['cpu_s']:.1f} | "
                f"{r['input_gb_per_s']:.3f} | {r['peak_rss_gb']:.2f} | {r['peak_anon_rss_gb_polled']:.2f} | "
                f"{ratios[0]} | {ratios[1]} |"
            )
        else:
            lines.append(
                f"| {r['tool']} | {r['method']} | {r['k']} | FAILED (rc {r['rc']}) | — | — | — | — | — |"
            )
    if any(r.get("others_cores_during", 0) > BUSY_CORES for r in rows if r["ok"]):
        lines.append("")
        lines.append(
            f"\\* other processes used > {BUSY_CORES} CPU cores on average during this run (contention)."
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ main


def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Default plan (neither --models nor --methods given): "
        + ", ".join(f"{m} K={k}" for k, m in DEFAULT_PLAN)
        + ". Giving either runs the cross product (missing one defaults to K=2 4 / all methods).",
    )
    ap.add_argument("--params", choices=sorted(CONFIGS), default=None, help="model size (default 0.5B)")
    ap.add_argument(
        "--models",
        type=int,
        nargs="+",
        default=None,
        help="K values (fine-tuned models per merge). Default: the plan below the options",
    )
    ap.add_argument(
        "--methods",
        nargs="+",
        choices=ALL_METHODS + SLICE_METHODS,
        default=None,
        help="methods. Default: the plan below. Layer slices (not in the default plan): passthrough "
        "(fine-tune 1 layers [0, 3L/4) + fine-tune 2 [L/4, L), K=2 only), ties_slices (two slices, density gradients)",
    )
    ap.add_argument("--tools", nargs="+", choices=ALL_TOOLS, default=ALL_TOOLS)
    ap.add_argument("--workdir", default="/tmp/transfuse-bench")
    ap.add_argument("--repeat", type=int, default=1, help="runs per cell; the median wall time is reported")
    ap.add_argument("--json", dest="json_out", default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--quick", action="store_true", help="60M params, K=2, linear+ties: a ~1 minute smoke test"
    )
    ap.add_argument(
        "--mergekit-flags",
        nargs="*",
        default=["--async-write"],
        help="extra mergekit-yaml flags (default: --async-write)",
    )
    ap.add_argument(
        "--wait-quiet",
        type=float,
        default=None,
        help="before each run, wait up to this many seconds for other processes to go idle "
        "(< 0.25 cores busy); 0 = don't wait (default 45; 5 with --quick)",
    )
    ap.add_argument(
        "--retry-busy",
        type=int,
        default=None,
        help=f"rerun a run up to N times when other processes used > {BUSY_CORES} cores during it; "
        "the fastest attempt is kept (default 1; 0 with --quick)",
    )
    ap.add_argument(
        "--retry-max-s",
        type=float,
        default=90.0,
        help="only --retry-busy runs shorter than this many seconds (default 90), to bound the total time",
    )
    args = ap.parse_args(argv)
    if args.wait_quiet is None:
        args.wait_quiet = 5.0 if args.quick else 45.0
    if args.retry_busy is None:
        args.retry_busy = 0 if args.quick else 1
    if args.quick:
        args.params = args.params or "60M"
        args.models = args.models or [2]
        args.methods = args.methods or ["linear", "ties"]
    args.params = args.params or "0.5B"
    if args.models is None and args.methods is None:
        args.plan = list(DEFAULT_PLAN)
    else:
        ks = args.models or [2, 4]
        methods = args.methods or ALL_METHODS
        args.plan = [(k, m) for k in ks for m in methods if not (m == "passthrough" and k != 2)]
        if "passthrough" in methods and 2 not in ks:
            args.plan.append((2, "passthrough"))  # the frankenmerge stacks two models whatever --models says
    return args


def environment(args) -> dict:
    import torch

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "device": args.device,
        "mem_total_gb": None,
    }
    try:
        import psutil

        env["mem_total_gb"] = round(psutil.virtual_memory().total / 1e9, 1)
    except ImportError:
        pass
    try:
        with open("/proc/cpuinfo") as fh:
            env["cpu_model"] = next(
                (ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), None
            )
    except OSError:
        pass
    for pkg in ("transfuse", "mergekit", "transformers", "safetensors"):
        try:
            from importlib.metadata import version

            env[pkg] = version(pkg)
        except Exception:
            env[pkg] = None
    if args.device.startswith("cuda") and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
    return env


def main(argv=None) -> int:
    import yaml

    args = parse_args(argv)
    workdir = Path(args.workdir)
    t_start = time.perf_counter()
    env = environment(args)
    config = llama_config(args.params)
    specs = tensor_specs(config)
    n_params = count_params(specs)
    largest = max(specs, key=lambda s: s[1][0] * (s[1][1] if len(s[1]) > 1 else 1))
    print(f"[env] {json.dumps(env)}", flush=True)
    print(
        f"[model] Llama {args.params}: {CONFIGS[args.params]}; {n_params:,} parameters "
        f"({2 * n_params / 1e9:.3f} GB bf16 per model); largest tensor {largest[0]} {list(largest[1])}",
        flush=True,
    )
    k_max = max(k for k, _ in args.plan)
    dirs = build_models(workdir / "models" / cache_key(args.params), args.params, k_max)
    base, fts = dirs[0], dirs[1:]
    sizes = {d: model_bytes(d) for d in dirs}

    warm_s = warm_cache(dirs)
    print(
        f"[cache] warm-up read of all {len(dirs)} input models: {warm_s:.1f}s (every tool runs on a warm page cache)",
        flush=True,
    )

    runs_dir = workdir / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    commands: dict[str, str] = {}
    copy_memo: dict[tuple, dict] = {}
    for k, method in args.plan:
        n_layers = CONFIGS[args.params]["num_hidden_layers"]
        doc = recipe(method, base, fts[:k], n_layers)
        inputs = recipe_inputs(doc)
        read_bytes = recipe_read_bytes(doc)  # a slice recipe reads only its layer ranges
        input_bytes = read_bytes if read_bytes is not None else sum(sizes[p] for p in inputs)
        out_layers = output_layers(method, n_layers)
        recipe_path = runs_dir / f"{method}-k{k}.yaml"
        recipe_path.write_text(yaml.safe_dump(doc, sort_keys=False))
        for tool in args.tools:
            if tool == "copy" and method == "passthrough":
                # copy_floor.py writes the first input's tensors: not the frankenmerge's deeper output
                print("[run] copy floor skipped for passthrough (its output has more layers)", flush=True)
                continue
            memo_key = (tool, tuple(inputs))
            if tool == "copy" and memo_key in copy_memo:
                # Same inputs as an earlier cell (the copy floor does no method-specific work): reuse.
                row = dict(copy_memo[memo_key], method=method, k=k, reused=True)
                rows.append(row)
                continue
            out_dir = runs_dir / f"out-{tool}-{method}-k{k}"
            walls, results = [], []
            cmd = tool_command(tool, recipe_path, out_dir, args, inputs)
            commands.setdefault(tool, shlex.join(cmd))
            retried = 0
            for rep in range(args.repeat):
                best = None
                for attempt in range(1 + max(0, args.retry_busy)):
                    res, problem = measure_once(
                        tool,
                        method,
                        k,
                        cmd,
                        out_dir,
                        inputs,
                        base,
                        input_bytes,
                        args,
                        runs_dir,
                        f"({rep + 1}/{args.repeat})" + (" retry" if attempt else ""),
                        None if out_layers == n_layers else out_layers,
                    )
                    if best is None or (res.rc == 0 and res.wall_s < best[0].wall_s):
                        best = (res, problem)  # of the attempts, the fastest = the least disturbed
                    if res.rc != 0 or problem or res.others_cpu_s / res.wall_s <= BUSY_CORES:
                        break
                    if res.wall_s > args.retry_max_s:
                        break  # too long to repeat within the time budget; it stays marked as contended
                    if attempt < args.retry_busy:
                        retried += 1
                        print("      contended: running it again (--retry-busy)", flush=True)
                results.append(best)
                walls.append(best[0].wall_s)
                if best[0].rc != 0 or best[1]:
                    break
            ok = all(r.rc == 0 and p is None for r, p in results)
            wall = statistics.median(walls)
            row = {
                "tool": tool,
                "method": method,
                "k": k,
                "ok": ok,
                "rc": results[-1][0].rc,
                "problem": results[-1][1],
                "wall_s": round(wall, 3),
                "wall_s_all": [round(w, 3) for w in walls],
                "input_models": len(inputs),
                "input_bytes": input_bytes,
                "output_layers": out_layers,
                "input_gb_per_s": round(input_bytes / wall / 1e9, 4),
                "peak_rss_gb": round(max(r.peak_rss_bytes for r, _ in results) / 1e9, 3),
                "max_child_processes": max(r.max_processes for r, _ in results),
                "max_tree_rss_gb_polled": round(max(r.max_tree_rss_bytes for r, _ in results) / 1e9, 3),
                "peak_anon_rss_gb_polled": round(max(r.max_anon_bytes for r, _ in results) / 1e9, 3),
                "max_threads": max(r.max_threads for r, _ in results),
                "cpu_s": round(statistics.median(r.cpu_s for r, _ in results), 2),
                "others_cores_during": round(max(r.others_cpu_s / r.wall_s for r, _ in results), 2),
                "others_cores_before": [
                    None if r.load_before is None else round(r.load_before, 2) for r, _ in results
                ],
                "command": shlex.join(cmd),
                "recipe": str(recipe_path),
                "error_tail": None if ok else results[-1][0].log[-4000:],
                "reused": False,
                "contended_reruns": retried,
            }
            rows.append(row)
            if tool == "copy":
                copy_memo[memo_key] = row

    summary = []
    for k, method in args.plan:
        cell = {r["tool"]: r for r in rows if r["k"] == k and r["method"] == method and r["ok"]}
        t, m, c = (cell.get(x, {}).get("wall_s") for x in ("transfuse", "mergekit", "copy"))
        tc, mc = (cell.get(x, {}).get("cpu_s") for x in ("transfuse", "mergekit"))
        summary.append(
            {
                "method": method,
                "k": k,
                "transfuse_s": t,
                "mergekit_s": m,
                "copy_floor_s": c,
                "speedup_mergekit_over_transfuse": round(m / t, 3) if t and m else None,
                "speedup_cpu_time_mergekit_over_transfuse": round(mc / tc, 3) if tc and mc else None,
                "transfuse_over_copy_floor": round(t / c, 3) if t and c else None,
                "contended": sorted(x for x, r in cell.items() if r["others_cores_during"] > BUSY_CORES),
                "mergekit_over_copy_floor": round(m / c, 3) if m and c else None,
            }
        )

    table = markdown(rows, summary)
    total = time.perf_counter() - t_start
    print()
    print(
        f"Llama {args.params} ({n_params:,} params, bf16), {env['cpu_count']} CPUs, torch {env['torch']}, "
        f"device {args.device}; warm page cache; wall time includes process start-up; "
        f"repeat={args.repeat} (median)."
    )
    print()
    print(table)
    print()
    print("Commands (first cell shown; every run's command is in the JSON):")
    for tool, cmd in commands.items():
        print(f"- {tool}: `{cmd}`")
    print(
        "The copy floor is measured once per distinct set of inputs and shared by the methods that read it."
    )
    print(f"\nbenchmark wall time {total / 60:.1f} min")
    if args.json_out:
        out = {
            "env": env,
            "model": {
                "params_name": args.params,
                "n_params": n_params,
                "config": CONFIGS[args.params],
                "bytes_per_model": sizes[base],
                "dirs": [str(d) for d in dirs],
            },
            "settings": {
                "plan": args.plan,
                "tools": args.tools,
                "repeat": args.repeat,
                "warm_cache": True,
                "out_shard": OUT_SHARD,
                "argv": sys.argv,
            },
            "commands": commands,
            "runs": rows,
            "summary": summary,
            "table_markdown": table,
            "total_s": round(total, 1),
        }
        Path(args.json_out).write_text(json.dumps(out, indent=2))
        print(f"wrote {args.json_out}")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
