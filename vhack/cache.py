"""Where vhack keeps files it can recompute (SVDs of weights, extracted bases).

Layout under the cache root (`cache_dir`):
    svd/<weight hash>.safetensors    U, S, Vh of one weight, written by `vhack.wrap`: about
                                     r * (d_out + d_in) values in the weight's dtype, so 1-2x
                                     the wrapped weights (Qwen3-4B in bfloat16: ~9.8 GB)
    bases/<model>_k..._<hash>.safetensors   hack bases of `vhack.load_or_extract` and
                                     `vhack extract` (Qwen3-4B, top_k 12: ~25 MB)
Nothing is evicted; deleting the directory (or any file in it) is always safe: files are
recomputed when missing or unreadable. VHACK_SVD_CACHE=0 turns the SVD cache off.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_dir", "svd_cache_enabled"]

_OFF = ("0", "off", "false", "no")


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


def svd_cache_enabled() -> bool:
    """False when $VHACK_SVD_CACHE is 0/off/false/no: `vhack.wrap` then computes every SVD and
    neither reads nor writes the disk cache (as `wrap(..., use_cache=False)`)."""
    return os.environ.get("VHACK_SVD_CACHE", "1").strip().lower() not in _OFF
