"""Triton kernels of the SVD-basis Linear, installed as `vhack.kernels.svd_linear`.

Notation: x [N, d_in] (token rows), U [d_out, r], S and dS [r] float32, Vh [r, d_in], s = S + dS,
y = ((x Vh^T) * s) U^T + bias [N, d_out]; gy = dL/dy.

Two kernels serve every stage:
  _svd_linear_matmul_kernel  C = ((A * s_K) @ B) * s_N + bias + addend: one tiled GEMM whose
                             optional terms are fused into its prologue (a scale along K) or its
                             epilogue (a scale along N, a bias row, a dense addend). It runs
                             forward GEMM 1 (h = (x Vh^T) * s, the scale in the epilogue), forward
                             GEMM 2 (y = h U^T + bias), the dX GEMM (dx = g_h Vh) and the merge
                             (W = (U * s) Vh, or base + (U * dS) Vh).
  _svd_linear_dS_kernel      the dS gradient: for a block of token rows and a block of the rank it
                             computes z = x Vh^T and gu = gy U in registers, reduces z * gu over
                             the rows, and writes a partial sum per row block (batch gradient, summed
                             afterwards in a fixed order: deterministic) or adds each segment's sum
                             into out[segment] (per-segment gradients, fp32 atomics). Optionally it
                             also stores g_h = gu * s, which the dX GEMM of the factored backward
                             consumes, so gy U is computed once.

x Vh^T is recomputed in the dS kernel instead of being kept from the forward: the training path
(SVDLinear) runs a dense merged forward that never forms it, and keeping it would cost N * r
activations per module (see bench/SVD_LINEAR_NOTES.md).

Accumulation is always float32. x, gy, U, Vh, bias, base may be float32, bfloat16 or float16; S,
dS and every dS gradient are float32. Operands of different dtypes, float32 operands and every
operand under the interpreter (no bf16 dot there) are multiplied as float32, with tf32 only on CUDA
when torch allows it (torch.get_float32_matmul_precision() != "highest"); same-dtype 16-bit operands
multiply natively on CUDA. Block sizes come from a fixed table (`_gemm_blocks`, `_dS_blocks`): no
autotuning, so a launch never benchmarks itself and stays CUDA-graph friendly.

Segment ids (per-segment dS): int64 [N], one per row, in ANY order. Each row block loops over the
id range it touches, so contiguous ids (the natural [B, T] layout) cost one or two segments per
block, while shuffled ids cost up to the number of segments per block (still correct). Ids outside
[0, n_segments) are ignored, never written out of bounds; checking them costs a host sync, which
`vhack.ops.delta_grad` does unless told the ids were already checked.

Every launch function validates its inputs (dtype, rank, shape, contiguity, device) and raises
TypeError/ValueError before launching anything.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from vhack.kernels.utils import (
    check_factors,
    check_same_device,
    check_tensor,
    empty,
    interpreter_enabled,
)

__all__ = [
    "delta_grad",
    "merge_weight",
    "svd_linear_backward",
    "svd_linear_dx",
    "svd_linear_forward",
]

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_HALF = (torch.bfloat16, torch.float16)

# Scale modes of _svd_linear_matmul_kernel.
_NO_SCALE, _SCALE_K, _SCALE_N = 0, 1, 2


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


# Offsets. A tile's base address (its first row and column: row0 x row stride + col0 x column
# stride) is computed in int64: it can exceed 2^31 elements (a [T, d] activation with T d > 2^31).
# Offsets inside a tile are int32: up to BLOCK rows times a stride along one axis, and along the
# reduction axis up to (K + BLOCK_K) times its stride (the K loop indexes from the tile base; the
# masked lanes of the last step still form addresses). The launch functions check that each axis
# stays below 2^30 (_check_int32_offsets), so the sum of two axes stays below 2^31; only a factor
# of over ~10^9 elements, or a row stride over ~8 M, fails: far beyond any linear layer.
# Measured with ptxas for sm_90 (tests/sm90_compile_check.py): int64 offsets everywhere kept the
# 128x128 GEMM tiles at 255 registers with 20-96 B of spills; these have none. Offsets are formed
# from k0 inside the loop: a loop-invariant [BLOCK, BLOCK] offset tensor added to a moving base
# pointer gets hoisted and stays live in registers (the fp32 decode tile then spilled).


@triton.jit
def _tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """This program's output tile of an [M, N] grid: (tile_m, tile_n) and, per axis, the int64
    start row/column and the int32 in-tile index with its mask: (tile_m, row0, rm, mask_m, col0,
    rn, mask_n). Programs walk GROUP_M row tiles per column sweep (L2 reuse of B's columns)."""
    pid = tl.program_id(0)
    n_tiles_m = tl.cdiv(M, BLOCK_M)
    per_group = GROUP_M * tl.cdiv(N, BLOCK_N)
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(n_tiles_m - first_m, GROUP_M)
    tile_m = first_m + (pid % per_group) % group_rows
    tile_n = (pid % per_group) // group_rows
    rm = tl.arange(0, BLOCK_M)
    rn = tl.arange(0, BLOCK_N)
    mask_m = rm < M - tile_m * BLOCK_M
    mask_n = rn < N - tile_n * BLOCK_N
    row0 = tile_m.to(tl.int64) * BLOCK_M
    col0 = tile_n.to(tl.int64) * BLOCK_N
    return tile_m, row0, rm, mask_m, col0, rn, mask_n


@triton.jit
def _accumulate_tile(
    acc,
    a_ptr,
    stride_am,
    stride_ak,
    b_ptr,
    stride_bk,
    stride_bn,
    row0,
    rm,
    mask_m,
    col0,
    rn,
    mask_n,
    K,
    s1_ptr,
    s2_ptr,
    SCALE_K: tl.constexpr,
    SCALE_SUM: tl.constexpr,
    DOT_F32: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """acc [BM, BN] += (A[rows, :] * s along K) @ B[:, cols] over K in BLOCK_K steps, rows =
    row0 + rm, cols = col0 + rn, where A[m, k] = a_ptr[m * stride_am + k * stride_ak] and
    B[k, n] = b_ptr[k * stride_bk + n * stride_bn]; with SCALE_K, A's columns are scaled by
    s = s1 (+ s2) as they load. int64 tile bases, int32 in-tile offsets (see above)."""
    rk = tl.arange(0, BLOCK_K)
    a_tile = a_ptr + row0 * stride_am
    b_tile = b_ptr + col0 * stride_bn
    for k0 in range(0, K, BLOCK_K):
        mask_k = rk < K - k0
        ks = k0 + rk  # int32: (K + BLOCK_K) x stride_k < 2^30 (checked at launch)
        a_offs = rm[:, None] * stride_am + ks[None, :] * stride_ak
        b_offs = ks[:, None] * stride_bk + rn[None, :] * stride_bn
        a = tl.load(a_tile + a_offs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(b_tile + b_offs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        if SCALE_K:
            s = tl.load(s1_ptr + k0 + rk, mask=mask_k, other=0.0)
            if SCALE_SUM:
                s += tl.load(s2_ptr + k0 + rk, mask=mask_k, other=0.0)
            a = (a.to(tl.float32) * s[None, :]).to(a.dtype)
        if DOT_F32:
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=PRECISION)
        else:
            acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _svd_linear_matmul_kernel(
    a_ptr,
    b_ptr,
    c_ptr,
    s1_ptr,
    s2_ptr,
    bias_ptr,
    add_ptr,
    M,
    N,
    K,
    stride_am,
    stride_ak,
    stride_bk,
    stride_bn,
    SCALE: tl.constexpr,  # 0: none; 1: A's columns (along K) by s; 2: C's columns (along N) by s
    SCALE_SUM: tl.constexpr,  # s = s1 + s2 (else s = s1)
    HAS_BIAS: tl.constexpr,
    HAS_ADD: tl.constexpr,  # add a dense [M, N] addend laid out like C
    DOT_F32: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """C [M, N] (contiguous) = ((A * s along K) @ B) * (s along N) + bias + addend, fp32 accum."""
    _, row0, rm, mask_m, col0, rn, mask_n = _tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = _accumulate_tile(
        acc, a_ptr, stride_am, stride_ak, b_ptr, stride_bk, stride_bn, row0, rm, mask_m, col0,
        rn, mask_n, K, s1_ptr, s2_ptr, SCALE == 1, SCALE_SUM, DOT_F32, PRECISION, BLOCK_K,
    )  # fmt: skip

    if SCALE == 2:
        s = tl.load(s1_ptr + col0 + rn, mask=mask_n, other=0.0)
        if SCALE_SUM:
            s += tl.load(s2_ptr + col0 + rn, mask=mask_n, other=0.0)
        acc = acc * s[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + col0 + rn, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    c_base = row0 * N + col0  # int64; the in-tile part below is int32
    c_offs = rm[:, None] * N + rn[None, :]
    c_mask = mask_m[:, None] & mask_n[None, :]
    if HAS_ADD:
        acc += tl.load(add_ptr + c_base + c_offs, mask=c_mask, other=0.0).to(tl.float32)
    tl.store(c_ptr + c_base + c_offs, acc.to(c_ptr.dtype.element_ty), mask=c_mask)


@triton.jit
def _svd_linear_dS_kernel(
    x_ptr,
    gy_ptr,
    u_ptr,
    vh_ptr,
    s_ptr,
    ds_ptr,
    seg_ptr,
    out_ptr,
    gh_ptr,
    n_rows,
    d_in,
    d_out,
    r,
    n_segments,
    PER_SEGMENT: tl.constexpr,
    STORE_GH: tl.constexpr,
    DOT_F32: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """Column sums of (x Vh^T) * (gy U) over a block of rows, for a block of the rank.

    Batch: out [n_row_blocks, r] gets this block's partial sum (summed by the caller).
    PER_SEGMENT: out [n_segments, r] (zero-initialised) += each segment's sum (atomics).
    STORE_GH: also g_h [n_rows, r] = (gy U) * (S + dS), in g_h's dtype.
    """
    tile_m, row0, rm, mask_m, col0, rr, mask_r = _tile(n_rows, r, BLOCK_M, BLOCK_R, GROUP_M)

    # z = x Vh^T and gu = gy U for this tile, both kept in registers. Vh [r, d_in] is read as
    # its transpose; U [d_out, r] as is.
    z = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    z = _accumulate_tile(
        z, x_ptr, d_in, 1, vh_ptr, 1, d_in, row0, rm, mask_m, col0, rr, mask_r, d_in,
        s_ptr, ds_ptr, False, False, DOT_F32, PRECISION, BLOCK_K,
    )  # fmt: skip
    gu = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    gu = _accumulate_tile(
        gu, gy_ptr, d_out, 1, u_ptr, r, 1, row0, rm, mask_m, col0, rr, mask_r, d_out,
        s_ptr, ds_ptr, False, False, DOT_F32, PRECISION, BLOCK_K,
    )  # fmt: skip

    if STORE_GH:
        s = tl.load(s_ptr + col0 + rr, mask=mask_r, other=0.0)
        s += tl.load(ds_ptr + col0 + rr, mask=mask_r, other=0.0)
        tl.store(
            gh_ptr + (row0 * r + col0) + (rm[:, None] * r + rr[None, :]),
            (gu * s[None, :]).to(gh_ptr.dtype.element_ty),
            mask=mask_m[:, None] & mask_r[None, :],
        )

    prod = z * gu  # rows past n_rows are zero: their x and gy loads were masked to 0
    if PER_SEGMENT:
        seg = tl.load(seg_ptr + row0 + rm, mask=mask_m, other=-1)
        valid = (seg >= 0) & (seg < n_segments)
        seg = tl.where(valid, seg, -1)
        first = tl.min(tl.where(valid, seg, n_segments), 0)
        last = tl.max(seg, 0)
        # The id range this block touches: 1-2 segments for contiguous ids, empty if none valid.
        for seg_id in range(first, last + 1):
            part = tl.sum(tl.where((seg == seg_id)[:, None], prod, 0.0), 0)
            out_row = out_ptr + (seg_id * r + col0)  # seg_id is int64 (the ids' dtype)
            tl.atomic_add(out_row + rr, part, mask=mask_r, sem="relaxed")
    else:
        part = tl.sum(prod, 0)
        tl.store(out_ptr + (tile_m.to(tl.int64) * r + col0) + rr, part, mask=mask_r)


# ----------------------------------------------------------------------------------------------
# Block sizes and dot precision
# ----------------------------------------------------------------------------------------------


def _gemm_blocks(M: int, N: int, K: int, dtype: torch.dtype, device: torch.device) -> dict:
    """Block sizes, warps and stages of _svd_linear_matmul_kernel for C [M, N] with depth K.

    Interpreter: 32 (its cost is per program and per K step, so not smaller; test shapes up to
    ~70 still span several tiles and K steps). CUDA: a
    fixed table, by M (decode-sized M gets a short row tile); not tuned on hardware yet.
    """
    if device.type != "cuda":
        return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=4, num_warps=1, num_stages=1)
    block_k = 32 if dtype == torch.float32 else 64
    if M <= 16:
        return dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=4)
    if M <= 64:
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=block_k, GROUP_M=8, num_warps=4, num_stages=4)
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=block_k, GROUP_M=8, num_warps=8, num_stages=3)


def _dS_blocks(n_rows: int, r: int, dtype: torch.dtype, device: torch.device) -> dict:
    """Block sizes of _svd_linear_dS_kernel (two [BLOCK_M, BLOCK_R] fp32 accumulators live)."""
    if device.type != "cuda":
        return dict(BLOCK_M=32, BLOCK_R=32, BLOCK_K=32, GROUP_M=4, num_warps=1, num_stages=1)
    block_k = 32 if dtype == torch.float32 else 64
    if n_rows <= 64:
        block_m = max(16, triton.next_power_of_2(n_rows))
        return dict(
            BLOCK_M=block_m, BLOCK_R=64, BLOCK_K=block_k, GROUP_M=1, num_warps=4, num_stages=3
        )
    return dict(BLOCK_M=128, BLOCK_R=64, BLOCK_K=block_k, GROUP_M=8, num_warps=8, num_stages=3)


def _dot_mode(*operands: torch.Tensor) -> tuple[bool, str]:
    """(DOT_F32, PRECISION) for a kernel whose dots multiply these operands.

    Same-dtype 16-bit operands multiply natively on CUDA; anything else (float32, mixed dtypes,
    and everything under the interpreter, which has no bf16 dot) is cast to float32, multiplied
    as tf32 only on CUDA when torch allows tf32 matmuls.
    """
    on_cuda = operands[0].device.type == "cuda"
    dtypes = {t.dtype for t in operands}
    native = on_cuda and len(dtypes) == 1 and dtypes <= set(_HALF)
    tf32 = on_cuda and torch.get_float32_matmul_precision() != "highest"
    return (not native), ("tf32" if tf32 else "ieee")


# ----------------------------------------------------------------------------------------------
# Input checks
# ----------------------------------------------------------------------------------------------


def _check_kernel_tensor(t: torch.Tensor, name: str, dim: int, dtypes=KERNEL_DTYPES) -> None:
    check_tensor(t, name, dim=dim, dtypes=dtypes, contiguous=True)


def _check_device(**tensors: torch.Tensor | None) -> torch.device:
    device = check_same_device(**tensors)
    if device.type != "cuda" and not interpreter_enabled():
        raise RuntimeError(
            f"the Triton kernels need CUDA tensors, or TRITON_INTERPRET=1 set before triton is "
            f"imported to run on {device.type} tensors"
        )
    return device


def _check_factors(
    U: torch.Tensor, Vh: torch.Tensor, S: torch.Tensor | None, dS: torch.Tensor | None
) -> tuple[int, int, int]:
    """U [d_out, r], Vh [r, d_in] (same dtype), S and dS [r] float32 -> (d_out, r, d_in)."""
    return check_factors(
        U, Vh, S, dS, dtypes=KERNEL_DTYPES, s_dtypes=(torch.float32,), contiguous=True
    )


def _check_rows(t: torch.Tensor, name: str, width: int, what: str) -> None:
    _check_kernel_tensor(t, name, 2)
    if t.shape[1] != width:
        raise ValueError(f"{name} must be [N, {width}] ({what}), got {tuple(t.shape)}")


def _check_x_gy(x: torch.Tensor, gy: torch.Tensor, d_in: int, d_out: int) -> None:
    """x [N, d_in] and gy [N, d_out]: the inputs of a backward, one row each per token."""
    _check_rows(x, "x", d_in, "d_in")
    _check_rows(gy, "gy", d_out, "d_out")
    if x.shape[0] != gy.shape[0]:
        raise ValueError(f"x and gy must have the same rows, got {x.shape[0]} and {gy.shape[0]}")


def _check_bias(bias: torch.Tensor | None, d_out: int) -> None:
    if bias is not None:
        _check_kernel_tensor(bias, "bias", 1)
        if bias.shape[0] != d_out:
            raise ValueError(f"bias must have length d_out = {d_out}, got {tuple(bias.shape)}")


def _intermediate_dtype(U: torch.Tensor) -> torch.dtype:
    """dtype of the [N, r] intermediates h and g_h: U's when 16-bit (so the next GEMM multiplies
    natively), else float32."""
    return U.dtype if U.dtype in _HALF else torch.float32


# ----------------------------------------------------------------------------------------------
# Launches
# ----------------------------------------------------------------------------------------------


# Largest in-tile offset along one axis that the kernels address in int32 (see "Offsets"): two
# axes add up to less than 2^31.
_INT32_AXIS_LIMIT = 2**30


def _check_int32_offsets(**extents: int) -> None:
    """Raise ValueError unless every in-tile offset extent (largest index along one axis times
    its stride) is below 2^30, so the kernels' int32 in-tile offsets cannot overflow."""
    for name, extent in extents.items():
        if extent >= _INT32_AXIS_LIMIT:
            raise ValueError(
                f"{name} spans {extent} elements within one tile, too many for the kernels' int32 "
                f"in-tile offsets (limit 2^30); use backend='torch' for this shape"
            )


def _matmul(
    a: torch.Tensor,
    b: torch.Tensor,
    b_strides: tuple[int, int],
    out: torch.Tensor,
    *,
    scale: tuple[int, torch.Tensor, torch.Tensor | None] | None = None,
    bias: torch.Tensor | None = None,
    addend: torch.Tensor | None = None,
) -> torch.Tensor:
    """out [M, N] = ((a * s along K) @ b) * (s along N) + bias + addend; inputs already checked.

    a [M, K] contiguous; b is read as [K, N] through b_strides (stride along K, along N);
    scale = (axis, s1, s2 or None) with axis _SCALE_K or _SCALE_N and s = s1 (+ s2).
    """
    M, K = a.shape
    N = out.shape[1]
    if M == 0 or N == 0:
        return out
    mode, s1, s2 = scale if scale is not None else (_NO_SCALE, None, None)
    dot_f32, precision = _dot_mode(a, b)
    cfg = _gemm_blocks(M, N, K, a.dtype, a.device)
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    _check_int32_offsets(
        a_rows=bm * abs(a.stride(0)), a_along_K=(K + bk) * abs(a.stride(1)),
        b_along_K=(K + bk) * abs(b_strides[0]), b_columns=bn * abs(b_strides[1]), out_rows=bm * N,
    )  # fmt: skip
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
    _svd_linear_matmul_kernel[grid](
        a,
        b,
        out,
        s1 if s1 is not None else out,
        s2 if s2 is not None else out,
        bias if bias is not None else out,
        addend if addend is not None else out,
        M,
        N,
        K,
        a.stride(0),
        a.stride(1),
        b_strides[0],
        b_strides[1],
        SCALE=mode,
        SCALE_SUM=s2 is not None,
        HAS_BIAS=bias is not None,
        HAS_ADD=addend is not None,
        DOT_F32=dot_f32,
        PRECISION=precision,
        **cfg,
    )
    return out


def _launch_dS(
    x: torch.Tensor,
    gy: torch.Tensor,
    U: torch.Tensor,
    Vh: torch.Tensor,
    *,
    segment_ids: torch.Tensor | None = None,
    n_segments: int = 0,
    S: torch.Tensor | None = None,
    dS: torch.Tensor | None = None,
    gh: torch.Tensor | None = None,
) -> torch.Tensor:
    """dS gradient [r] (or [n_segments, r] with segment_ids); inputs already checked. With gh
    (and S, dS), also stores g_h = (gy U) * (S + dS) into it."""
    n_rows, d_in = x.shape
    d_out, r = U.shape
    per_segment = segment_ids is not None
    if n_rows == 0 or r == 0:
        shape = (n_segments, r) if per_segment else (r,)
        return torch.zeros(shape, dtype=torch.float32, device=x.device)
    dot_f32, precision = _dot_mode(x, gy, U)
    cfg = _dS_blocks(n_rows, r, x.dtype, x.device)
    bm, br, bk = cfg["BLOCK_M"], cfg["BLOCK_R"], cfg["BLOCK_K"]
    _check_int32_offsets(
        x_rows=bm * d_in, x_along_d_in=d_in + bk, Vh_columns=br * d_in, gy_rows=bm * d_out,
        U_along_d_out=(d_out + bk) * r, g_h_rows=bm * r,
    )  # fmt: skip
    n_row_blocks = triton.cdiv(n_rows, cfg["BLOCK_M"])
    if per_segment:
        out = torch.zeros(n_segments, r, dtype=torch.float32, device=x.device)  # atomics add in
    else:
        out = empty((n_row_blocks, r), torch.float32, x.device)  # one partial per row block
    grid = (n_row_blocks * triton.cdiv(r, cfg["BLOCK_R"]),)
    _svd_linear_dS_kernel[grid](
        x,
        gy,
        U,
        Vh,
        S if S is not None else out,
        dS if dS is not None else out,
        segment_ids if per_segment else out,
        out,
        gh if gh is not None else out,
        n_rows,
        d_in,
        d_out,
        r,
        n_segments,
        PER_SEGMENT=per_segment,
        STORE_GH=gh is not None,
        DOT_F32=dot_f32,
        PRECISION=precision,
        **cfg,
    )
    return out if per_segment else out.sum(0)


def svd_linear_forward(
    x: torch.Tensor,
    U: torch.Tensor,
    S: torch.Tensor,
    dS: torch.Tensor,
    Vh: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = ((x Vh^T) * (S + dS)) U^T + bias: two GEMM launches, the scale fused into the first's
    epilogue and the bias into the second's.

    x [N, d_in]; U [d_out, r]; S, dS [r] float32; Vh [r, d_in]; bias [d_out] or None, all
    contiguous -> y [N, d_out] in x.dtype. The intermediate h [N, r] is U.dtype when U is 16-bit,
    else float32.
    """
    d_out, r, d_in = _check_factors(U, Vh, S, dS)
    _check_rows(x, "x", d_in, "d_in")
    _check_bias(bias, d_out)
    _check_device(x=x, U=U, S=S, dS=dS, Vh=Vh, bias=bias)
    n_rows = x.shape[0]
    h = empty((n_rows, r), _intermediate_dtype(U), x.device)
    _matmul(x, Vh, (Vh.stride(1), Vh.stride(0)), h, scale=(_SCALE_N, S, dS))
    y = empty((n_rows, d_out), x.dtype, x.device)
    return _matmul(h, U, (U.stride(1), U.stride(0)), y, bias=bias)


def svd_linear_dx(
    gy: torch.Tensor, U: torch.Tensor, S: torch.Tensor, dS: torch.Tensor, Vh: torch.Tensor
) -> torch.Tensor:
    """dx = ((gy U) * (S + dS)) Vh [N, d_in] in gy.dtype (two GEMMs; no dS gradient)."""
    d_out, r, d_in = _check_factors(U, Vh, S, dS)
    _check_rows(gy, "gy", d_out, "d_out")
    _check_device(gy=gy, U=U, S=S, dS=dS, Vh=Vh)
    gh = empty((gy.shape[0], r), _intermediate_dtype(U), gy.device)
    _matmul(gy, U, (U.stride(0), U.stride(1)), gh, scale=(_SCALE_N, S, dS))
    gx = empty((gy.shape[0], d_in), gy.dtype, gy.device)
    return _matmul(gh, Vh, (Vh.stride(0), Vh.stride(1)), gx)


def svd_linear_backward(
    x: torch.Tensor,
    gy: torch.Tensor,
    U: torch.Tensor,
    S: torch.Tensor,
    dS: torch.Tensor,
    Vh: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx [N, d_in] in x.dtype, dS gradient [r] float32) of the factored SVD Linear.

    One dS-kernel launch computes gy U once, reduces (x Vh^T) * (gy U) over the rows (x Vh^T
    recomputed in registers) and stores g_h = (gy U) * (S + dS); one GEMM then gives dx = g_h Vh.
    """
    d_out, r, d_in = _check_factors(U, Vh, S, dS)
    _check_x_gy(x, gy, d_in, d_out)
    _check_device(x=x, gy=gy, U=U, S=S, dS=dS, Vh=Vh)
    gh = empty((x.shape[0], r), _intermediate_dtype(U), x.device)
    g = _launch_dS(x, gy, U, Vh, S=S, dS=dS, gh=gh)
    if x.shape[0] == 0:
        return empty((0, d_in), x.dtype, x.device), g
    gx = empty((x.shape[0], d_in), x.dtype, x.device)
    return _matmul(gh, Vh, (Vh.stride(0), Vh.stride(1)), gx), g


def delta_grad(
    x: torch.Tensor,
    gy: torch.Tensor,
    U: torch.Tensor,
    Vh: torch.Tensor,
    segment_ids: torch.Tensor | None = None,
    n_segments: int = 0,
) -> torch.Tensor:
    """dS gradient: column sums of (x Vh^T) * (gy U) -> float32 [r]; per segment with segment_ids.

    x [N, d_in], gy [N, d_out], U [d_out, r], Vh [r, d_in], contiguous. segment_ids: int64 [N] in
    any order -> float32 [n_segments, r]; rows whose id lies outside [0, n_segments) are ignored
    (the range is not checked here: that would cost a host sync). The batch result is summed over
    row blocks in a fixed order (deterministic); per-segment sums use fp32 atomics (the last bits
    may vary from run to run).
    """
    d_out, _, d_in = _check_factors(U, Vh, None, None)
    _check_x_gy(x, gy, d_in, d_out)
    if segment_ids is not None:
        _check_kernel_tensor(segment_ids, "segment_ids", 1, (torch.int64,))
        if segment_ids.shape[0] != x.shape[0]:
            raise ValueError(
                f"segment_ids needs one id per row of x: expected {x.shape[0]}, got "
                f"{segment_ids.shape[0]}"
            )
        if not isinstance(n_segments, int) or n_segments < 0:
            raise ValueError(f"n_segments must be an int >= 0, got {n_segments!r}")
    _check_device(x=x, gy=gy, U=U, Vh=Vh, segment_ids=segment_ids)
    return _launch_dS(x, gy, U, Vh, segment_ids=segment_ids, n_segments=n_segments)


def merge_weight(
    U: torch.Tensor,
    S: torch.Tensor,
    dS: torch.Tensor,
    Vh: torch.Tensor,
    base: torch.Tensor | None = None,
) -> torch.Tensor:
    """W_eff = (U * (S + dS)) Vh [d_out, d_in] in U.dtype: one GEMM, the scale applied to U's
    columns as they are loaded. With base [d_out, d_in]: base + (U * dS) Vh in base.dtype, added
    in the epilogue in float32 (exactly base at dS = 0)."""
    d_out, _, d_in = _check_factors(U, Vh, S, dS)
    if base is not None:
        _check_kernel_tensor(base, "base", 2)
        if tuple(base.shape) != (d_out, d_in):
            raise ValueError(f"base must be [{d_out}, {d_in}], got {tuple(base.shape)}")
    _check_device(U=U, S=S, dS=dS, Vh=Vh, base=base)
    if base is None:
        out = empty((d_out, d_in), U.dtype, U.device)
        return _matmul(U, Vh, (Vh.stride(0), Vh.stride(1)), out, scale=(_SCALE_K, S, dS))
    out = empty((d_out, d_in), base.dtype, U.device)
    return _matmul(
        U, Vh, (Vh.stride(0), Vh.stride(1)), out, scale=(_SCALE_K, dS, None), addend=base
    )
