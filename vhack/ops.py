"""Functional entry points of vhack, and the one place that knows about backends.

Backends:
  "reference"  vhack.reference: eager, readable, float64-safe; always available.
  "torch"      vectorised PyTorch: the CPU path, and the CUDA path where no kernel exists.
  "triton"     Triton kernels (vhack.kernels): the default for CUDA tensors; runs on CPU tensors
               only under TRITON_INTERPRET=1 (set before triton is imported).
  "cpp"        the C++ extension vhack._C (CPU), when it was built.
`backend=None` picks the default for the tensors' device; `backends()` says what is available.
Every op validates its inputs here, before any backend runs, so all backends fail alike.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache

import torch

from vhack import reference
from vhack._projection import layout_for, project_torch_
from vhack.kernels.utils import (
    FLOAT_DTYPES,
    check_same_device,
    check_tensor,
    empty,
    interpreter_enabled,
)

__all__ = ["backends", "delta_grad", "merge_weight", "project_", "svd_linear", "use_backend"]

BACKENDS = ("reference", "torch", "triton", "cpp")

# Which backends implement each op. Kernel and C++ modules add themselves here as they land.
_IMPLEMENTED: dict[str, tuple[str, ...]] = {
    "svd_linear": ("reference", "torch"),
    "delta_grad": ("reference", "torch"),
    "merge_weight": ("reference", "torch"),
    "project_": ("reference", "torch"),
}
# Preferred order per device type; the first implemented and available backend wins.
_PREFERENCE = {"cuda": ("triton", "torch"), "cpu": ("cpp", "torch")}
# Set by use_backend(): the backend that calls with backend=None use, where the op implements it.
_forced: str | None = None


@contextmanager
def use_backend(backend: str) -> Iterator[None]:
    """Within the block, ops called with backend=None (e.g. inside SVDLinear) run on `backend`
    wherever the op implements it; ops without it keep their default. Not thread-local."""
    global _forced
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    previous, _forced = _forced, backend
    try:
        yield
    finally:
        _forced = previous


@cache
def _triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


@cache
def _cpp_available() -> bool:
    try:
        importlib.import_module("vhack._C")
    except ImportError:
        return False
    return True


def _available(backend: str, device_type: str) -> bool:
    if backend in ("reference", "torch"):
        return True
    if backend == "triton":
        return _triton_importable() and (device_type == "cuda" or interpreter_enabled())
    if backend == "cpp":
        return device_type == "cpu" and _cpp_available()
    return False


def _resolve_backend(op: str, backend: str | None, device: torch.device) -> str:
    """The backend that runs `op` on `device`: `backend` if given (checked), else the default."""
    implemented = _IMPLEMENTED[op]
    if backend is None and _forced is not None and _forced in implemented:
        backend = _forced
    if backend is None:
        for choice in _PREFERENCE.get(device.type, ("torch",)):
            if choice in implemented and _available(choice, device.type):
                return choice
        return "torch"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    if backend not in implemented:
        raise ValueError(f"{op} has no {backend!r} backend; implemented: {implemented}")
    if not _available(backend, device.type):
        if backend == "triton":
            raise RuntimeError(
                f"backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before triton is "
                f"imported to run the kernels on CPU tensors (got {device.type} tensors"
                f"{', triton not installed' if not _triton_importable() else ''})"
            )
        raise RuntimeError(
            f"backend={backend!r} is not available for {device.type} tensors here; "
            f"see vhack.ops.backends()"
        )
    return backend


def backends() -> dict:
    """What is available here: flags per backend, the ops each implements, and the default backend
    of every op per device type ("cpu", and "cuda" when a GPU is visible)."""
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return {
        "triton": _triton_importable(),
        "triton_interpreter": interpreter_enabled(),
        "cpp": _cpp_available(),
        "cuda": torch.cuda.is_available(),
        "ops": dict(_IMPLEMENTED),
        "default": {
            dev: {op: _resolve_backend(op, None, torch.device(dev)) for op in _IMPLEMENTED}
            for dev in devices
        },
    }


# ----------------------------------------------------------------------------------------------
# Input checks shared by every backend
# ----------------------------------------------------------------------------------------------


def _check_factors(
    U: torch.Tensor, Vh: torch.Tensor, S: torch.Tensor | None = None, dS: torch.Tensor | None = None
) -> tuple[int, int, int]:
    """Check U [d_out, r], Vh [r, d_in] and, when given, S [r] and dS [r] (float32/float64);
    return (d_out, r, d_in)."""
    check_tensor(U, "U", dim=2)
    check_tensor(Vh, "Vh", dim=2)
    for name, t in (("S", S), ("dS", dS)):
        if t is not None:
            check_tensor(t, name, dim=1, dtypes=(torch.float32, torch.float64))
    if U.dtype != Vh.dtype:
        raise TypeError(f"U and Vh must share a dtype, got {U.dtype} and {Vh.dtype}")
    d_out, r = U.shape
    if Vh.shape[0] != r:
        raise ValueError(f"U is {tuple(U.shape)} so Vh must have {r} rows, got {tuple(Vh.shape)}")
    for name, t in (("S", S), ("dS", dS)):
        if t is not None and t.shape[0] != r:
            raise ValueError(f"{name} must have length r = {r}, got {tuple(t.shape)}")
    return d_out, r, Vh.shape[1]


def _check_svd_linear(x, U, S, dS, Vh, bias, weight):
    check_tensor(x, "x")
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension [..., d_in]")
    d_out, _, d_in = _check_factors(U, Vh, S, dS)
    if x.shape[-1] != d_in:
        raise ValueError(f"x has {x.shape[-1]} features but Vh is {tuple(Vh.shape)} (d_in={d_in})")
    if bias is not None:
        check_tensor(bias, "bias", dim=1)
        if bias.shape[0] != d_out:
            raise ValueError(f"bias must have length d_out = {d_out}, got {tuple(bias.shape)}")
    if weight is not None:
        check_tensor(weight, "weight", dim=2)
        if tuple(weight.shape) != (d_out, d_in):
            raise ValueError(f"weight must be [{d_out}, {d_in}], got {tuple(weight.shape)}")
    return check_same_device(x=x, U=U, S=S, dS=dS, Vh=Vh, bias=bias, weight=weight)


# ----------------------------------------------------------------------------------------------
# svd_linear
# ----------------------------------------------------------------------------------------------


class _SVDLinearDense(torch.autograd.Function):
    """Forward through the dense effective weight W_eff, backward in the SVD basis.

    y = x W_eff^T + bias; dx = gy W_eff; dS = delta_grad(x, gy, U, Vh) (so dS keeps its exact
    gradient even when W_eff is a cached merge, or the base weight itself at dS = 0).
    """

    @staticmethod
    def forward(ctx, x, U, S, dS, Vh, bias, weight):
        ctx.save_for_backward(x, U, Vh, weight)
        ctx.has_bias = bias is not None
        return torch.nn.functional.linear(x, weight.to(x.dtype), bias)

    @staticmethod
    def backward(ctx, gy):
        x, U, Vh, weight = ctx.saved_tensors
        gx = g_S = g_dS = g_bias = None
        if ctx.needs_input_grad[0]:
            gx = (gy @ weight.to(gy.dtype)).to(x.dtype)
        if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:
            g = reference.delta_grad(x, gy, U, Vh)
            g_S = g if ctx.needs_input_grad[2] else None
            g_dS = g if ctx.needs_input_grad[3] else None
        if ctx.has_bias and ctx.needs_input_grad[5]:
            g_bias = gy.reshape(-1, gy.shape[-1]).sum(0)
        return gx, None, g_S, g_dS, None, g_bias, None


def svd_linear(
    x: torch.Tensor,
    U: torch.Tensor,
    S: torch.Tensor,
    dS: torch.Tensor,
    Vh: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    weight: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """y = ((x Vh^T) * (S + dS)) U^T + bias: the SVD-basis Linear, differentiable in x, S, dS, bias.

    x [..., d_in] float; U [d_out, r], Vh [r, d_in] (one float dtype); S, dS [r] float32 (or
    float64); bias [d_out] or None -> y [..., d_out] in x.dtype. U and Vh are constants (frozen).
    weight: optional precomputed W_eff [d_out, d_in] (e.g. a cached merge_weight(..., base=W));
    the forward and dx then use it as a dense Linear while dS still gets its exact SVD-basis
    gradient. It must equal U diag(S + dS) Vh up to the base weight's reconstruction error.
    """
    device = _check_svd_linear(x, U, S, dS, Vh, bias, weight)
    chosen = _resolve_backend("svd_linear", backend, device)
    if chosen == "reference" or (chosen == "torch" and weight is None):
        return reference.svd_linear(x, U, S, dS, Vh, bias)
    return _SVDLinearDense.apply(x, U, S, dS, Vh, bias, weight)


# ----------------------------------------------------------------------------------------------
# delta_grad
# ----------------------------------------------------------------------------------------------


def _check_segments(segment_ids: torch.Tensor, n_rows: int, n_segments: int | None) -> int:
    check_tensor(segment_ids, "segment_ids", dim=1, dtypes=(torch.int64,))
    if segment_ids.shape[0] != n_rows:
        raise ValueError(
            f"segment_ids needs one id per row of x.reshape(-1, d_in): expected {n_rows}, got "
            f"{segment_ids.shape[0]}"
        )
    # Range check: one host sync, acceptable off the training hot path (extraction, statistics).
    lo = int(segment_ids.min()) if n_rows else 0
    hi = int(segment_ids.max()) if n_rows else -1
    if n_segments is None:
        n_segments = hi + 1
    if n_segments < 0 or lo < 0 or hi >= n_segments:
        raise ValueError(
            f"segment_ids must lie in [0, n_segments={n_segments}), got values in [{lo}, {hi}]"
        )
    return n_segments


def delta_grad(
    x: torch.Tensor,
    gy: torch.Tensor,
    U: torch.Tensor,
    Vh: torch.Tensor,
    segment_ids: torch.Tensor | None = None,
    *,
    n_segments: int | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """dS gradient of an SVD-basis Linear from its input x [..., d_in] and output gradient
    gy [..., d_out]: column sums of (x Vh^T) * (gy U) -> float32 [r].

    segment_ids: int64 [N], one id per row of x.reshape(-1, d_in) (e.g. the sequence index of each
    token), in any order -> per-segment sums float32 [n_segments, r]; n_segments defaults to
    max(segment_ids) + 1. Segments without rows get zero rows. Summing over segments gives the
    batch gradient.
    """
    check_tensor(x, "x")
    check_tensor(gy, "gy")
    d_out, _, d_in = _check_factors(U, Vh)
    if x.shape[-1] != d_in or gy.shape[-1] != d_out:
        raise ValueError(
            f"x [..., {d_in}] and gy [..., {d_out}] expected from U {tuple(U.shape)} and Vh "
            f"{tuple(Vh.shape)}, got x {tuple(x.shape)} and gy {tuple(gy.shape)}"
        )
    if x.shape[:-1] != gy.shape[:-1]:
        raise ValueError(
            f"x and gy must have the same leading shape, got {tuple(x.shape)} and {tuple(gy.shape)}"
        )
    device = check_same_device(x=x, gy=gy, U=U, Vh=Vh, segment_ids=segment_ids)
    if segment_ids is not None:
        n_segments = _check_segments(segment_ids, x.numel() // max(d_in, 1), n_segments)
    chosen = _resolve_backend("delta_grad", backend, device)
    del chosen  # reference and torch share one implementation until the kernels land
    return reference.delta_grad(x, gy, U, Vh, segment_ids, n_segments)


# ----------------------------------------------------------------------------------------------
# merge_weight
# ----------------------------------------------------------------------------------------------


def merge_weight(
    U: torch.Tensor,
    S: torch.Tensor,
    dS: torch.Tensor,
    Vh: torch.Tensor,
    *,
    base: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """W_eff = U diag(S + dS) Vh [d_out, d_in] in U.dtype (accumulated in float32).

    base: the dense weight W [d_out, d_in] that U, S, Vh decompose; when given, returns
    W + U diag(dS) Vh in base.dtype, which is exactly W at dS = 0.
    """
    d_out, _, d_in = _check_factors(U, Vh, S, dS)
    if base is not None:
        check_tensor(base, "base", dim=2)
        if tuple(base.shape) != (d_out, d_in):
            raise ValueError(f"base must be [{d_out}, {d_in}], got {tuple(base.shape)}")
    device = check_same_device(U=U, S=S, dS=dS, Vh=Vh, base=base)
    _resolve_backend("merge_weight", backend, device)
    return reference.merge_weight(U, S, dS, Vh, base)


# ----------------------------------------------------------------------------------------------
# project_
# ----------------------------------------------------------------------------------------------
# All four backends: "reference" (the oracle), "torch" (vectorised, vhack._projection), "cpp"
# (torch.ops.vhack_cpp.project_ from vhack._C: the CPU default when built) and "triton" (ONE launch
# of vhack.kernels.project for every module: the CUDA default). Registered here rather than in the
# _IMPLEMENTED table above so that edits to that table and to this section never touch one line.
_IMPLEMENTED["project_"] = ("reference", "torch", "triton", "cpp")


def _check_project(grad, offsets, basis, basis_offsets, ks, mode, alpha):
    check_tensor(grad, "grad", dim=1, contiguous=True)
    check_tensor(offsets, "offsets", dim=1, dtypes=(torch.int64,))
    check_tensor(basis, "basis", dim=1, dtypes=FLOAT_DTYPES, contiguous=True)
    check_tensor(basis_offsets, "basis_offsets", dim=1, dtypes=(torch.int64,))
    check_tensor(ks, "ks", dim=1, dtypes=(torch.int64,))
    if mode not in reference.PROJECTION_MODES:
        raise ValueError(f"mode must be one of {reference.PROJECTION_MODES}, got {mode!r}")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        raise TypeError(f"alpha must be a Python number, got {type(alpha).__name__}")
    if not math.isfinite(alpha):
        raise ValueError(f"alpha must be finite, got {alpha}")
    n_modules = offsets.shape[0] - 1
    if n_modules < 0:
        raise ValueError("offsets must have M + 1 >= 1 entries")
    if basis_offsets.shape[0] != n_modules + 1 or ks.shape[0] != n_modules:
        raise ValueError(
            f"offsets has {n_modules + 1} entries (M = {n_modules}), so basis_offsets needs "
            f"{n_modules + 1} and ks {n_modules}; got {basis_offsets.shape[0]} and {ks.shape[0]}"
        )
    if grad.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            "project_ modifies grad in place, but grad requires grad: pass a gradient "
            "(param.grad) or a detached tensor, or call it under torch.no_grad()"
        )
    return check_same_device(
        grad=grad, offsets=offsets, basis=basis, basis_offsets=basis_offsets, ks=ks
    )


def _project_backend(backend: str | None, device: torch.device, grad, basis) -> str:
    """The backend for project_; float64 stays off the Triton kernel (float32 accumulation) unless
    backend='triton' is asked for explicitly, which is then refused."""
    chosen = _resolve_backend("project_", backend, device)
    if chosen == "triton" and torch.float64 in (grad.dtype, basis.dtype):
        if backend == "triton":
            raise TypeError(
                "project_: backend='triton' takes float32/bfloat16/float16 grad and basis (it "
                "accumulates in float32); use backend='torch' or 'cpp' for float64"
            )
        return "torch"
    return chosen


def _project_impl(grad, offsets, basis, basis_offsets, ks, mode, alpha, preserve, backend):
    """Run project_ on a resolved backend; inputs already checked. Returns float32 [M, 4]."""
    grad = grad.detach()
    layout = layout_for(offsets, basis_offsets, ks, grad.numel(), basis.numel())
    if backend == "reference":
        return reference.project_(
            grad, offsets, basis, basis_offsets, ks, mode, alpha, preserve
        ).float()
    if backend == "triton":
        from vhack.kernels import project as kernels

        return kernels.project_(
            grad,
            offsets,
            basis,
            basis_offsets,
            ks,
            layout.order,
            layout.k_max,
            mode,
            alpha,
            preserve,
        )
    if backend == "cpp":
        if basis.dtype not in (torch.float32, torch.float64):
            basis = basis.float()  # the C++ op reads float32/float64 bases
        stats = empty((layout.n_modules, 4), torch.float32, grad.device)
        torch.ops.vhack_cpp.project_(
            grad, offsets, basis, basis_offsets, ks, stats, mode, alpha, preserve
        )
        return stats
    return project_torch_(grad, basis, layout, mode, alpha, preserve)


@torch.library.custom_op("vhack::project_", mutates_args=("grad",))
def _project_op(
    grad: torch.Tensor,
    offsets: torch.Tensor,
    basis: torch.Tensor,
    basis_offsets: torch.Tensor,
    ks: torch.Tensor,
    projection_mode: str,  # not "mode": torch's mode redirection passes a keyword of that name
    alpha: float,
    preserve_magnitude: bool,
    backend: str,
) -> torch.Tensor:
    return _project_impl(
        grad,
        offsets,
        basis,
        basis_offsets,
        ks,
        projection_mode,
        alpha,
        preserve_magnitude,
        backend,
    )


@_project_op.register_fake
def _(grad, offsets, basis, basis_offsets, ks, projection_mode, alpha, preserve, backend):
    return grad.new_empty((offsets.shape[0] - 1, 4), dtype=torch.float32)


def project_(
    grad: torch.Tensor,
    offsets: torch.Tensor,
    basis: torch.Tensor,
    basis_offsets: torch.Tensor,
    ks: torch.Tensor,
    mode: str = "hackward",
    alpha: float = 1.0,
    *,
    preserve_magnitude: bool = False,
    backend: str | None = None,
) -> torch.Tensor:
    """Project every module's slice of the packed gradient in place; return float32 stats [M, 4].

    grad [R_total] packed (float32/bfloat16/float16; float64 off the Triton path), modified in
    place; offsets int64 [M + 1]; basis packed, module m's row-major k_max_m x r_m block at
    basis[basis_offsets[m]:basis_offsets[m+1]]; ks int64 [M] rows to use (0 = not projected). See
    `vhack.reference.project_` for the modes; stats columns: |Vg|, |relu(Vg)|, |g| before, after.
    Modules with a non-finite |g| (or c) are left untouched and show it in their stats.

    The layout's values are checked once per (offsets, basis_offsets, ks) tensors and cached
    (keyed by their identity and version): reuse the same index tensors across calls and the call
    makes no host synchronisation. Under torch.compile (and for fake or other tensor subclasses)
    the call goes through the custom op `torch.ops.vhack.project_` (grad declared mutated).
    """
    device = _check_project(grad, offsets, basis, basis_offsets, ks, mode, alpha)
    chosen = _project_backend(backend, device, grad, basis)
    args = (grad, offsets, basis, basis_offsets, ks, mode, float(alpha), bool(preserve_magnitude))
    if torch.compiler.is_compiling() or type(grad) is not torch.Tensor:  # traced, or fake
        return _project_op(*args, chosen)
    return _project_impl(*args, chosen)
