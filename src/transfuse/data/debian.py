"""Fetch Debian packages into a cache directory and extract them, without installing anything.

``apt-get download NAME...`` puts the ``.deb`` files in ``CACHE/debs`` (no root needed, but apt's package
lists must exist: run ``apt-get update`` once), and ``dpkg-deb -x`` unpacks them all into one tree
``CACHE/root`` laid out like ``/`` (``usr/share/games/fortunes/...``). The tree is rebuilt only when the set
of ``.deb`` files changes (a marker file, ``.transfuse-packages.json``, records which ones it holds).

The default cache is ``$TRANSFUSE_CACHE_DIR/debian``, else ``$XDG_CACHE_HOME/transfuse/debian``, else
``~/.cache/transfuse/debian``.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import subprocess
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from transfuse.cache_dir import cache_root
from transfuse.errors import TransfuseError
from transfuse.io.files import staged_dir

MARKER = ".transfuse-packages.json"


class DebianPackageError(TransfuseError):
    """A Debian package cannot be downloaded or extracted."""


@dataclass(frozen=True)
class DebianPackage:
    """One downloaded ``.deb`` file."""

    name: str
    version: str
    architecture: str
    file: str  #: file name inside the cache's ``debs`` directory
    sha256: str


def default_cache_dir() -> Path:
    """Where downloaded packages and their extracted tree live unless a cache dir is given."""
    return cache_root() / "debian"


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _run(cmd: Sequence[str], cwd: Path | None = None) -> str:
    try:
        done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise DebianPackageError(
            f"{cmd[0]} is not available: fetching Debian packages needs a Debian-based system; "
            "pass package_root= a tree where the packages are already extracted"
        ) from None
    if done.returncode != 0:
        raise DebianPackageError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr.strip()[-800:]}")
    return done.stdout


def inspect_deb(path: Path) -> DebianPackage:
    """Name, version and architecture of a ``.deb`` file (from its control data) and its sha256."""
    out = _run(["dpkg-deb", "--showformat=${Package}\\t${Version}\\t${Architecture}", "--show", str(path)])
    name, version, arch = out.strip().split("\t")
    return DebianPackage(name, version, arch, path.name, _sha256_file(path))


def cached_debs(cache_dir: Path, packages: Sequence[str]) -> dict[str, Path]:
    """The ``.deb`` file of each package already in ``cache_dir/debs`` (packages not there are left out).

    Raises when a package has several versions there: delete the ones you do not want.
    """
    debs_dir = Path(cache_dir) / "debs"
    found: dict[str, Path] = {}
    for name in packages:
        files = sorted(debs_dir.glob(f"{name}_*.deb")) if debs_dir.is_dir() else []
        if len(files) > 1:
            raise DebianPackageError(
                f"{debs_dir} holds several versions of {name}: {[f.name for f in files]}; keep one"
            )
        if files:
            found[name] = files[0]
    return found


def fetch_packages(packages: Sequence[str], cache_dir: str | Path | None = None) -> list[DebianPackage]:
    """Download the packages not yet cached with ``apt-get download``; return all of them, in order."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    debs_dir = cache_dir / "debs"
    debs_dir.mkdir(parents=True, exist_ok=True)
    missing = [name for name in packages if name not in cached_debs(cache_dir, packages)]
    if missing:
        try:
            _run(["apt-get", "download", *missing], cwd=debs_dir)
        except DebianPackageError as exc:
            raise DebianPackageError(
                f"{exc}\n(if apt cannot locate a package, run 'apt-get update' once, as root)"
            ) from None
    debs = cached_debs(cache_dir, packages)
    absent = [name for name in packages if name not in debs]
    if absent:
        raise DebianPackageError(f"apt-get download did not produce {absent} in {debs_dir}")
    return [inspect_deb(debs[name]) for name in packages]


def extract_packages(packages: Sequence[DebianPackage], cache_dir: str | Path | None = None) -> Path:
    """Unpack the cached ``.deb`` files into ``cache_dir/root`` (reused when it already holds exactly these)."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    root = cache_dir / "root"
    wanted = [asdict(p) for p in packages]
    marker = root / MARKER
    if marker.is_file() and json.loads(marker.read_text()) == wanted:
        return root
    with staged_dir(root, replace=True) as tmp:  # the old tree stays until the new one is complete
        for package in packages:
            _run(["dpkg-deb", "-x", str(cache_dir / "debs" / package.file), str(tmp)])
        (tmp / MARKER).write_text(json.dumps(wanted, indent=2) + "\n")
    return root


def prepare_packages(packages: Sequence[str], cache_dir: str | Path | None = None) -> Path:
    """Fetch (if needed) and extract `packages`; return the extracted tree's root."""
    return extract_packages(fetch_packages(packages, cache_dir), cache_dir)


_CHANGELOG_VERSION = re.compile(r"^\S+ \(([^)]+)\)")


def package_version(root: str | Path, name: str) -> str:
    """The version of package `name` in an extracted (or installed) tree, read from the first line of
    ``usr/share/doc/NAME/changelog.Debian.gz`` (or ``changelog.gz`` for native packages); ``"unknown"``
    when neither exists."""
    doc = Path(root) / "usr" / "share" / "doc" / name
    for changelog in ("changelog.Debian.gz", "changelog.gz"):
        path = doc / changelog
        if path.is_file():
            with gzip.open(path, "rt", encoding="utf-8", errors="replace") as f:
                match = _CHANGELOG_VERSION.match(f.readline())
            if match:
                return match.group(1)
    return "unknown"
