"""Where vhack keeps files it can recompute (SVDs of weights, extracted bases)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_dir"]


def cache_dir(path: str | os.PathLike | None = None) -> Path:
    """The cache root: `path` if given, else $VHACK_CACHE_DIR, else $XDG_CACHE_HOME/vhack, else
    ~/.cache/vhack. The directory is created when missing."""
    if path is None:
        path = os.environ.get("VHACK_CACHE_DIR")
    if path is None:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        path = os.path.join(xdg, "vhack")
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    return root
