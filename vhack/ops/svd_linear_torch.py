"""The torch path of the SVD-basis linear ops (vectorised PyTorch; CPU, and CUDA without Triton).

Same math as the Triton kernels in vhack/kernels/svd_linear.py and the reference in
vhack/reference.py. The dS gradient is accumulated in float32 (float64 for float64 inputs); with
16-bit x and factors of the same dtype the forward and dx GEMMs run natively in that dtype (the
BLAS accumulates in float32), like the kernels, which keep the [N, r] intermediate in it too.
"""

from __future__ import annotations

import torch

from vhack import reference

__all__ = [
    "delta_grad_torch",
    "grad_dtype",
    "merge_weight_torch",
    "rows",
    "svd_linear_backward_torch",
    "svd_linear_forward_torch",
]


def rows(t: torch.Tensor) -> torch.Tensor:
    """t [..., d] as contiguous rows [N, d] (a view when t is contiguous)."""
    return t.reshape(-1, t.shape[-1]).contiguous()


def grad_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """dtype of a dS gradient on the torch path: float64 if any input is float64, else float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _native_half(x: torch.Tensor, U: torch.Tensor) -> bool:
    """x and the factors share a 16-bit dtype, so the forward and dx GEMMs run natively."""
    return x.dtype == U.dtype and x.dtype in (torch.bfloat16, torch.float16)


def _scale_columns(h: torch.Tensor, S: torch.Tensor, dS: torch.Tensor) -> torch.Tensor:
    """h * (S + dS) along the last axis, computed in float32, returned in h.dtype."""
    return (h.float() * (S.float() + dS.float())).to(h.dtype)


def delta_grad_torch(
    x: torch.Tensor,
    gy: torch.Tensor,
    U: torch.Tensor,
    Vh: torch.Tensor,
    segment_ids: torch.Tensor | None,
    n_segments: int,
) -> torch.Tensor:
    """Column sums of (x Vh^T) * (gy U): [r], or per segment [n_segments, r] (ids outside
    [0, n_segments) ignored, like the kernel). float32 (float64 for float64 inputs)."""
    if segment_ids is None:
        return reference.delta_grad(x, gy, U, Vh)
    # Like the kernel, ignore (never index with) ids outside [0, n_segments): the range check
    # may have been skipped (check_ids=False).
    valid = (segment_ids >= 0) & (segment_ids < n_segments)
    ct = grad_dtype(x, gy, U, Vh)
    per_row = (rows(x).to(ct) @ Vh.to(ct).T) * (rows(gy).to(ct) @ U.to(ct))
    per_row = per_row * valid[:, None].to(ct)
    out = torch.zeros(n_segments, U.shape[1], dtype=ct, device=x.device)
    if n_segments == 0:
        return out
    return out.index_add_(0, torch.where(valid, segment_ids, 0), per_row)


def svd_linear_forward_torch(x, U, S, dS, Vh, bias) -> torch.Tensor:
    """y = ((x Vh^T) * (S + dS)) U^T + bias [..., d_out]."""
    if _native_half(x, U):
        h = _scale_columns(x @ Vh.T, S, dS)
        y = h @ U.T
        return y + bias.to(y.dtype) if bias is not None else y
    return reference.svd_linear(x, U, S, dS, Vh, bias)


def svd_linear_backward_torch(
    x, gy, U, S, dS, Vh, need_dx: bool, need_ds: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx [..., d_in] in x.dtype, dS gradient [r]); an output not asked for is an empty [0]."""
    none = x.new_empty(0)
    if _native_half(gy, U):
        gx = (_scale_columns(gy @ U, S, dS) @ Vh).to(x.dtype) if need_dx else none
        g = delta_grad_torch(x, gy, U, Vh, None, 0) if need_ds else none
        return gx, g
    ct = grad_dtype(x, gy, U, Vh)
    gu = rows(gy).to(ct) @ U.to(ct)  # gy U, once
    gx = none
    if need_dx:
        gx = ((gu * (S.to(ct) + dS.to(ct))) @ Vh.to(ct)).to(x.dtype).reshape(x.shape)
    g = ((rows(x).to(ct) @ Vh.to(ct).T) * gu).sum(0) if need_ds else none
    return gx, g


def merge_weight_torch(U, S, dS, Vh, base) -> torch.Tensor:
    """W_eff = U diag(S + dS) Vh, or base + U diag(dS) Vh (see vhack.reference.merge_weight)."""
    return reference.merge_weight(U, S, dS, Vh, base)
