"""Run a merge plan: stream each output tensor through the method with memory bounded by the largest tensor.

For each job the engine reads the base tensor and the K model tensors from their memory maps, builds the float32
task-vector stack ``[K, *shape]`` on the compute device, calls the method, casts the result to the output dtype and
hands it to the writer.  On a multi-threaded CPU, small tensors are merged in parallel on single-threaded workers
(``_iter_parallel``); otherwise reading the next small tensor overlaps with the current computation.  Big tensors
are done one at a time, so peak memory stays about (K + 2) x the largest tensor in float32 plus the writer's shard.
"""

from __future__ import annotations

import hashlib
import keyword
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from transfuse.chunks import SERIAL, ChunkExecutor, pin_to_one_thread
from transfuse.errors import NonFiniteOutputError, NonFiniteTensorError
from transfuse.methods.context import MethodContext, MissingStatisticsError
from transfuse.plan import MergePlan, TensorJob

# Jobs whose float32 working set is below this are prefetched while the previous job computes.
PREFETCH_MAX_BYTES = 256 * 2**20


@dataclass
class MergeStats:
    """What a run did and how fast."""

    tensors: int
    input_bytes: int
    output_bytes: int
    seconds: float

    @property
    def input_gb_per_s(self) -> float:
        return self.input_bytes / 1e9 / max(self.seconds, 1e-9)


