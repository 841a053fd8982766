"""Fused projection of every module's slice of a packed gradient: ONE Triton launch per call.

Layout (see ARCHITECTURE.md): module m owns grad[offsets[m]:offsets[m+1]] (length r_m) and the
row-major k_max_m x r_m block basis[basis_offsets[m]:basis_offsets[m+1]], of which the first ks[m]
rows V [k, r_m] are used. One program per module, launched largest module first (`order`), so a
module of r = 9728 starts before the r = 64 ones and the tail of the grid is short. Each program:

  sweep 1  (coefficients)  c = V g [K_PAD] and |g|^2, over r in BLOCK_R chunks, fp32 accumulation;
  mode     phi = alpha relu(c) | alpha c | 2 alpha c, or nothing ("measure");
  sweep 2  (apply)         g' = g - V^T phi written back in the gradient's dtype; |g'|^2 is
                           accumulated from the fp32 values written (measured, not derived from the
                           identity |g|^2 - 2 phi.c + |phi|^2, which assumes exactly orthonormal
                           rows and cancels badly when g lies in span(V));
  stats    [|c|, |relu(c)|, |g|, |g'|] of the module.

Sweep 2 walks the chunks in reverse so the chunks of V read last in sweep 1 (still in cache) are
reused first. With preserve_magnitude a middle sweep measures |g'| first and the final sweep writes
g' |g| / |g'|. Modules with k = 0 (masked loads: no basis traffic) or a non-finite |g| or c are left
untouched; their stats still show |g| (and the NaN/inf). No host synchronisation, no allocation
that depends on values: the caller passes `order` and `k_max` (known from the layout, computed once).

The coefficient and apply stages are separate jit functions, so a sharded projection (partial
coefficients per shard, all-reduce of the small c, then apply) can reuse them as two kernels.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from vhack.kernels.utils import check_same_device, check_tensor, empty, next_power_of_2

# The kernel's constexpr code of each mode. Keys: vhack.ops.modes.PROJECTION_MODES, in its order
# (mirrored, not imported: this package imports nothing from vhack; a test holds them equal).
MODES = {"hackward": 0, "both": 1, "reverse": 2, "measure": 3}
GRAD_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BASIS_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_INF = tl.constexpr(float("inf"))


@triton.jit
def _project_coefficients(
    grad_ptr, basis_ptr, lo, b0, r, k, K_PAD: tl.constexpr, BLOCK_R: tl.constexpr
):
    """c = V g [K_PAD] (rows >= k are 0) and |g|^2 of one module, fp32."""
    rows = tl.arange(0, K_PAD)
    row_ok = rows < k
    c = tl.zeros([K_PAD], dtype=tl.float32)
    gsq = tl.zeros([BLOCK_R], dtype=tl.float32)
    for start in range(0, r, BLOCK_R):
        cols = start + tl.arange(0, BLOCK_R)
        col_ok = cols < r
        g = tl.load(grad_ptr + lo + cols, mask=col_ok, other=0.0).to(tl.float32)
        gsq += g * g
        v = tl.load(
            basis_ptr + b0 + rows[:, None] * r + cols[None, :],
            mask=row_ok[:, None] & col_ok[None, :],
            other=0.0,
        ).to(tl.float32)
        c += tl.sum(v * g[None, :], axis=1)
    return c, tl.sum(gsq, axis=0)


@triton.jit
def _project_apply(
    grad_ptr,
    basis_ptr,
    lo,
    b0,
    r,
    k,
    phi,
    scale,
    WRITE: tl.constexpr,
    REVERSE: tl.constexpr,
    K_PAD: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """|scale (g - V^T phi)|^2 of one module; writes scale (g - V^T phi) into grad when WRITE."""
    rows = tl.arange(0, K_PAD)
    row_ok = rows < k
    n_blocks = tl.cdiv(r, BLOCK_R)
    nsq = tl.zeros([BLOCK_R], dtype=tl.float32)
    for i in range(0, n_blocks):
        if REVERSE:
            start = (n_blocks - 1 - i) * BLOCK_R
        else:
            start = i * BLOCK_R
        cols = start + tl.arange(0, BLOCK_R)
        col_ok = cols < r
        g = tl.load(grad_ptr + lo + cols, mask=col_ok, other=0.0).to(tl.float32)
        v = tl.load(
            basis_ptr + b0 + rows[:, None] * r + cols[None, :],
            mask=row_ok[:, None] & col_ok[None, :],
            other=0.0,
        ).to(tl.float32)
        out = (g - tl.sum(v * phi[:, None], axis=0)) * scale
        nsq += out * out
        if WRITE:
            tl.store(grad_ptr + lo + cols, out.to(grad_ptr.dtype.element_ty), mask=col_ok)
    return tl.sum(nsq, axis=0)


@triton.jit
def _project_fused_kernel(
    grad_ptr,
    offsets_ptr,
    basis_ptr,
    basis_offsets_ptr,
    ks_ptr,
    order_ptr,
    stats_ptr,
    alpha,
    MODE: tl.constexpr,
    PRESERVE: tl.constexpr,
    K_PAD: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    m = tl.load(order_ptr + tl.program_id(0)).to(tl.int64)
    lo = tl.load(offsets_ptr + m)
    r = tl.load(offsets_ptr + m + 1) - lo
    b0 = tl.load(basis_offsets_ptr + m)
    k = tl.load(ks_ptr + m)

    c, gsq = _project_coefficients(grad_ptr, basis_ptr, lo, b0, r, k, K_PAD, BLOCK_R)
    relu_c = tl.where(c < 0.0, 0.0, c)  # keeps a NaN (tl.maximum may drop it on GPU)
    csq = tl.sum(c * c, axis=0)
    norm_before = tl.sqrt(gsq)
    tl.store(stats_ptr + 4 * m, tl.sqrt(csq))
    tl.store(stats_ptr + 4 * m + 1, tl.sqrt(tl.sum(relu_c * relu_c, axis=0)))
    tl.store(stats_ptr + 4 * m + 2, norm_before)

    norm_after = norm_before
    if MODE != 3:  # noqa: SIM102 (a constexpr test: the measure mode compiles no apply sweep)
        # x < inf is False exactly for NaN and inf: a module is projected only when finite.
        if (k > 0) & (gsq < _INF) & (csq < _INF):
            if MODE == 0:
                phi = relu_c * alpha
            elif MODE == 1:
                phi = c * alpha
            else:
                phi = c * (2.0 * alpha)
            if PRESERVE:
                nsq = _project_apply(
                    grad_ptr, basis_ptr, lo, b0, r, k, phi, 1.0, False, True, K_PAD, BLOCK_R
                )
                # no rescale when |g'| <= 1e-5 |g| (reference.PRESERVE_MIN_RATIO): g lay in span(V)
                rescale = nsq > 1e-10 * gsq
                scale = tl.where(rescale, norm_before / tl.sqrt(tl.where(rescale, nsq, 1.0)), 1.0)
                nsq = _project_apply(
                    grad_ptr, basis_ptr, lo, b0, r, k, phi, scale, True, False, K_PAD, BLOCK_R
                )
            else:
                nsq = _project_apply(
                    grad_ptr, basis_ptr, lo, b0, r, k, phi, 1.0, True, True, K_PAD, BLOCK_R
                )
            norm_after = tl.sqrt(nsq)
    tl.store(stats_ptr + 4 * m + 3, norm_after)


def block_sizes(k_max: int) -> tuple[int, int, int]:
    """(K_PAD, BLOCK_R, num_warps) for modules of at most k_max basis rows: a [K_PAD, BLOCK_R]
    fp32 tile of 4096 values (16 x 256 for k = 12, 8 x 512 for k = 5)."""
    k_pad = next_power_of_2(max(k_max, 1))
    block_r = max(64, min(1024, 4096 // k_pad))
    return k_pad, block_r, 4


def project_(
    grad: torch.Tensor,
    offsets: torch.Tensor,
    basis: torch.Tensor,
    basis_offsets: torch.Tensor,
    ks: torch.Tensor,
    order: torch.Tensor,
    k_max: int,
    mode: str = "hackward",
    alpha: float = 1.0,
    preserve_magnitude: bool = False,
) -> torch.Tensor:
    """Project every module of the packed grad in place with one launch; return stats fp32 [M, 4].

    grad [R_total] float32/bfloat16/float16 (contiguous, modified in place); offsets,
    basis_offsets int64 [M + 1]; basis [..] float32 (bf16/fp16 accepted, read as fp32); ks int64
    [M]; order int64 [M]: a permutation of the modules, largest first (launch order); k_max: an
    upper bound of ks (sets the padded row count). The layout's values (offsets nondecreasing and
    in range, ks[m] r_m within module m's block, ks <= k_max) are the caller's contract, checked
    once per layout by vhack.ops; here only shapes, dtypes and devices are checked.
    """
    check_tensor(grad, "grad", dim=1, dtypes=GRAD_DTYPES, contiguous=True)
    check_tensor(basis, "basis", dim=1, dtypes=BASIS_DTYPES, contiguous=True)
    for name, t in (
        ("offsets", offsets),
        ("basis_offsets", basis_offsets),
        ("ks", ks),
        ("order", order),
    ):
        check_tensor(t, name, dim=1, dtypes=(torch.int64,), contiguous=True)
    n_modules = offsets.shape[0] - 1
    if (
        basis_offsets.shape[0] != n_modules + 1
        or ks.shape[0] != n_modules
        or order.shape[0] != n_modules
    ):
        raise ValueError(
            f"offsets has {n_modules + 1} entries, so basis_offsets needs {n_modules + 1} and ks, "
            f"order {n_modules}; got {basis_offsets.shape[0]}, {ks.shape[0]}, {order.shape[0]}"
        )
    if not isinstance(mode, str) or mode not in MODES:  # vhack.ops.modes.check_mode's error
        raise ValueError(f"mode must be one of {tuple(MODES)}, got {mode!r}")
    check_same_device(
        grad=grad, offsets=offsets, basis=basis, basis_offsets=basis_offsets, ks=ks, order=order
    )
    stats = empty((n_modules, 4), torch.float32, grad.device)
    if n_modules == 0:
        return stats
    k_pad, block_r, num_warps = block_sizes(k_max)
    _project_fused_kernel[(n_modules,)](
        grad,
        offsets,
        basis,
        basis_offsets,
        ks,
        order,
        stats,
        float(alpha),
        MODE=MODES[mode],
        PRESERVE=bool(preserve_magnitude),
        K_PAD=k_pad,
        BLOCK_R=block_r,
        num_warps=num_warps,
    )
    return stats
