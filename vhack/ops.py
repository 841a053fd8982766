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
    check_factors,
    check_same_device,
    check_tensor,
    empty,
    interpreter_enabled,
)

__all__ = ["backends", "delta_grad", "merge_weight", "project_", "svd_linear", "use_backend"]

BACKENDS = ("reference", "torch", "triton", "cpp")

# Which backends implement each op. Kernel and C++ modules add themselves here as they land.
_IMPLEMENTED: dict[str, tuple[str, ...]] = {
    "svd_linear": ("reference", "torch", "triton"),
    "delta_grad": ("reference", "torch", "triton"),
    "merge_weight": ("reference", "torch", "triton"),
    "project_": ("reference", "torch", "triton", "cpp"),
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


def _check_svd_linear(x, U, S, dS, Vh, bias, weight):
    check_tensor(x, "x")
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension [..., d_in]")
    d_out, _, d_in = check_factors(U, Vh, S, dS)
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
# SVD linear, dS gradient, merge: torch.library ops (svd_linear, delta_grad, merge_weight)
# ----------------------------------------------------------------------------------------------
# Each op is a torch.library custom op with a fake (shape) implementation and, where it is
# differentiable, an autograd formula, so torch.compile and fake tensors trace through them. The
# backend ("torch" or "triton") is resolved by the Python wrapper and passed in as a string; the
# "reference" backend never enters the custom ops (it stays plain eager autograd: the oracle).
# In eager mode svd_linear and delta_grad skip the custom-op dispatcher, which costs ~50 us per
# call on a slow host (an autograd.Function costs ~10 us), and call the same implementations
# directly: per-module Python overhead is paid on every forward and backward of every layer.


def _kernels():
    """vhack.kernels.svd_linear, imported on first use (it imports triton)."""
    from vhack.kernels import svd_linear as kernels

    return kernels


def _kernel_backend(op: str, backend: str | None, device: torch.device, *tensors) -> str:
    """_resolve_backend, except that float64 inputs stay on the torch path unless backend='triton'
    is asked for explicitly (the Triton kernels compute in float32 and refuse float64)."""
    chosen = _resolve_backend(op, backend, device)
    if chosen == "triton" and any(t is not None and t.dtype == torch.float64 for t in tensors):
        if backend == "triton":
            raise TypeError(
                f"{op}: backend='triton' takes float32/bfloat16/float16 tensors (it accumulates in "
                "float32); use backend='torch' for float64"
            )
        return "torch"
    return chosen


def _check_contiguous(**tensors: torch.Tensor | None) -> None:
    """The Triton kernels read these tensors as dense row-major blocks: refuse other strides."""
    for name, t in tensors.items():
        if t is not None and not t.is_contiguous():
            raise ValueError(
                f"{name} must be contiguous for backend='triton' (call .contiguous() on it once)"
            )


def _check_frozen(**tensors: torch.Tensor | None) -> None:
    if torch.is_grad_enabled():
        for name, t in tensors.items():
            if t is not None and t.requires_grad:
                raise ValueError(
                    f"{name} is a frozen constant of the SVD basis and gets no gradient; pass "
                    f"{name}.detach()"
                )


def _grad_dtype(backend: str, *tensors: torch.Tensor) -> torch.dtype:
    """dtype of a dS gradient: float32 (float64 on the torch path for float64 inputs)."""
    if backend == "triton":
        return torch.float32
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _tracing(x: torch.Tensor) -> bool:
    """True under torch.compile/export or for tensor subclasses (fake, functional tensors): then
    the registered custom op runs, which those tracers understand."""
    return torch.compiler.is_compiling() or type(x) is not torch.Tensor


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t [..., d] as contiguous rows [N, d] (a view when t is contiguous)."""
    return t.reshape(-1, t.shape[-1]).contiguous()


def _delta_grad_impl(
    x: torch.Tensor,
    gy: torch.Tensor,
    U: torch.Tensor,
    Vh: torch.Tensor,
    segment_ids: torch.Tensor | None,
    n_segments: int,
    backend: str,
) -> torch.Tensor:
    if backend == "triton":
        return _kernels().delta_grad(_rows(x), _rows(gy), U, Vh, segment_ids, n_segments)
    if segment_ids is None:
        return reference.delta_grad(x, gy, U, Vh)
    # Like the kernel, ignore (never index with) ids outside [0, n_segments): the range check
    # may have been skipped (check_ids=False).
    valid = (segment_ids >= 0) & (segment_ids < n_segments)
    ct = _grad_dtype(backend, x, gy, U, Vh)
    per_row = (_rows(x).to(ct) @ Vh.to(ct).T) * (_rows(gy).to(ct) @ U.to(ct))
    per_row = per_row * valid[:, None].to(ct)
    out = torch.zeros(n_segments, U.shape[1], dtype=ct, device=x.device)
    if n_segments == 0:
        return out
    return out.index_add_(0, torch.where(valid, segment_ids, 0), per_row)


def _svd_linear_forward_impl(x, U, S, dS, Vh, bias, weight, backend: str) -> torch.Tensor:
    if weight is not None:  # dense effective weight: one GEMM (cuBLAS on CUDA)
        b = bias.to(x.dtype) if bias is not None else None
        return torch.nn.functional.linear(x, weight.to(x.dtype), b)
    if backend == "triton":
        y = _kernels().svd_linear_forward(_rows(x), U, S, dS, Vh, bias)
        return y.reshape(*x.shape[:-1], U.shape[0])
    if _native_half(x, U):  # GEMMs in the 16-bit dtype (the BLAS accumulates in float32)
        h = _scale_columns(x @ Vh.T, S, dS)
        y = h @ U.T
        return y + bias.to(y.dtype) if bias is not None else y
    return reference.svd_linear(x, U, S, dS, Vh, bias)


def _native_half(x: torch.Tensor, U: torch.Tensor) -> bool:
    """Torch path: x and the factors share a 16-bit dtype, so forward and dx GEMMs run natively
    (like the kernels, which keep the [N, r] intermediate in that dtype too); the dS gradient
    still computes in float32."""
    return x.dtype == U.dtype and x.dtype in (torch.bfloat16, torch.float16)


def _scale_columns(h: torch.Tensor, S: torch.Tensor, dS: torch.Tensor) -> torch.Tensor:
    """h * (S + dS) along the last axis, computed in float32, returned in h.dtype."""
    return (h.float() * (S.float() + dS.float())).to(h.dtype)


def _svd_linear_backward_impl(
    x, gy, U, S, dS, Vh, weight, need_dx: bool, need_ds: bool, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx [..., d_in] in x.dtype, dS gradient [r]); an output not asked for is an empty [0]."""
    none = x.new_empty(0)
    if weight is not None and not (need_dx and need_ds and _dx_in_svd_basis(U, Vh, backend)):
        # dense forward: dx through W_eff (cuBLAS on CUDA), dS in the SVD basis
        gx = (gy @ weight.to(gy.dtype)).to(x.dtype) if need_dx else none
        g = _delta_grad_impl(x, gy, U, Vh, None, 0, backend) if need_ds else none
        return gx, g
    if backend == "triton":
        kernels = _kernels()
        if need_ds:
            gx, g = kernels.svd_linear_backward(_rows(x), _rows(gy), U, S, dS, Vh)
        else:
            gx, g = kernels.svd_linear_dx(_rows(gy), U, S, dS, Vh), none
        return (gx.reshape(x.shape) if need_dx else none), g
    if _native_half(gy, U):
        gx = (_scale_columns(gy @ U, S, dS) @ Vh).to(x.dtype) if need_dx else none
        g = _delta_grad_impl(x, gy, U, Vh, None, 0, backend) if need_ds else none
        return gx, g
    ct = _grad_dtype(backend, x, gy, U, Vh)
    gu = _rows(gy).to(ct) @ U.to(ct)  # gy U, once
    gx = none
    if need_dx:
        gx = ((gu * (S.to(ct) + dS.to(ct))) @ Vh.to(ct)).to(x.dtype).reshape(x.shape)
    g = ((_rows(x).to(ct) @ Vh.to(ct).T) * gu).sum(0) if need_ds else none
    return gx, g


def _dx_in_svd_basis(U: torch.Tensor, Vh: torch.Tensor, backend: str) -> bool:
    """With a dense W_eff, take dx = ((gy U) * (S + dS)) Vh from the fused dS kernel, which
    computes gy U anyway, instead of gy W_eff? Only on the Triton path and when it saves work:
    full rank r = d_in < d_out (Vh square, so U diag(S) Vh is W up to the factors' rounding),
    where it costs 2 T d_in^2 FLOPs instead of 2 T d_in d_out."""
    d_out, r = U.shape
    return backend == "triton" and r == Vh.shape[1] < d_out


def _svd_linear_setup_context(ctx, inputs, output) -> None:
    x, U, S, dS, Vh, bias, weight, backend = inputs
    ctx.save_for_backward(x, U, S, dS, Vh, weight)
    ctx.backend = backend
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _svd_linear_grads(ctx, gy, backward_fn) -> tuple:
    """Gradients for (x, U, S, dS, Vh, bias, weight, backend); backward_fn computes (dx, dS)."""
    x, U, S, dS, Vh, weight = ctx.saved_tensors
    needs = ctx.needs_input_grad
    need_dx, need_ds = needs[0], needs[2] or needs[3]
    gx = g = g_bias = None
    if need_dx or need_ds:
        gx, g = backward_fn(x, gy, U, S, dS, Vh, weight, need_dx, need_ds, ctx.backend)
    if needs[5]:
        g_bias = gy.reshape(-1, gy.shape[-1]).sum(0).to(ctx.bias_dtype)
    return (
        gx if need_dx else None,
        None,
        g.to(S.dtype) if needs[2] else None,
        g.to(dS.dtype) if needs[3] else None,
        None,
        g_bias,
        None,
        None,
    )


class _SVDLinearFunction(torch.autograd.Function):
    """The eager path of svd_linear: the custom op's implementations without its dispatcher."""

    @staticmethod
    def forward(ctx, x, U, S, dS, Vh, bias, weight, backend):
        _svd_linear_setup_context(ctx, (x, U, S, dS, Vh, bias, weight, backend), None)
        return _svd_linear_forward_impl(x, U, S, dS, Vh, bias, weight, backend)

    @staticmethod
    def backward(ctx, gy):
        return _svd_linear_grads(ctx, gy, _svd_linear_backward_impl)


@torch.library.custom_op("vhack::svd_linear", mutates_args=())
def _svd_linear_op(
    x: torch.Tensor,
    U: torch.Tensor,
    S: torch.Tensor,
    dS: torch.Tensor,
    Vh: torch.Tensor,
    bias: torch.Tensor | None,
    weight: torch.Tensor | None,
    backend: str,
) -> torch.Tensor:
    return _svd_linear_forward_impl(x, U, S, dS, Vh, bias, weight, backend)


@_svd_linear_op.register_fake
def _(x, U, S, dS, Vh, bias, weight, backend):
    return x.new_empty((*x.shape[:-1], U.shape[0]))


@torch.library.custom_op("vhack::svd_linear_backward", mutates_args=())
def _svd_linear_backward_op(
    x: torch.Tensor,
    gy: torch.Tensor,
    U: torch.Tensor,
    S: torch.Tensor,
    dS: torch.Tensor,
    Vh: torch.Tensor,
    weight: torch.Tensor | None,
    need_dx: bool,
    need_ds: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _svd_linear_backward_impl(x, gy, U, S, dS, Vh, weight, need_dx, need_ds, backend)


@_svd_linear_backward_op.register_fake
def _(x, gy, U, S, dS, Vh, weight, need_dx, need_ds, backend):
    gx = x.new_empty(x.shape) if need_dx else x.new_empty(0)
    g_dtype = _grad_dtype(backend, x, gy, U, Vh)
    g = x.new_empty((U.shape[1],) if need_ds else (0,), dtype=g_dtype if need_ds else x.dtype)
    return gx, g


def _svd_linear_autograd(ctx, gy):
    return _svd_linear_grads(ctx, gy, torch.ops.vhack.svd_linear_backward)


_svd_linear_op.register_autograd(_svd_linear_autograd, setup_context=_svd_linear_setup_context)


@torch.library.custom_op("vhack::delta_grad", mutates_args=())
def _delta_grad_op(
    x: torch.Tensor,
    gy: torch.Tensor,
    U: torch.Tensor,
    Vh: torch.Tensor,
    segment_ids: torch.Tensor | None,
    n_segments: int,
    backend: str,
) -> torch.Tensor:
    return _delta_grad_impl(x, gy, U, Vh, segment_ids, n_segments, backend)


@_delta_grad_op.register_fake
def _(x, gy, U, Vh, segment_ids, n_segments, backend):
    shape = (U.shape[1],) if segment_ids is None else (n_segments, U.shape[1])
    return x.new_empty(shape, dtype=_grad_dtype(backend, x, gy, U, Vh))


def _merge_weight_impl(U, S, dS, Vh, base, backend: str) -> torch.Tensor:
    if backend == "triton":
        return _kernels().merge_weight(U, S, dS, Vh, base)
    return reference.merge_weight(U, S, dS, Vh, base)


@torch.library.custom_op("vhack::merge_weight", mutates_args=())
def _merge_weight_op(
    U: torch.Tensor,
    S: torch.Tensor,
    dS: torch.Tensor,
    Vh: torch.Tensor,
    base: torch.Tensor | None,
    backend: str,
) -> torch.Tensor:
    return _merge_weight_impl(U, S, dS, Vh, base, backend)


@_merge_weight_op.register_fake
def _(U, S, dS, Vh, base, backend):
    dtype = base.dtype if base is not None else U.dtype
    return U.new_empty((U.shape[0], Vh.shape[1]), dtype=dtype)


def _merge_weight_setup_context(ctx, inputs, output) -> None:
    U, _, _, Vh, base, _ = inputs
    ctx.save_for_backward(U, Vh)
    ctx.has_base = base is not None


def _merge_weight_autograd(ctx, gW):
    # dW/dS_i = U[:, i] Vh[i, :]  ->  g_i = sum_{o, j} gW[o, j] U[o, i] Vh[i, j]
    U, Vh = ctx.saved_tensors
    needs = ctx.needs_input_grad
    g = None
    if needs[1] or needs[2]:
        ct = torch.float64 if gW.dtype == torch.float64 else torch.float32
        g = ((U.to(ct).T @ gW.to(ct)) * Vh.to(ct)).sum(1)
    g_S = g if needs[1] and not ctx.has_base else None  # the residual form does not use S
    g_dS = g if needs[2] else None
    g_base = gW if needs[4] else None
    return None, g_S, g_dS, None, g_base, None


_merge_weight_op.register_autograd(
    _merge_weight_autograd, setup_context=_merge_weight_setup_context
)


# ----------------------------------------------------------------------------------------------
# svd_linear
# ----------------------------------------------------------------------------------------------


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
    float64); bias [d_out] or None -> y [..., d_out] in x.dtype. U and Vh are constants (frozen;
    passing them with requires_grad raises).
    weight: optional precomputed W_eff [d_out, d_in] (e.g. a cached merge_weight(..., base=W));
    the forward then is a dense Linear while dS still gets its exact SVD-basis gradient (the fused
    dS kernel on CUDA). It must equal U diag(S + dS) Vh up to the base weight's reconstruction
    error. dx is gy W_eff, except on the Triton backend when r = d_in < d_out: then the dS kernel
    also emits (gy U) * (S + dS) and dx = that times Vh, 2 T d_in^2 instead of 2 T d_in d_out
    FLOPs, carrying W's reconstruction error in U/Vh's dtype (~2e-3 relative in bf16, next to
    bf16's own 2e-3 rounding of dx). Without weight, backend "triton" runs the fused factored
    kernels.
    backend="triton" needs float32/bfloat16/float16 tensors and contiguous U, S, dS, Vh, bias,
    weight (x may have any strides); float64 inputs take the torch path unless it is forced.
    """
    device = _check_svd_linear(x, U, S, dS, Vh, bias, weight)
    _check_frozen(U=U, Vh=Vh, weight=weight)
    chosen = _kernel_backend("svd_linear", backend, device, x, U, S, dS, Vh, bias, weight)
    if chosen == "reference":
        return reference.svd_linear(x, U, S, dS, Vh, bias)
    if chosen == "triton":
        _check_contiguous(U=U, S=S, dS=dS, Vh=Vh, bias=bias, weight=weight)
    if _tracing(x):
        return torch.ops.vhack.svd_linear(x, U, S, dS, Vh, bias, weight, chosen)
    return _SVDLinearFunction.apply(x, U, S, dS, Vh, bias, weight, chosen)


# ----------------------------------------------------------------------------------------------
# delta_grad
# ----------------------------------------------------------------------------------------------


def _check_segments(
    segment_ids: torch.Tensor, n_rows: int, n_segments: int | None, check_ids: bool
) -> int:
    check_tensor(segment_ids, "segment_ids", dim=1, dtypes=(torch.int64,))
    if segment_ids.shape[0] != n_rows:
        raise ValueError(
            f"segment_ids needs one id per row of x.reshape(-1, d_in): expected {n_rows}, got "
            f"{segment_ids.shape[0]}"
        )
    if n_segments is not None and (
        not isinstance(n_segments, int) or isinstance(n_segments, bool) or n_segments < 0
    ):
        raise ValueError(f"n_segments must be an int >= 0, got {n_segments!r}")
    if not check_ids:
        if n_segments is None:
            raise ValueError("check_ids=False needs n_segments (the default max(ids) + 1 syncs)")
        return n_segments
    return _check_segment_range(segment_ids, n_segments)


def _check_segment_range(segment_ids: torch.Tensor, n_segments: int | None = None) -> int:
    """Check that int64 segment_ids [N] lie in [0, n_segments) and return n_segments (default
    max(segment_ids) + 1). Costs one host sync: callers on a hot path check their ids once and
    then pass check_ids=False to delta_grad (Adapter.segment_grads does); the Triton kernels
    ignore out-of-range ids rather than write out of bounds either way."""
    n_rows = segment_ids.shape[0]
    lo, hi = torch.stack([segment_ids.min(), segment_ids.max()]).tolist() if n_rows else (0, -1)
    if n_segments is None:
        n_segments = hi + 1
    if lo < 0 or hi >= n_segments:
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
    check_ids: bool = True,
    backend: str | None = None,
) -> torch.Tensor:
    """dS gradient of an SVD-basis Linear from its input x [..., d_in] and output gradient
    gy [..., d_out]: column sums of (x Vh^T) * (gy U) -> float32 [r].

    segment_ids: int64 [N], one id per row of x.reshape(-1, d_in) (e.g. the sequence index of each
    token), in any order -> per-segment sums float32 [n_segments, r]; n_segments defaults to
    max(segment_ids) + 1. Segments without rows get zero rows. Summing over segments gives the
    batch gradient. Contiguous ids (each segment's rows together) are the fast case for the
    Triton kernel; shuffled ids are correct but slower.
    check_ids: verify that every id lies in [0, n_segments), which costs one host sync. Pass False
    (with n_segments) when the ids were checked once already: rows with out-of-range ids are then
    ignored rather than reported.
    No gradient formula is registered for it (it is itself a gradient).
    """
    check_tensor(x, "x")
    check_tensor(gy, "gy")
    d_out, _, d_in = check_factors(U, Vh)
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
        n_rows = math.prod(x.shape[:-1])
        n_segments = _check_segments(segment_ids, n_rows, n_segments, check_ids)
    chosen = _kernel_backend("delta_grad", backend, device, x, gy, U, Vh)
    if chosen == "reference":
        return reference.delta_grad(x, gy, U, Vh, segment_ids, n_segments)
    if chosen == "triton":
        _check_contiguous(U=U, Vh=Vh, segment_ids=segment_ids)
    if _tracing(x):
        return torch.ops.vhack.delta_grad(x, gy, U, Vh, segment_ids, n_segments or 0, chosen)
    return _delta_grad_impl(x, gy, U, Vh, segment_ids, n_segments or 0, chosen)


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
    W + U diag(dS) Vh in base.dtype, which is exactly W at dS = 0. Differentiable in S, dS, base.
    """
    d_out, _, d_in = check_factors(U, Vh, S, dS)
    if base is not None:
        check_tensor(base, "base", dim=2)
        if tuple(base.shape) != (d_out, d_in):
            raise ValueError(f"base must be [{d_out}, {d_in}], got {tuple(base.shape)}")
    device = check_same_device(U=U, S=S, dS=dS, Vh=Vh, base=base)
    _check_frozen(U=U, Vh=Vh)
    chosen = _kernel_backend("merge_weight", backend, device, U, S, dS, Vh, base)
    if chosen == "reference":
        return reference.merge_weight(U, S, dS, Vh, base)
    if chosen == "triton":
        _check_contiguous(U=U, S=S, dS=dS, Vh=Vh, base=base)
    differentiable = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (S, dS, base)
    )
    if _tracing(U) or differentiable:
        return torch.ops.vhack.merge_weight(U, S, dS, Vh, base, chosen)
    return _merge_weight_impl(U, S, dS, Vh, base, chosen)  # the adapter's per-step merges


# ----------------------------------------------------------------------------------------------
# project_
# ----------------------------------------------------------------------------------------------
# All four backends: "reference" (the oracle), "torch" (vectorised, vhack._projection), "cpp"
# (torch.ops.vhack_cpp.project_ from vhack._C: the CPU default when built) and "triton" (ONE launch
# of vhack.kernels.project for every module: the CUDA default).


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
