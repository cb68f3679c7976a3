"""Outputs written so that a reader never sees half of one: small files (reports, rankings, cache entries) by
:func:`write_atomically`, whole directories (merged models, experts, converted models) by :func:`publish_dir`."""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import re
import secrets
import shutil
import socket
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from transfuse.errors import OutputExistsError, WriteError

# Names this host's temporary dirs, so that a writer on another machine sharing the filesystem never judges them.
HOST_TAG = hashlib.blake2b(socket.gethostname().encode(), digest_size=3).hexdigest()


def write_atomically(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """Run ``write(tmp)`` on a hidden temporary path beside `path`, then rename it to `path`; on failure the
    temporary file is removed and `path` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.stem}.{os.getpid()}-{uuid.uuid4().hex[:8]}{path.suffix}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_text_atomically(path: str | Path, text: str) -> Path:
    return write_atomically(path, lambda tmp: tmp.write_text(text))


@contextlib.contextmanager
def staged_dir(target: str | Path, *, replace: bool) -> Iterator[Path]:
    """A fresh hidden directory beside `target` to build it in: published to `target` by :func:`publish_dir`
    when the block ends normally, removed when it raises (so a failed build leaves nothing).  Temporary dirs
    that killed processes of this host left for `target` are removed first (:func:`remove_stale_dirs`)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_dirs(target)
    tmp = target.parent / f".{target.name}.tmp-{HOST_TAG}-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        yield tmp
        publish_dir(tmp, target, replace=replace)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already when published


def remove_stale_dirs(target: str | Path) -> list[Path]:
    """Remove the hidden ``.NAME.tmp-`` / ``.NAME.old-`` dirs beside `target` that processes of this host left
    when they were killed (SIGKILL, power loss: no Python cleanup ran), i.e. whose process is gone; return
    them.  An ``.old-`` dir while `target` is missing is the old output of a process killed between the two
    renames of :func:`publish_dir`: it is moved back to `target` instead.  Another host's dirs on a shared
    filesystem are never judged."""
    target = Path(target)
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.(tmp|old)-{HOST_TAG}-(\d+)-[0-9a-f]{{8}}$")
    removed = []
    try:
        entries = list(target.parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = pattern.match(entry.name)
        if not match or int(match.group(2)) == os.getpid() or _process_alive(int(match.group(2))):
            continue
        if match.group(1) == "old" and not os.path.lexists(target):
            with contextlib.suppress(OSError):  # if it cannot move back, it stays: it is the only copy
                os.rename(entry, target)
            continue
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def publish_dir(tmp: str | Path, target: str | Path, *, replace: bool) -> Path:
    """Move the finished directory `tmp` to `target` by renames, so `target` is never seen half-written.

    `tmp` must be on the same filesystem as `target` (make it beside `target`).  A missing `target` or an empty
    directory there is simply replaced.  A non-empty directory is an :class:`OutputExistsError` unless
    `replace`; then it is renamed aside to a hidden ``.NAME.old-HOST-PID-RANDOM`` sibling, `tmp` is renamed into
    place and only then is the old one deleted, so at every moment `target` holds the old or the new directory.
    If moving `tmp` in fails, the old directory is moved back and the error raised (a :class:`WriteError`;
    `tmp` is left for the caller to remove).  A file or symlink at `target` is an :class:`OutputExistsError`,
    never replaced or followed.  The parent directory is fsynced, so the renames survive a crash.
    Returns `target`.
    """
    tmp, target = Path(tmp), Path(target)
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise OutputExistsError(f"{target} exists and is not a directory; remove it or choose another path")
    if target.is_dir() and not any(target.iterdir()):
        target.rmdir()  # rename() onto an empty dir is not portable; the window is harmless
    if not target.exists():
        _rename(tmp, target, f"cannot move the finished output into place at {target}")
    elif not replace:
        raise OutputExistsError(f"{target} exists and is not empty; remove it or choose another path")
    else:
        old = target.parent / f".{target.name}.old-{HOST_TAG}-{os.getpid()}-{secrets.token_hex(4)}"
        _rename(target, old, f"cannot move the existing {target} aside to replace it")
        try:
            _rename(tmp, target, f"cannot move the finished output into place at {target}")
        except WriteError:
            os.rename(old, target)
            raise
        shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(target.parent)
    return target


def _rename(source: Path, dest: Path, failure: str) -> None:
    try:
        os.rename(source, dest)
    except OSError as exc:
        raise WriteError(f"{failure}: {exc}") from exc


def _fsync_dir(path: Path) -> None:
    """Make renames in `path` durable, where the platform and filesystem allow a directory fsync."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def json_safe(value: Any) -> Any:
    """`value` with NaN/Inf floats replaced by None, recursively: JSON has no NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value
