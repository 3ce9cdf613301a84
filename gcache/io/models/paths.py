"""Where gcache keeps what it computes once per user (converted models, role embeddings)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """``$GCACHE_CACHE_DIR``, else ``$XDG_CACHE_HOME/gcache``, else ``~/.cache/gcache``."""
    root = os.environ.get("GCACHE_CACHE_DIR")
    if root:
        return Path(root).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "gcache"
