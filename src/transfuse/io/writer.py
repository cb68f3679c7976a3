"""Atomic, sharded safetensors output.

``ShardedWriter`` writes a model dir of safetensors shards (split at ``max_shard_bytes``, with
``model.safetensors.index.json`` when there are several).  Everything goes into a hidden temp dir beside the
target, ``<parent>/.<name>.tmp-<host>-<pid>-<random>``; ``finish()`` fsyncs it and moves it onto ``out_dir`` in
one step (``io.files.publish_dir``), so a crash never leaves a half-written model at ``out_dir``, and a failure
(or ``abort()``) removes the temp dir.  A process killed outright cannot clean up: the next writer for the same
``out_dir`` on the same host removes such leftovers once their process is gone.

Two ways to feed it:

- **Streamed** (what a merge does): call ``expect([(name, shape, dtype), ...])`` with every tensor first.  The
  shards' headers are laid out up front and each ``add`` streams its bytes straight into its shard file on one
  background thread (one tensor in flight), so writing overlaps the next computation and no shard is ever held
  in memory.
- **Buffered** (no ``expect``): ``add`` collects tensors and each full shard is written with
  ``safetensors.torch.save_file`` when the next tensor would overflow it, on the calling thread.  Both produce
  the same layout.

Use it as a context manager::

    with ShardedWriter(out_dir, metadata={...}) as writer:
        writer.expect(declared)          # optional: streamed mode
        for name, tensor in merged:
            writer.add(name, tensor)
        writer.copy_config_from(base_dir)
        writer.finish()

Leaving the ``with`` block without calling ``finish()`` aborts (the output is discarded; a warning is issued
when that happens without an exception).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import struct
import time
import warnings
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path, PurePosixPath
from types import TracebackType

import torch
from safetensors.torch import save_file

from transfuse.errors import CheckpointError, OutputExistsError, WriteError
from transfuse.io.files import HOST_TAG, publish_dir, remove_stale_dirs

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# Non-weight files of a Hugging Face model dir that a merged model needs (config, generation config,
# tokenizer,
# chat template, processor).  Weights, shard indexes and adapter files are never copied.
# The tokenizer and chat-template files among them (written by transfuse itself when it merges vocabularies).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
    "chat_template.jinja",
    "chat_template.json",
)
CONFIG_FILES = (
    "config.json",
    "generation_config.json",
    *TOKENIZER_FILES,
    "preprocessor_config.json",
    "processor_config.json",
)
CONFIG_GLOBS = ("tokenizer*.json", "tokenizer*.model", "*.tiktoken", "*.jinja")
CONFIG_DIRS = ("additional_chat_templates",)


def is_tokenizer_file(name: str) -> bool:
    """A tokenizer or chat-template file (as opposed to config.json, generation_config.json, processors...)."""
    return (
        name.startswith("tokenizer")
        or name in TOKENIZER_FILES
        or name.endswith((".tiktoken", ".jinja"))
        or name in CONFIG_DIRS
    )


def config_files(directory: str | Path) -> list[Path]:
    """The config / tokenizer files and dirs of ``directory`` worth copying into a merged model, sorted."""
    d = Path(directory)
    if not d.is_dir():
        return []
    found = {d / name for name in CONFIG_FILES if (d / name).is_file()}
    for pattern in CONFIG_GLOBS:
        found.update(p for p in d.glob(pattern) if p.is_file())
    found.update(d / name for name in CONFIG_DIRS if (d / name).is_dir())
    return sorted(found)


def _fsync_path(path: Path, *, directory: bool = False) -> None:
    # Directory fsync makes renames/creations durable; not every platform/filesystem allows it, hence the
    # guard.
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        if directory:
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not directory:
            raise
    finally:
        os.close(fd)


def remove_stale_temp_dirs(out_dir: Path) -> list[Path]:
    """Remove the temp dirs that writers for ``out_dir`` on this host left when they were killed (SIGKILL,
    power loss: no Python cleanup ran), i.e. whose process is gone; return what was removed (see
    ``io.files.remove_stale_dirs``, which also moves an orphaned old output back into place)."""
    return remove_stale_dirs(out_dir)


def _remove_tree(path: Path) -> None:
    # Retried: an interrupted run under load was seen to leave the (empty) temp dir behind once in a few tries,
    # i.e. one removal pass lost a race with a file being closed or created in it.
    for attempt in range(20):
        shutil.rmtree(path, ignore_errors=True)
        if not path.exists():
            return
        time.sleep(0.05 * (attempt + 1))


def _canonicalize_header(path: Path) -> None:
    """Rewrite a safetensors header in a canonical order, in place, so equal inputs give identical bytes.

    safetensors serialises ``__metadata__`` from a hash map: its key order (hence the file's bytes) varies
    from call to call.  The canonical header (metadata sorted by key, tensors by data offset) has the same
    entries and, with the same compact JSON encoding, the same length; it is written only when it fits the
    original header (padding with spaces, as safetensors itself does), so the data offsets never move.
    """
    with open(path, "r+b") as fh:
        (size,) = struct.unpack("<Q", fh.read(8))
        raw = fh.read(size)
        header = json.loads(raw)
        canonical: dict[str, object] = {}
        if "__metadata__" in header:
            canonical["__metadata__"] = dict(sorted(header.pop("__metadata__").items()))
        canonical.update(sorted(header.items(), key=lambda kv: (kv[1]["data_offsets"], kv[0])))
        text = json.dumps(canonical, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        if len(text) <= size:
            fh.seek(8)
            fh.write(text + b" " * (size - len(text)))


# The dtype codes of the safetensors format (what a header's "dtype" says), for the dtypes transfuse writes.
SAFETENSORS_DTYPE_CODES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw bytes of a contiguous CPU tensor (any dtype, bf16 included), without a copy."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


class _StreamedShard:
    """A safetensors file whose header is written first; tensor bytes are then appended in header order."""

    def __init__(
        self, path: Path, entries: list[tuple[str, tuple[int, ...], torch.dtype]], metadata: dict
    ) -> None:
        header: dict[str, object] = {"__metadata__": dict(sorted(metadata.items()))}
        offset = 0
        for name, shape, dtype in entries:
            code = SAFETENSORS_DTYPE_CODES.get(dtype)
            if code is None:
                raise WriteError(f"tensor {name!r} has dtype {dtype}, which safetensors cannot store")
            nbytes = int(torch.Size(shape).numel()) * dtype.itemsize
            header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        text += b" " * (-len(text) % 8)  # the data buffer starts 8-byte aligned, as safetensors writes it
        self.path = path
        self.names = [e[0] for e in entries]
        self.expected = {name: (tuple(shape), dtype) for name, shape, dtype in entries}
        self.written = 0
        self.fh = open(path, "wb")
        self.fh.write(struct.pack("<Q", len(text)) + text)

    def write(self, name: str, t: torch.Tensor) -> None:
        if t.numel():
            start = self.fh.tell()
            self.fh.write(_tensor_bytes(t))
            if hasattr(os, "posix_fadvise"):
                # Start write-back now (asynchronously) so finish()'s fsync has little left to wait for.
                self.fh.flush()
                os.posix_fadvise(self.fh.fileno(), start, self.fh.tell() - start, os.POSIX_FADV_DONTNEED)
        self.written += 1

    def close(self) -> None:
        if not self.fh.closed:
            self.fh.flush()
            os.fsync(self.fh.fileno())
            self.fh.close()


def _write_shard(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    save_file(tensors, str(path), metadata=metadata)
    _canonicalize_header(path)
    _fsync_path(path)


class ShardedWriter:
    """Writes a model dir of safetensors shards atomically (see the module docstring).

    ``max_shard_bytes`` bounds each shard's tensor data (a single larger tensor gets a shard of its own);
    ``metadata`` (str -> str) goes into every shard's header, plus ``{"format": "pt"}``.  An existing
    non-empty ``out_dir`` raises ``OutputExistsError`` here, unless ``overwrite=True``: then it is replaced
    only once the new output is complete.  Tensors handed to ``add`` must not be modified afterwards (in
    streamed mode one of them is still being written when ``add`` returns).
    """

    def __init__(
        self,
        out_dir: str | Path,
        *,
        max_shard_bytes: int = 5 * 2**30,
        metadata: dict[str, str] | None = None,
        overwrite: bool = False,
    ) -> None:
        # abspath, not resolve: a symlink at out_dir is refused (_check_target), never followed and replaced.
        self.out_dir = Path(os.path.abspath(os.path.expanduser(str(out_dir))))
        if isinstance(max_shard_bytes, bool) or not isinstance(max_shard_bytes, int) or max_shard_bytes <= 0:
            raise WriteError(f"max_shard_bytes must be a positive integer, got {max_shard_bytes!r}")
        meta = dict(metadata or {})
        for key, value in meta.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise WriteError(
                    f"safetensors metadata must map str to str; got {key!r}: {type(value).__name__}"
                )
        meta["format"] = "pt"  # transformers checks this key when loading
        self.max_shard_bytes = max_shard_bytes
        self.metadata = meta
        self.overwrite = overwrite
        self._check_target()

        parent = self.out_dir.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
            remove_stale_temp_dirs(self.out_dir)
            self.tmp_dir = (
                parent / f".{self.out_dir.name}.tmp-{HOST_TAG}-{os.getpid()}-{secrets.token_hex(4)}"
            )
            self.tmp_dir.mkdir()
        except OSError as exc:
            raise WriteError(f"cannot create the output's temp dir in {parent}: {exc}") from exc
        # Safety net: a writer dropped without finish()/abort() (e.g. no `with`) still removes its temp dir.
        self._finalizer = weakref.finalize(self, _remove_tree, self.tmp_dir)

        self._state = "open"  # -> "finished" | "aborted"
        self._buffer: dict[str, torch.Tensor] = {}
        self._buffer_bytes = 0
        self._buffer_storages: set[int] = set()
        self._shards: list[tuple[str, list[str]]] = []  # (temp file name, tensor names)
        self._names: set[str] = set()
        self._total_size = 0
        self._added_files: set[str] = set()
        self._executor: ThreadPoolExecutor | None = None
        self._pending: Future[None] | None = None
        # Streaming mode (after expect()): the shard files laid out up front and where the next tensor goes.
        self._streamed: list[_StreamedShard] = []
        self._expected_order: list[tuple[str, int]] = []  # (name, shard index) in add() order
        self._next = 0

    def expect(self, tensors: list[tuple[str, tuple[int, ...], torch.dtype]]) -> None:
        """Declare every tensor, in the order ``add`` will receive them, before the first ``add``.

        Shards are laid out now (same split rule as the buffered path) and each ``add`` then writes its tensor
        straight to disk on the background thread: memory holds at most the one tensor being written.
        """
        self._check_open()
        if self._names or self._streamed:
            raise WriteError("expect() must be called once, before the first add()")
        groups: list[list[tuple[str, tuple[int, ...], torch.dtype]]] = [[]]
        size = 0
        seen: set[str] = set()
        for name, shape, dtype in tensors:
            if name in seen:
                raise WriteError(f"tensor {name!r} is declared twice")
            seen.add(name)
            nbytes = int(torch.Size(shape).numel()) * dtype.itemsize
            if groups[-1] and size + nbytes > self.max_shard_bytes:
                groups.append([])
                size = 0
            groups[-1].append((name, tuple(shape), dtype))
            size += nbytes
        if not groups[0]:
            raise WriteError(f"no tensors declared; nothing to write to {self.out_dir}")
        try:
            for i, group in enumerate(groups):
                file = f"shard-{i:05d}.safetensors"
                self._streamed.append(_StreamedShard(self.tmp_dir / file, group, self.metadata))
                self._shards.append((file, [g[0] for g in group]))
                self._expected_order.extend((g[0], i) for g in group)
        except OSError as exc:
            self.abort()
            raise WriteError(f"cannot create shard files in {self.tmp_dir}: {exc}") from exc

    # ------------------------------------------------------------------ public API

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Buffer ``tensor`` (written contiguous, in its dtype); a full shard is written out first."""
        self._check_open()
        if not isinstance(name, str) or not name:
            raise WriteError(f"tensor names must be non-empty strings, got {name!r}")
        if name in self._names:
            raise WriteError(f"tensor {name!r} was added twice to the output {self.out_dir}")
        if not isinstance(tensor, torch.Tensor) or tensor.layout != torch.strided or tensor.is_meta:
            raise WriteError(
                f"tensor {name!r} must be a dense torch.Tensor with data, got {type(tensor).__name__}"
            )
        t = tensor.detach()
        if t.device.type != "cpu":
            t = t.to("cpu")
        t = t.contiguous()
        nbytes = t.numel() * t.element_size()
        if self._streamed:
            self._add_streamed(name, t, nbytes)
            return
        if self._buffer and self._buffer_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        # save_file refuses two names sharing memory (tied weights, the same tensor added twice): copy
        # instead.
        ptr = t.untyped_storage().data_ptr() if nbytes else 0
        if ptr and ptr in self._buffer_storages:
            t = t.clone()
            ptr = t.untyped_storage().data_ptr()
        if ptr:
            self._buffer_storages.add(ptr)
        self._buffer[name] = t
        self._buffer_bytes += nbytes
        self._names.add(name)
        self._total_size += nbytes

    def _add_streamed(self, name: str, t: torch.Tensor, nbytes: int) -> None:
        if self._next >= len(self._expected_order) or self._expected_order[self._next][0] != name:
            expected = self._expected_order[self._next][0] if self._next < len(self._expected_order) else None
            raise WriteError(f"tensor {name!r} added out of the declared order (expected {expected!r})")
        shard = self._streamed[self._expected_order[self._next][1]]
        if (tuple(t.shape), t.dtype) != shard.expected[name]:
            raise WriteError(
                f"tensor {name!r} is {t.dtype} {tuple(t.shape)} but was declared as {shard.expected[name]}"
            )
        self._next += 1
        self._names.add(name)
        self._total_size += nbytes
        self._wait()  # one tensor in flight: writing overlaps the next computation, memory stays bounded
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="transfuse-write")
        self._pending = self._executor.submit(self._stream_write, shard, name, t)

    def _stream_write(self, shard: _StreamedShard, name: str, t: torch.Tensor) -> None:
        shard.write(name, t)
        if shard.written == len(shard.names):
            shard.close()

    def add_file(self, name: str, content: str | bytes) -> None:
        """Write a non-weight file (e.g. ``recipe.yaml``) into the output; wins over ``copy_config_from``."""
        self._check_open()
        rel = self._safe_relative(name)
        data = content.encode("utf-8") if isinstance(content, str) else bytes(content)
        path = self.tmp_dir / rel
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as exc:
            raise WriteError(f"cannot write {name} into the output's temp dir {self.tmp_dir}: {exc}") from exc
        self._added_files.add(rel.as_posix())

    def copy_config_from(self, src_dir: str | Path, *, skip: tuple[str, ...] = ()) -> None:
        """Copy config, generation config, tokenizer and chat-template files (never weights) from ``src_dir``,
        except the names in ``skip``.

        Files already written with ``add_file`` are kept.  Copying from two dirs: the later one wins.
        """
        self._check_open()
        src = Path(src_dir)
        if not src.is_dir():
            raise CheckpointError(f"cannot copy config files from {src_dir}: it is not a dir")
        for path in config_files(src):
            if path.name in self._added_files or path.name in skip:
                continue
            dest = self.tmp_dir / path.name
            try:
                if path.is_dir():
                    if dest.exists():
                        shutil.rmtree(dest)
                    shutil.copytree(path, dest)
                    for file in dest.rglob("*"):
                        if file.is_file():
                            _fsync_path(file)
                else:
                    shutil.copyfile(path, dest)
                    _fsync_path(dest)
            except OSError as exc:
                raise WriteError(
                    f"cannot copy {path} into the output's temp dir {self.tmp_dir}: {exc}"
                ) from exc

    def finish(self) -> Path:
        """Write the remaining shard and the index, fsync, and move the result onto ``out_dir``; return it.

        One shard is named ``model.safetensors`` (no index); N > 1 are ``model-0000i-of-0000N.safetensors``
        with ``model.safetensors.index.json`` (``metadata.total_size`` = bytes of tensor data).  On any
        failure the temp dir is removed and ``out_dir`` is left as it was.
        """
        self._check_open()
        try:
            if self._buffer:
                self._flush()
            self._wait()
            self._shutdown_executor()
            if self._streamed and self._next != len(self._expected_order):
                raise WriteError(
                    f"only {self._next} of the {len(self._expected_order)} declared tensors were added; "
                    f"the output {self.out_dir} would be incomplete"
                )
            if not self._names:
                raise WriteError(f"no tensors were added; nothing to write to {self.out_dir}")
            self._name_shards()
            _fsync_path(self.tmp_dir, directory=True)
            self._move_into_place()
        except BaseException:
            self.abort()
            raise
        self._state = "finished"
        self._finalizer.detach()
        return self.out_dir

    def abort(self) -> None:
        """Discard everything written so far (waits for an in-flight shard, then removes the temp dir)."""
        if self._state != "open":
            return
        self._state = "aborted"
        self._buffer = {}
        self._buffer_storages = set()
        if self._pending is not None:
            # A running write cannot be interrupted; wait so it does not recreate files after the removal.
            try:
                self._pending.result()
            except BaseException:
                pass
            self._pending = None
        self._shutdown_executor()
        for shard in self._streamed:
            try:
                shard.fh.close()
            except OSError:
                pass
        _remove_tree(self.tmp_dir)
        self._finalizer.detach()

    @property
    def total_size(self) -> int:
        """Bytes of tensor data added so far."""
        return self._total_size

    def __enter__(self) -> ShardedWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._state == "open":
            self.abort()
            if exc_type is None:
                warnings.warn(
                    f"ShardedWriter for {self.out_dir} left without finish(): the output was discarded",
                    stacklevel=2,
                )

    # ------------------------------------------------------------------ internals

    def _check_open(self) -> None:
        if self._state != "open":
            raise WriteError(f"the writer for {self.out_dir} is already {self._state}")

    def _check_target(self) -> None:
        target = self.out_dir
        if target.is_symlink() or (target.exists() and not target.is_dir()):
            raise OutputExistsError(
                f"output path {target} exists and is not a dir; choose another output path or remove it"
            )
        if target.is_dir() and any(target.iterdir()) and not self.overwrite:
            raise OutputExistsError(
                f"output dir {target} exists and is not empty; choose another path, remove it, or pass "
                "overwrite=True (--overwrite) to replace it once the new model is complete"
            )

    def _safe_relative(self, name: str) -> PurePosixPath:
        rel = PurePosixPath(name.replace("\\", "/"))
        if not name or rel.is_absolute() or ".." in rel.parts or rel.as_posix() in ("", "."):
            raise WriteError(
                f"invalid output file name {name!r}: expected a relative path inside the output dir"
            )
        if rel.name.endswith(".safetensors") or rel.name == INDEX_FILE:
            raise WriteError(f"{name!r} is reserved for the model weights the writer produces")
        return rel

    def _flush(self) -> None:
        """Write the buffered shard now and start a new buffer."""
        tensors = self._buffer
        self._buffer = {}
        self._buffer_bytes = 0
        self._buffer_storages = set()
        file = f"shard-{len(self._shards):05d}.safetensors"
        self._shards.append((file, list(tensors)))
        self._run_write(self.tmp_dir / file, tensors)

    def _run_write(self, path: Path, tensors: dict[str, torch.Tensor]) -> None:
        try:
            _write_shard(path, tensors, self.metadata)
        except Exception as exc:
            self.abort()
            raise WriteError(f"cannot write shard {path}: {exc}") from exc

    def _wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is None:
            return
        try:
            pending.result()
        except Exception as exc:
            self.abort()
            raise WriteError(f"cannot write a shard into {self.tmp_dir}: {exc}") from exc

    def _shutdown_executor(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    def _name_shards(self) -> None:
        count = len(self._shards)
        weight_map: dict[str, str] = {}
        for i, (temp_name, names) in enumerate(self._shards):
            final = SINGLE_FILE if count == 1 else f"model-{i + 1:05d}-of-{count:05d}.safetensors"
            os.replace(self.tmp_dir / temp_name, self.tmp_dir / final)
            weight_map.update(dict.fromkeys(names, final))
        if count > 1:
            index = {"metadata": {"total_size": self._total_size}, "weight_map": weight_map}
            path = self.tmp_dir / INDEX_FILE
            with open(path, "w", encoding="utf-8") as fh:
                # sort_keys matches transformers' own index files.
                fh.write(json.dumps(index, indent=2, sort_keys=True) + "\n")
                fh.flush()
                os.fsync(fh.fileno())

    def _move_into_place(self) -> None:
        self._check_target()  # again: something may have appeared there while we merged
        # overwrite=True and a non-empty dir is there: swapped, keeping the old until the new is in place.
        publish_dir(self.tmp_dir, self.out_dir, replace=self.overwrite)