def tensor_seed(seed: int, name: str) -> int:
    """A per-tensor seed from the recipe seed and the tensor name: stable across runs, platforms and job order."""
    digest = hashlib.blake2b(f"{seed}\x00{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _py_name(name: str) -> str:
    return name + "_" if keyword.iskeyword(name) else name


@dataclass
class _Inputs:
    job: TensorJob
    base: torch.Tensor
    deltas: torch.Tensor | None


# Task vectors are built in chunks of this many entries: the chunk just converted is still in cache when the
# base is subtracted and when it is summed for the NaN/Inf check (1.9x faster than whole-tensor passes here).
LOAD_CHUNK = 1 << 22


class WorkBuffers:
    """Float32 work buffers (the base, the task-vector stack) reused from job to job, one set per owner.

    A fresh multi-MB buffer page-faults on first touch: filling one cost 1.3-2.1 ns per float32 entry here
    (with transparent huge pages), a reused one 0.5-0.75 ns; with K=2 that is ~40% of loading.  An owner is
    whoever finishes a job before its set is filled again: by default the calling thread (the engine's pool
    workers load AND merge each job), or an explicit key (the one-thread path alternates two sets, so the
    reader fills one while the other is merged).  A set grows to the largest job it has held, so ``clear``
    hands buffers back when a phase of big or small jobs ends.
    """

    def __init__(self) -> None:
        self._sets: dict[object, list[torch.Tensor | None]] = {}
        self._lock = threading.Lock()

    def get(self, slot: int, numel: int, owner: object = None) -> torch.Tensor:
        """A flat float32 CPU tensor of ``numel`` entries: buffer ``slot`` (0 or 1) of ``owner``'s set
        (``None``: the calling thread's)."""
        key = threading.get_ident() if owner is None else owner
        with self._lock:
            mine = self._sets.setdefault(key, [None, None])
        buffer = mine[slot]
        if buffer is None or buffer.numel() < numel:
            mine[slot] = buffer = None  # free the old one before allocating its successor
            buffer = mine[slot] = torch.empty(numel, dtype=torch.float32)
        return buffer[:numel]

    def clear(self, *, keep_calling_thread: bool = False) -> None:
        """Hand back every set (but the calling thread's, if ``keep_calling_thread``)."""
        with self._lock:
            mine = threading.get_ident()
            for key in list(self._sets):
                if not (keep_calling_thread and key == mine):
                    del self._sets[key]


def _load(
    plan: MergePlan,
    job: TensorJob,
    device: torch.device,
    check_finite: bool,
    buffers: WorkBuffers | None = None,
    owner: object = None,
) -> _Inputs:
    """Read one job's inputs into a float32 ``base`` and task-vector stack ``deltas`` (in ``owner``'s set of
    ``buffers`` if given, on CPU)."""
    base_in = plan.base_input(job)
    raw_base = base_in.checkpoint.tensor(base_in.name)
    if not job.merge:
        # A copied float tensor (passthrough at scale 1) is published as it is: scan it as merged inputs are.
        if check_finite and raw_base.is_floating_point() and raw_base.numel():
            # aminmax in the tensor's own dtype: inf and NaN propagate into it, and for bf16 it runs ~17x faster
            # than a float32 sum (0.11 vs 1.95 ns per entry), which made byte-copy merges CPU-bound on the check.
            low, high = torch.aminmax(raw_base)
            if not (bool(torch.isfinite(low)) and bool(torch.isfinite(high))):
                bad = int((~torch.isfinite(raw_base)).sum())
                raise NonFiniteTensorError(
                    f"tensor {base_in.name!r} of {base_in.label} holds {bad} NaN/Inf value(s); fix or re-export "
                    "it, or drop that model from the recipe"
                )
        return _Inputs(job, raw_base, None)
    model_ins = plan.model_inputs(job)
    k = len(model_ins)
    if buffers is not None and device.type == "cpu":
        base = buffers.get(0, job.numel, owner).view(job.shape).copy_(raw_base)
        deltas = buffers.get(1, k * job.numel, owner).view(k, *job.shape)
    else:
        base = raw_base.to(device=device, dtype=torch.float32, copy=True)
        deltas = torch.empty((k, *job.shape), dtype=torch.float32, device=device)
    base_flat = base.reshape(-1)
    n = base_flat.numel()
    rows_flat = deltas.reshape(k, n)
    checksum = torch.zeros((), dtype=torch.float32, device=device)  # NaN/Inf anywhere makes it non-finite
    for i, source in enumerate(model_ins):
        x = source.checkpoint.tensor(source.name)
        if job.model_rows and x.shape[0] != job.shape[0]:
            rows = min(x.shape[0], job.shape[0])
            deltas[i, :rows].copy_(x[:rows])
            deltas[i, rows:].copy_(base[rows:])  # padded rows: the base's, i.e. a zero task vector there
            deltas[i].sub_(base)
            checksum.add_(deltas[i].sum())
        else:
            # copy_ then sub_, chunk by chunk: a mixed-dtype torch.sub(x, base, out=...) is ~4x slower on CPU.
            x_flat = x.reshape(-1)
            row = rows_flat[i]
            for lo in range(0, n, LOAD_CHUNK):
                hi = min(n, lo + LOAD_CHUNK)
                chunk = row[lo:hi]
                chunk.copy_(x_flat[lo:hi])
                chunk.sub_(base_flat[lo:hi])
                if check_finite:
                    checksum.add_(chunk.sum())
            del x_flat
        del x
        _release(source.checkpoint, source.name)
    del raw_base
    _release(base_in.checkpoint, base_in.name)
    if check_finite and not (torch.isfinite(checksum) and torch.isfinite(base_flat.sum())):
        _name_non_finite(plan, job, base, deltas)
    return _Inputs(job, base, deltas)


def _release(checkpoint: object, name: str) -> None:
    # Mapped pages of a consumed tensor would otherwise count against RSS until the whole run ends.
    release = getattr(checkpoint, "release", None)
    if release is not None:
        release(name)


def _name_non_finite(plan: MergePlan, job: TensorJob, base: torch.Tensor, deltas: torch.Tensor) -> None:
    """Raise ``NonFiniteTensorError`` naming the input that holds NaN/Inf (a finite-sum overflow is not one)."""
    base_in = plan.base_input(job)
    if not torch.isfinite(base).all():
        bad = int((~torch.isfinite(base)).sum())
        raise NonFiniteTensorError(
            f"tensor {base_in.name!r} of the base ({base_in.checkpoint.source}) holds {bad} NaN/Inf value(s); "
            "fix or re-export it"
        )
    for i, label in enumerate(source.label for source in plan.model_inputs(job)):
        if not torch.isfinite(deltas[i]).all():
            bad = int((~torch.isfinite(deltas[i])).sum())
            raise NonFiniteTensorError(
                f"tensor {job.name!r} of {label} holds {bad} NaN/Inf value(s) (or differs from the base by more "
                "than float32 can hold); this model is broken, drop it from the recipe"
            )


def check_inputs_finite(plan: MergePlan, *, progress: bool = False) -> int:
    """Read every input tensor of the plan once and raise ``NonFiniteTensorError`` naming the first NaN/Inf.

    The merge itself checks each tensor as it streams (one reduction over the task-vector stack, no extra
    read), and its atomic writer leaves nothing behind on failure; this is the up-front version for a dry
    run.  Returns the number of tensors read.
    """
    read = 0
    with _job_progress(plan, progress, "checking") as job_done:
        for job in plan.jobs:
            sources = [plan.base_input(job), *(plan.model_inputs(job) if job.merge else ())]
            for source in sources:
                checkpoint, label = source.checkpoint, source.label
                flat = checkpoint.tensor(source.name).reshape(-1)
                for lo in range(0, flat.numel(), LOAD_CHUNK):
                    if flat.is_floating_point() and not bool(
                        torch.isfinite(flat[lo : lo + LOAD_CHUNK]).all()
                    ):
                        bad = int((~torch.isfinite(flat)).sum())
                        raise NonFiniteTensorError(
                            f"tensor {source.name!r} of {label} ({getattr(checkpoint, 'source', label)}) holds "
                            f"{bad} NaN/Inf value(s); fix or re-export it, or drop that model from the recipe"
                        )
                del flat
                _release(checkpoint, source.name)
                read += 1
            job_done(job)
    return read


#: Per-tensor statistics for methods that need them: ``{tensor name: {statistic name: tensor}}``.  Only
#: ``.get(name)`` is called, once per merged tensor and on the thread that merges it, so a lazy mapping that
#: reads each tensor's statistics from disk works.
Statistics = Mapping[str, Mapping[str, torch.Tensor]]


def check_runnable(plan: MergePlan, statistics: Statistics | None = None) -> None:
    """Raise before any work if the engine cannot run ``plan``'s method: extra outputs (no writer for them
    yet) or, for a method that ``needs`` statistics, none given (each job's are checked as it runs)."""
    spec = plan.spec
    if spec.outputs:
        raise NotImplementedError(
            f"method {spec.name!r} declares extra per-tensor outputs ({', '.join(spec.outputs)}), which the "
            "engine cannot write yet"
        )
    if spec.needs and statistics is None:
        raise MissingStatisticsError(
            f"method {spec.name!r} ({spec.family}) needs per-tensor statistics ({', '.join(spec.needs)}); "
            "none were given"
        )


def method_context(
    plan: MergePlan,
    job: TensorJob,
    device: torch.device,
    chunks: ChunkExecutor = SERIAL,
    statistics: Statistics | None = None,
) -> MethodContext:
    """The ``MethodContext`` of one job: its generator (random methods), its statistics (``spec.needs``, moved
    to ``device``), where its chunk loops run and whether its ``base`` is a base model (``job.has_base``)."""
    spec = plan.spec
    generator = None
    if spec.random:
        generator = torch.Generator(device=device)
        generator.manual_seed(tensor_seed(plan.recipe.seed, job.name))
    given: Mapping[str, torch.Tensor] = {}
    if spec.needs:
        found = statistics.get(job.name) if statistics is not None else None
        missing = [key for key in spec.needs if found is None or key not in found]
        if missing and not (spec.fallback is not None and len(missing) == len(spec.needs)):
            raise MissingStatisticsError(
                f"method {spec.name!r}: no {', '.join(repr(m) for m in missing)} statistics for tensor "
                f"{job.name!r}"
            )
        if found is not None and not missing:
            keys = [*spec.needs, *(k for k in spec.optional_statistics if k in found)]
            given = {key: found[key].to(device) for key in keys}
    return MethodContext(
        name=job.name,
        device=device,
        generator=generator,
        statistics=given,
        chunks=chunks,
        has_base=job.has_base,
    )


def _check_output_range(job: TensorJob, merged: torch.Tensor) -> None:
    """``NonFiniteOutputError`` when the merged tensor holds inf/NaN or values its output dtype cannot hold.

    One pass over the method's result, before the cast and on the worker that computed it: a sum (0.3 ns per
    entry here; inf/NaN propagate into it) when the output dtype spans float32's range, ``aminmax`` (0.55 ns)
    when it is narrower (float16: 65504).  Only a failing tensor is scanned again, to count and explain.
    """
    if merged.numel() == 0 or not merged.is_floating_point():
        return
    limit = torch.finfo(job.out_dtype).max
    if limit >= torch.finfo(torch.float32).max * 0.99:  # float32, bfloat16, float64 outputs
        if math.isfinite(float(merged.sum())) or bool(torch.isfinite(merged).all()):
            return  # (a finite tensor whose sum overflows is the rare second case)
        low = high = math.inf
    else:
        low, high = (float(v) for v in torch.aminmax(merged))
        if math.isfinite(low) and math.isfinite(high) and -limit <= low and high <= limit:
            return
    bad = int((~torch.isfinite(merged)).sum())
    weights = list(job.model_params.get("weight", ()))
    scale = {k: v for k, v in job.global_params.items() if k in ("lambda", "alpha", "scale")}
    settings = f"weights {weights}{f', {scale}' if scale else ''}"
    if bad:
        raise NonFiniteOutputError(
            f"merged tensor {job.name!r} holds {bad} inf/NaN value(s) of {merged.numel()}: the method overflowed "
            f"float32 ({settings}). Nothing was written: lower the weights or scale"
        )
    out = str(job.out_dtype).removeprefix("torch.")
    over = int((merged.abs() > limit).sum())
    raise NonFiniteOutputError(
        f"merged tensor {job.name!r} has {over} value(s) beyond {out}'s range (largest finite {limit:g}; here "
        f"{max(abs(low), abs(high)):g}), which the cast to the output dtype would turn into inf ({settings}). "
        "Nothing was written: choose a wider output dtype (--dtype float32) or lower the weights or scale"
    )


def compute(
    plan: MergePlan,
    inputs: _Inputs,
    device: torch.device,
    chunks: ChunkExecutor = SERIAL,
    statistics: Statistics | None = None,
) -> torch.Tensor:
    """The merged tensor of one job, in its output dtype, on the CPU.  ``chunks``: where the method's chunk
    loops run (the engine's pinned workers pass ``ChunkExecutor(pinned=True)``, a big job the idle pool)."""
    job = inputs.job
    if inputs.deltas is None:
        return inputs.base
    spec = plan.spec
    inert = {p.name for p in spec.params if p.inert}  # accepted for recipe compatibility, never passed
    kwargs: dict[str, object] = {_py_name(k): v for k, v in job.global_params.items() if k not in inert}
    for name, values in job.model_params.items():
        if name != "weight" and name not in inert:
            kwargs[_py_name(name)] = torch.tensor(values, dtype=torch.float32, device=device)
    weights = torch.tensor(job.model_params["weight"], dtype=torch.float32, device=device)
    if spec.takes_context:
        kwargs["ctx"] = method_context(plan, job, device, chunks, statistics)
    merged = spec.fn(inputs.base, inputs.deltas, weights, **kwargs)
    _check_output_range(job, merged)
    result = merged.to(dtype=job.out_dtype).to("cpu").contiguous()
    storage = result.untyped_storage()
    work = {inputs.base.untyped_storage().data_ptr(), inputs.deltas.untyped_storage().data_ptr()}
    if storage.nbytes() > result.nbytes or storage.data_ptr() in work:
        # a view of the work buffers (e.g. a row of deltas): don't keep them alive, and never hand out a
        # buffer that the next job will overwrite
        result = result.clone()
    return result


def iter_merged(
    plan: MergePlan,
    *,
    device: str | torch.device = "cpu",
    check_finite: bool = True,
    statistics: Statistics | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, merged tensor)`` in plan order.

    On a CPU with several intra-op threads, small jobs are loaded and merged whole on a pool of that many
    workers, each running torch single-threaded (see ``_iter_parallel``); otherwise jobs run one at a time,
    the next small job's inputs being read on a reader thread meanwhile.  ``statistics`` feeds the method's
    ``MethodContext`` (required by a method that ``needs`` statistics, ignored by the others).
    """
    device = torch.device(device)
    check_runnable(plan, statistics)
    workers = torch.get_num_threads() if device.type == "cpu" else 1
    if workers > 1 and len(plan.jobs) > 1:
        yield from _iter_parallel(plan, device, check_finite, workers, statistics)
        return
    jobs = plan.jobs
    # Two buffer sets by job parity: the reader fills job i+1's while job i's is merged.  Peak memory stays
    # that of the biggest job plus one prefetched small job, as without reuse.
    buffers = WorkBuffers()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="transfuse-read") as pool:
        pending: Future[_Inputs] | None = None
        for i, job in enumerate(jobs):
            if pending is not None:
                inputs = pending.result()
            else:
                inputs = _load(plan, job, device, check_finite, buffers, i % 2)
            pending = None
            if i + 1 < len(jobs) and _small(plan, jobs[i + 1]):
                pending = pool.submit(_load, plan, jobs[i + 1], device, check_finite, buffers, (i + 1) % 2)
            merged = compute(plan, inputs, device, statistics=statistics)
            del inputs
            yield job.name, merged
        if pending is not None:
            pending.cancel()


def _small(plan: MergePlan, job: TensorJob) -> bool:
    return job.numel * 4 * (plan.model_count(job) + 1) <= PREFETCH_MAX_BYTES


def _load_and_compute(
    plan: MergePlan,
    job: TensorJob,
    device: torch.device,
    check_finite: bool,
    buffers: WorkBuffers | None,
    chunks: ChunkExecutor,
    statistics: Statistics | None,
) -> torch.Tensor:
    return compute(plan, _load(plan, job, device, check_finite, buffers), device, chunks, statistics)


#: How a pool worker (pinned to one torch thread) runs a small job's chunk loops: in turn, count untouched.
_ON_PINNED_WORKER = ChunkExecutor(pinned=True)


def _iter_parallel(
    plan: MergePlan,
    device: torch.device,
    check_finite: bool,
    workers: int,
    statistics: Statistics | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Small jobs run whole (read, merge, cast) on ``workers`` single-threaded workers, results in plan order;
    a big job waits for the pool to drain and runs alone on the calling thread with all threads, its chunk loops
    spread over the then idle workers (``ChunkExecutor(pool, workers)`` in its ``MethodContext``).

    Why: a merge's chunk loops issue thousands of small ops that run best on one intra-op thread (see
    ``transfuse/chunks.py``), so one merge uses one core; independent tensors on separate workers use them
    all.  Each op releases the GIL, so workers contend only for the few microseconds of Python between ops.
    Memory: at most ``workers + 1`` small jobs (each under ``PREFETCH_MAX_BYTES``) are in flight.  (Letting the
    workers go on with later small jobs while a big one runs measured no faster: more threads than cores.)
    """
    threads = torch.get_num_threads()
    window: deque[tuple[str, Future[torch.Tensor]]] = deque()
    # Reused work buffers; peak memory stays that of the bigger phase: the workers' buffers are handed back
    # before a big job, the big job's when small jobs resume.
    buffers = WorkBuffers()
    after_big = False
    torch.set_num_threads(1)  # torch gates intra-op parallelism on this process-wide count
    try:
        with ThreadPoolExecutor(
            max_workers=workers, thread_name_prefix="transfuse-merge", initializer=pin_to_one_thread
        ) as pool:
            try:
                for job in plan.jobs:
                    if _small(plan, job):
                        if after_big:
                            buffers.clear()
                            after_big = False
                        while len(window) > workers:
                            name, future = window.popleft()
                            yield name, future.result()
                        future = pool.submit(
                            _load_and_compute,
                            plan,
                            job,
                            device,
                            check_finite,
                            buffers,
                            _ON_PINNED_WORKER,
                            statistics,
                        )
                        window.append((job.name, future))
                        continue
                    while window:
                        name, future = window.popleft()
                        yield name, future.result()
                    buffers.clear(keep_calling_thread=True)
                    after_big = True
                    torch.set_num_threads(threads)
                    try:
                        # the idle workers take its chunk loops
                        spread = ChunkExecutor(pool, workers)
                        merged = _load_and_compute(
                            plan, job, device, check_finite, buffers, spread, statistics
                        )
                    finally:
                        torch.set_num_threads(1)
                    yield job.name, merged
                while window:
                    name, future = window.popleft()
                    yield name, future.result()
            finally:
                for _, future in window:
                    future.cancel()
    finally:
        torch.set_num_threads(threads)


def run_plan(
    plan: MergePlan,
    sink: Callable[[str, torch.Tensor], None],
    *,
    device: str | torch.device = "cpu",
    threads: int | None = None,
    progress: bool = True,
    check_finite: bool = True,
    statistics: Statistics | None = None,
) -> MergeStats:
    """Merge every job of ``plan`` and pass each result to ``sink(name, tensor)`` (e.g. a writer's ``add``).

    ``threads`` sets torch's thread count for the run; the caller's count is restored afterwards.
    ``statistics``: per-tensor statistics for a method that needs them (see ``iter_merged``).
    """
    caller_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    start = time.perf_counter()
    try:
        with _job_progress(plan, progress) as job_done:
            for (name, tensor), job in zip(
                iter_merged(plan, device=device, check_finite=check_finite, statistics=statistics), plan.jobs
            ):
                sink(name, tensor)
                job_done(job)
    finally:
        torch.set_num_threads(caller_threads)
    return MergeStats(
        tensors=len(plan.jobs),
        input_bytes=plan.input_bytes,
        output_bytes=plan.output_bytes,
        seconds=time.perf_counter() - start,
    )


@contextmanager
def _job_progress(
    plan: MergePlan, enabled: bool, label: str = "merging"
) -> Iterator[Callable[[TensorJob], None]]:
    """A callable that advances a progress bar over ``plan``'s jobs by one finished job (a no-op when not
    ``enabled``); the bar is closed on exit."""
    if not enabled:
        yield lambda job: None
        return
    bar = _Progress(len(plan.jobs), label)
    try:
        yield bar.advance
    finally:
        bar.stop()


class _Progress:
    """A rich progress bar showing tensors/s and input GB/s."""

    def __init__(self, total: int, label: str) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._start = time.perf_counter()
        self._progress = Progress(
            TextColumn(label),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeRemainingColumn(),
            transient=False,
        )
        self._task = self._progress.add_task("merge", total=total, rate="")
        self._done_bytes = 0
        self._progress.start()

    def advance(self, job: TensorJob) -> None:
        self._done_bytes += job.input_bytes
        elapsed = max(time.perf_counter() - self._start, 1e-9)
        completed = self._progress.tasks[0].completed + 1
        rate = f"{completed / elapsed:.0f} tensors/s, {self._done_bytes / 1e9 / elapsed:.2f} GB/s"
        self._progress.update(self._task, advance=1, rate=rate)

    def stop(self) -> None:
        self._progress.stop()
