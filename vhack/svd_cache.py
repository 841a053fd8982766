"""SVD factors of target weights, cached on disk by a content hash of the weight.

`vhack.wrap` needs U, S, Vh of every target weight; computing them is the slow part of wrapping a
large model, so they are kept under `<cache root>/svd/<weight hash>.safetensors` (see `vhack.cache`
for the root and the off switch). A cache file that cannot be read is recomputed, never trusted.
"""

from __future__ import annotations

import hashlib
import os
import threading
import warnings
from pathlib import Path

import safetensors.torch
import torch

from vhack.cache import cache_dir as resolve_cache_dir
from vhack.cache import svd_cache_enabled

__all__ = ["svd_cache_dir", "svd_factors", "weight_hash"]


def weight_hash(weight: torch.Tensor) -> str:
    """Content hash of a weight: dtype, shape and bytes (40 hex characters)."""
    w = weight.detach().contiguous().cpu()
    h = hashlib.blake2b(digest_size=20)
    h.update(f"{w.dtype}|{tuple(w.shape)}|".encode())
    h.update(w.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def svd_cache_dir(cache_dir: str | os.PathLike | None, use_cache: bool) -> Path | None:
    """The directory of cached SVD files (created), or None when caching is off (use_cache=False
    or VHACK_SVD_CACHE=0)."""
    if not (use_cache and svd_cache_enabled()):
        return None
    cache = resolve_cache_dir(cache_dir) / "svd"
    cache.mkdir(parents=True, exist_ok=True)
    return cache


def svd_factors(weight: torch.Tensor, cache: Path | None) -> tuple[torch.Tensor, ...]:
    """U [d_out, r], S [r] float32, Vh [r, d_in] of a weight (U, Vh in its dtype), via the cache.

    The SVD runs in float32 (float64 for float64 weights) on the weight's device; cache=None
    computes without reading or writing files.
    """
    path = cache / f"{weight_hash(weight)}.safetensors" if cache is not None else None
    if path is not None and path.exists():
        try:
            f = safetensors.torch.load_file(str(path), device=str(weight.device))
            return f["U"], f["S"], f["Vh"]
        except Exception as err:  # a damaged cache file is recomputed, never trusted
            warnings.warn(f"ignoring unreadable SVD cache file {path}: {err}", stacklevel=3)
    compute = torch.float64 if weight.dtype == torch.float64 else torch.float32
    U, S, Vh = torch.linalg.svd(weight.detach().to(compute), full_matrices=False)
    U, Vh = U.to(weight.dtype).contiguous(), Vh.to(weight.dtype).contiguous()
    S = S.to(torch.float32).contiguous()
    if path is not None:
        # unique per process and thread: ranks of a distributed job share the cache directory and
        # run the same code (id() alone collided across forked ranks)
        tmp = path.with_suffix(f".tmp{os.getpid()}-{threading.get_ident()}")
        safetensors.torch.save_file({"U": U.cpu(), "S": S.cpu(), "Vh": Vh.cpu()}, str(tmp))
        tmp.replace(path)
    return U, S, Vh
