"""publish_dir: the one atomic directory publish (merged models, experts, converted models, unpacked packages)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

import transfuse.io.files as files
from transfuse.errors import OutputExistsError, WriteError
from transfuse.io.files import HOST_TAG, publish_dir, remove_stale_dirs, staged_dir


def _finished(parent: Path, content: str = "new") -> Path:
    tmp = parent / f".out.tmp-{content}"
    tmp.mkdir()
    (tmp / "weights.txt").write_text(content)
    return tmp


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_a_new_target(tmp_path):
    tmp = _finished(tmp_path)
    assert publish_dir(tmp, tmp_path / "out", replace=False) == tmp_path / "out"
    assert (tmp_path / "out" / "weights.txt").read_text() == "new"
    assert not tmp.exists() and _leftovers(tmp_path) == []


@pytest.mark.parametrize("replace", [False, True])
def test_an_empty_target_dir_is_replaced_without_replace(tmp_path, replace):
    (tmp_path / "out").mkdir()
    publish_dir(_finished(tmp_path), tmp_path / "out", replace=replace)
    assert (tmp_path / "out" / "weights.txt").read_text() == "new"
    assert _leftovers(tmp_path) == []


def test_a_non_empty_target_needs_replace(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    tmp = _finished(tmp_path)
    with pytest.raises(OutputExistsError, match="not empty"):
        publish_dir(tmp, out, replace=False)
    assert sorted(p.name for p in out.iterdir()) == ["mine.txt"]
    assert (tmp / "weights.txt").is_file()  # the caller's to remove


@pytest.mark.parametrize("kind", ["file", "symlink"])
def test_a_file_or_symlink_target_is_never_replaced(tmp_path, kind):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = tmp_path / "out"
    if kind == "file":
        out.write_text("a file")
    else:
        out.symlink_to(elsewhere)
    with pytest.raises(OutputExistsError, match="not a directory"):
        publish_dir(_finished(tmp_path), out, replace=True)
    assert out.is_symlink() if kind == "symlink" else out.read_text() == "a file"
    assert list(elsewhere.iterdir()) == []


def test_replacing_keeps_the_old_dir_until_the_new_one_is_in_place(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "weights.txt").write_text("old")
    seen = []
    real_rename = os.rename

    def watching_rename(source, dest):
        # at every step, the old contents or the new are at the target, or (between the two renames) the old
        # contents are in their hidden sibling
        old_aside = [p for p in tmp_path.iterdir() if p.name.startswith(".out.old-")]
        seen.append((Path(source).name, Path(dest).name, out.exists(), [p.name for p in old_aside]))
        real_rename(source, dest)

    monkeypatch.setattr(files.os, "rename", watching_rename)
    publish_dir(_finished(tmp_path), out, replace=True)
    assert (out / "weights.txt").read_text() == "new"
    (aside_source, aside_dest, _, _), (new_source, new_dest, target_there, old_there) = seen
    assert (aside_source, new_source, new_dest) == ("out", ".out.tmp-new", "out")
    assert aside_dest.startswith(f".out.old-{files.HOST_TAG}-{os.getpid()}-")
    assert not target_there and old_there == [aside_dest]  # the old one is kept while the new moves in
    assert _leftovers(tmp_path) == []  # and deleted once it is in place


def test_a_failed_move_restores_the_old_dir(tmp_path):
    # A real failure: the finished dir is on another filesystem (tmpfs), so renaming it into place fails with
    # EXDEV, after the old dir was already moved aside.
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK)) or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs a writable /dev/shm on another filesystem than the test's temp dir")
    out = tmp_path / "out"
    out.mkdir()
    (out / "weights.txt").write_text("old")
    with tempfile.TemporaryDirectory(dir=shm) as elsewhere:
        tmp = _finished(Path(elsewhere))
        with pytest.raises(WriteError, match="cannot move the finished output into place"):
            publish_dir(tmp, out, replace=True)
        assert (tmp / "weights.txt").read_text() == "new"  # left for the caller
    assert sorted(p.name for p in out.iterdir()) == ["weights.txt"]
    assert (out / "weights.txt").read_text() == "old"
    assert _leftovers(tmp_path) == []  # nothing hidden left behind


def test_a_failed_move_to_a_new_target_leaves_nothing(tmp_path):
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK)) or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs a writable /dev/shm on another filesystem than the test's temp dir")
    with tempfile.TemporaryDirectory(dir=shm) as elsewhere:
        with pytest.raises(WriteError, match="cannot move the finished output into place"):
            publish_dir(_finished(Path(elsewhere)), tmp_path / "out", replace=False)
    assert list(tmp_path.iterdir()) == []


def test_staged_dir_publishes_a_finished_build_and_drops_a_failed_one(tmp_path):
    out = tmp_path / "out"
    with staged_dir(out, replace=False) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(f".out.tmp-{HOST_TAG}-{os.getpid()}-")
        (tmp / "weights.txt").write_text("first")
    assert (out / "weights.txt").read_text() == "first" and _leftovers(tmp_path) == []
    with pytest.raises(RuntimeError, match="boom"), staged_dir(out, replace=True) as tmp:
        (tmp / "weights.txt").write_text("half")
        raise RuntimeError("boom")
    assert (out / "weights.txt").read_text() == "first" and _leftovers(tmp_path) == []
    with staged_dir(out, replace=True) as tmp:
        (tmp / "weights.txt").write_text("second")
    assert (out / "weights.txt").read_text() == "second" and _leftovers(tmp_path) == []


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_stale_dirs_of_dead_processes_are_removed_and_an_orphaned_old_dir_restored(tmp_path):
    dead = _dead_pid()
    out = tmp_path / "out"
    dirs = {
        "dead_tmp": f".out.tmp-{HOST_TAG}-{dead}-0123abcd",
        "mine": f".out.tmp-{HOST_TAG}-{os.getpid()}-0123abcd",
        "other_host": f".out.tmp-{'f' * 6 if HOST_TAG != 'f' * 6 else 'e' * 6}-{dead}-0123abcd",
        "other_target": f".outer.tmp-{HOST_TAG}-{dead}-0123abcd",
        "dead_old": f".out.old-{HOST_TAG}-{dead}-0123abcd",
    }
    for name in dirs.values():
        (tmp_path / name).mkdir()
    (tmp_path / dirs["dead_old"] / "weights.txt").write_text("old")
    # the target is missing: the killed process had moved it aside, so it comes back
    assert remove_stale_dirs(out) == [tmp_path / dirs["dead_tmp"]]
    assert (out / "weights.txt").read_text() == "old"
    assert _leftovers(tmp_path) == sorted([dirs["mine"], dirs["other_host"], dirs["other_target"]])
    # with the target in place, a dead process's old dir is just removed
    (tmp_path / dirs["dead_old"]).mkdir()
    assert remove_stale_dirs(out) == [tmp_path / dirs["dead_old"]]
    assert (out / "weights.txt").read_text() == "old"
