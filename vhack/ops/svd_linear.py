"""vhack.ops.svd_linear, delta_grad and merge_weight: input checks, backend dispatch, and their
torch.library registration. Mirrors vhack/kernels/svd_linear.py (the Triton kernels); the torch
path is vhack/ops/svd_linear_torch.py, the oracle vhack/reference.py.

Each op is a torch.library custom op with a fake (shape) implementation and, where it is
differentiable, an autograd formula, so torch.compile and fake tensors trace through them. The
backend ("torch" or "triton") is resolved by the Python wrapper and passed in as a string; the
"reference" backend never enters the custom ops (it stays plain eager autograd: the oracle).
In eager mode svd_linear and delta_grad skip the custom-op dispatcher, which costs ~50 us per
call on a slow host (an autograd.Function costs ~10 us), and call the same implementations
directly: per-module Python overhead is paid on every forward and backward of every layer.

Factors with any strides are accepted (torch.linalg.svd returns a non-contiguous Vh^T view, for
example): the Triton path copies a non-contiguous factor once per call, the torch path reads it
as it is.
"""

from __future__ import annotations

import math

import torch

from vhack import reference
from vhack.kernels.utils import check_factors, check_same_device, check_tensor
from vhack.ops.dispatch import choose_backend
from vhack.ops.svd_linear_torch import (
    delta_grad_torch,
    grad_dtype,
    merge_weight_torch,
    rows,
    svd_linear_backward_torch,
    svd_linear_forward_torch,
)

__all__ = ["check_segment_range", "delta_grad", "merge_weight", "svd_linear"]


def _kernels():
    """vhack.kernels.svd_linear, imported on first use (it imports triton)."""
    from vhack.kernels import svd_linear as kernels

    return kernels


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


def _dense(t: torch.Tensor | None) -> torch.Tensor | None:
    """t itself when contiguous, else one contiguous copy: the Triton kernels read dense
    row-major blocks."""
    return t if t is None or t.is_contiguous() else t.contiguous()


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
    return torch.float32 if backend == "triton" else grad_dtype(*tensors)


def _tracing(x: torch.Tensor) -> bool:
    """True under torch.compile/export or for tensor subclasses (fake, functional tensors): then
    the registered custom op runs, which those tracers understand."""
    return torch.compiler.is_compiling() or type(x) is not torch.Tensor


# ----------------------------------------------------------------------------------------------
# Implementations on a resolved backend
# ----------------------------------------------------------------------------------------------


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
        return _kernels().delta_grad(rows(x), rows(gy), U, Vh, segment_ids, n_segments)
    return delta_grad_torch(x, gy, U, Vh, segment_ids, n_segments)


def _svd_linear_forward_impl(x, U, S, dS, Vh, bias, weight, backend: str) -> torch.Tensor:
    if weight is not None:  # dense effective weight: one GEMM (cuBLAS on CUDA)
        b = bias.to(x.dtype) if bias is not None else None
        return torch.nn.functional.linear(x, weight.to(x.dtype), b)
    if backend == "triton":
        y = _kernels().svd_linear_forward(rows(x), U, S, dS, Vh, bias)
        return y.reshape(*x.shape[:-1], U.shape[0])
    return svd_linear_forward_torch(x, U, S, dS, Vh, bias)


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
            gx, g = kernels.svd_linear_backward(rows(x), rows(gy), U, S, dS, Vh)
        else:
            gx, g = kernels.svd_linear_dx(rows(gy), U, S, dS, Vh), none
        return (gx.reshape(x.shape) if need_dx else none), g
    return svd_linear_backward_torch(x, gy, U, S, dS, Vh, need_dx, need_ds)


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
    return merge_weight_torch(U, S, dS, Vh, base)


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
    backend="triton" needs float32/bfloat16/float16 tensors, and reads U, S, dS, Vh, bias and
    weight (any strides: a non-contiguous factor is copied once per call on the Triton path);
    float64 inputs take the torch path unless backend='triton' is forced (then TypeError).
    """
    device = _check_svd_linear(x, U, S, dS, Vh, bias, weight)
    _check_frozen(U=U, Vh=Vh, weight=weight)
    chosen = choose_backend("svd_linear", backend, device, x, U, S, dS, Vh, bias, weight)
    if chosen == "reference":
        return reference.svd_linear(x, U, S, dS, Vh, bias)
    if chosen == "triton":
        U, S, dS, Vh, bias, weight = map(_dense, (U, S, dS, Vh, bias, weight))
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
    return check_segment_range(segment_ids, n_segments)


def check_segment_range(segment_ids: torch.Tensor, n_segments: int | None = None) -> int:
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
    chosen = choose_backend("delta_grad", backend, device, x, gy, U, Vh)
    if chosen == "reference":
        return reference.delta_grad(x, gy, U, Vh, segment_ids, n_segments)
    if chosen == "triton":
        U, Vh, segment_ids = map(_dense, (U, Vh, segment_ids))
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
    chosen = choose_backend("merge_weight", backend, device, U, S, dS, Vh, base)
    if chosen == "reference":
        return reference.merge_weight(U, S, dS, Vh, base)
    if chosen == "triton":
        U, S, dS, Vh, base = map(_dense, (U, S, dS, Vh, base))
    differentiable = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (S, dS, base)
    )
    if _tracing(U) or differentiable:
        return torch.ops.vhack.merge_weight(U, S, dS, Vh, base, chosen)
    return _merge_weight_impl(U, S, dS, Vh, base, chosen)  # the adapter's per-step merges
