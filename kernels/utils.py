"""Small helpers shared by the kernel launch wrappers and `vhack.ops`: input checks, output
allocation (NaN-poisoned in tests), block sizes. Pure torch: importing this never imports triton."""

from __future__ import annotations

import os

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# Tests set this to True so every output buffer starts as NaN (or -1 for integers): a kernel that
# forgets to write an element then fails loudly instead of passing on leftover memory.
POISON_OUTPUTS = os.environ.get("VHACK_POISON_OUTPUTS", "0") == "1"


def empty(shape, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """torch.empty, NaN-filled (-1 for integer dtypes) when POISON_OUTPUTS is set."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if POISON_OUTPUTS:
        out.fill_(float("nan") if out.is_floating_point() else -1)
    return out


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (1 for n <= 1)."""
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def interpreter_enabled() -> bool:
    """True when TRITON_INTERPRET=1: Triton kernels then run on CPU tensors in the interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_tensor(
    t: torch.Tensor,
    name: str,
    *,
    dim: int | None = None,
    dtypes: tuple[torch.dtype, ...] | None = FLOAT_DTYPES,
    contiguous: bool = False,
) -> None:
    """Raise TypeError/ValueError naming `name` when t is not a tensor of the given rank and dtype
    (and contiguous, when asked)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} has dtype {t.dtype}; expected one of: {allowed}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got shape {tuple(t.shape)}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (call .contiguous() on it first)")


def check_same_device(**tensors: torch.Tensor | None) -> torch.device:
    """Raise ValueError unless every given tensor (None skipped) is on one device; return it."""
    present = {k: v for k, v in tensors.items() if v is not None}
    devices = {v.device for v in present.values()}
    if len(devices) > 1:
        where = ", ".join(f"{k} on {v.device}" for k, v in present.items())
        raise ValueError(f"all tensors must be on one device, got {where}")
    return next(iter(devices))


def check_factors(
    U: torch.Tensor,
    Vh: torch.Tensor,
    S: torch.Tensor | None = None,
    dS: torch.Tensor | None = None,
    *,
    dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES,
    s_dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.float64),
    contiguous: bool = False,
) -> tuple[int, int, int]:
    """Check the SVD factors U [d_out, r] and Vh [r, d_in] (one dtype among `dtypes`) and, when
    given, S [r] and dS [r] (among `s_dtypes`); return (d_out, r, d_in)."""
    check_tensor(U, "U", dim=2, dtypes=dtypes, contiguous=contiguous)
    check_tensor(Vh, "Vh", dim=2, dtypes=dtypes, contiguous=contiguous)
    for name, t in (("S", S), ("dS", dS)):
        if t is not None:
            check_tensor(t, name, dim=1, dtypes=s_dtypes, contiguous=contiguous)
    if U.dtype != Vh.dtype:
        raise TypeError(f"U and Vh must share a dtype, got {U.dtype} and {Vh.dtype}")
    d_out, r = U.shape
    if Vh.shape[0] != r:
        raise ValueError(f"U is {tuple(U.shape)} so Vh must have {r} rows, got {tuple(Vh.shape)}")
    for name, t in (("S", S), ("dS", dS)):
        if t is not None and t.shape[0] != r:
            raise ValueError(f"{name} must have length r = {r}, got {tuple(t.shape)}")
    return d_out, r, Vh.shape[1]
