"""SVD factors of target weights, cached on disk by a content hash of the weight.

`vhack.wrap` needs U, S, Vh of every target weight; computing them is the slow part of wrapping a
large model, so they are kept under `<cache root>/svd/<weight hash>.safetensors` (see `vhack.cache`
for the root and the off switch). What is read is checked before it is used: the file stores a
hash of its factors (a damaged or edited file fails it), the shapes must fit the weight, and the
factors must reproduce the weight on a random probe vector (W x = U diag(S) Vh x within the
dtype's tolerance: a file of another weight fails it). A file that fails any check is recomputed
and rewritten, with a warning. Writes are atomic (`vhack.files`); a cache directory that cannot be
created or written warns once and wrapping runs without the cache.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path

import safetensors.torch
import torch

from vhack.cache import cache_dir as resolve_cache_dir
from vhack.cache import svd_cache_enabled
from vhack.files import atomic_path

__all__ = ["PROBE_RTOL", "svd_cache_dir", "svd_factors", "weight_hash"]

# Relative error allowed between W x and U diag(S) Vh x for a cached file (U and Vh are stored in
# the weight's dtype, so a half-precision file reconstructs to about 1e-2).
PROBE_RTOL = {
    torch.float64: 1e-8,
    torch.float32: 1e-4,
    torch.float16: 2e-2,
    torch.bfloat16: 5e-2,
}
_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, stacklevel=4)


def weight_hash(weight: torch.Tensor) -> str:
    """Content hash of a weight: dtype, shape and bytes (40 hex characters)."""
    return _hash(weight)


def _hash(*tensors: torch.Tensor) -> str:
    h = hashlib.blake2b(digest_size=20)
    for t in tensors:
        t = t.detach().contiguous().cpu()
        h.update(f"{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def svd_cache_dir(cache_dir: str | os.PathLike | None, use_cache: bool) -> Path | None:
    """The directory of cached SVD files (created), or None when caching is off (use_cache=False
    or VHACK_SVD_CACHE=0)."""
    if not (use_cache and svd_cache_enabled()):
        return None
    try:
        cache = resolve_cache_dir(cache_dir) / "svd"
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        _warn_once(
            f"mkdir:{cache_dir}",
            f"vhack: the SVD cache directory cannot be created ({err}); wrapping without the "
            "disk cache (set VHACK_CACHE_DIR to a writable directory, or VHACK_SVD_CACHE=0)",
        )
        return None
    return cache


def _check_factors(weight: torch.Tensor, f: dict, metadata: dict) -> str | None:
    """Why the cached factors cannot be used for `weight`, or None when they pass."""
    if not {"U", "S", "Vh"} <= set(f):
        return "missing tensors"
    U, S, Vh = f["U"], f["S"], f["Vh"]
    d_out, d_in = weight.shape
    r = min(d_out, d_in)
    if U.shape != (d_out, r) or S.shape != (r,) or Vh.shape != (r, d_in):
        return f"shapes {tuple(U.shape)}, {tuple(S.shape)}, {tuple(Vh.shape)} do not fit {d_out}x{d_in}"
    if U.dtype != weight.dtype or Vh.dtype != weight.dtype or S.dtype != torch.float32:
        return "dtypes do not match the weight"
    if metadata.get("factors") != _hash(U, S, Vh):
        return "the stored hash of the factors does not match (damaged or edited file)"
    ct = torch.float64 if weight.dtype == torch.float64 else torch.float32
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(d_in, 1, generator=g, dtype=ct).to(weight.device)
    wx = weight.detach().to(ct) @ x
    usvx = U.to(ct) @ (S.to(ct)[:, None] * (Vh.to(ct) @ x))
    err = float(torch.linalg.vector_norm(wx - usvx) / torch.linalg.vector_norm(wx).clamp_min(1e-30))
    if not err <= PROBE_RTOL[weight.dtype]:  # NaN fails too
        return f"the factors do not reproduce the weight (relative error {err:.2e})"
    return None


def svd_factors(weight: torch.Tensor, cache: Path | None) -> tuple[torch.Tensor, ...]:
    """U [d_out, r], S [r] float32, Vh [r, d_in] of a weight (U, Vh in its dtype), via the cache.

    The SVD runs in float32 (float64 for float64 weights) on the weight's device; cache=None
    computes without reading or writing files. A cached file is used only when it passes the
    checks of the module docstring.
    """
    path = cache / f"{weight_hash(weight)}.safetensors" if cache is not None else None
    if path is not None and path.exists():
        reason = None
        try:
            with safetensors.safe_open(str(path), "pt", device=str(weight.device)) as fh:
                metadata = fh.metadata() or {}
                f = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 (not a dict)
            reason = _check_factors(weight, f, metadata)
        except Exception as err:  # a damaged cache file is recomputed, never trusted
            reason = f"unreadable ({err})"
        if reason is None:
            return f["U"], f["S"], f["Vh"]
        warnings.warn(f"recomputing the SVD of cache file {path}: {reason}", stacklevel=3)
    compute = torch.float64 if weight.dtype == torch.float64 else torch.float32
    U, S, Vh = torch.linalg.svd(weight.detach().to(compute), full_matrices=False)
    U, Vh = U.to(weight.dtype).contiguous(), Vh.to(weight.dtype).contiguous()
    S = S.to(torch.float32).contiguous()
    if path is not None:
        tensors = {"U": U.cpu(), "S": S.cpu(), "Vh": Vh.cpu()}
        data = safetensors.torch.save(tensors, metadata={"factors": _hash(U, S, Vh)})
        try:
            with atomic_path(path) as tmp, open(tmp, "wb") as fh:
                fh.write(data)
        except OSError as err:
            _warn_once(
                f"write:{path.parent}",
                f"vhack: cannot write the SVD cache in {path.parent} ({err}); continuing "
                "without caching (set VHACK_CACHE_DIR to a writable directory, or "
                "VHACK_SVD_CACHE=0)",
            )
    return U, S, Vh
