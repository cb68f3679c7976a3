"""Where transfuse caches what it downloads, converts or trains, unless a cache dir is given."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """``$TRANSFUSE_CACHE_DIR``, else ``$XDG_CACHE_HOME/transfuse``, else ``~/.cache/transfuse``."""
    if os.environ.get("TRANSFUSE_CACHE_DIR"):
        return Path(os.environ["TRANSFUSE_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "transfuse"
