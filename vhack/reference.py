"""Eager PyTorch reference for every op of vhack: the readable truth that kernels are tested against.

Every function here is written for clarity, not speed. They accept float64 inputs (tests use float64
as ground truth) and otherwise compute in float32, casting back to the input dtype only where the
public op does. Signatures match `vhack.ops`.

Notation (per wrapped Linear): W [d_out, d_in] = U [d_out, r] diag(S [r]) Vh [r, d_in], r = min(d_in,
d_out); the trainable knob dS [r] gives W_eff = U diag(S + dS) Vh.
"""

from __future__ import annotations

import torch

from vhack.ops.modes import PRESERVE_MIN_RATIO, PROJECTION_MODES, check_mode

__all__ = [
    "PRESERVE_MIN_RATIO",
    "PROJECTION_MODES",
    "delta_grad",
    "merge_weight",
    "project_",
    "svd_linear",
]

# PROJECTION_MODES and PRESERVE_MIN_RATIO are defined in vhack.ops.modes (re-exported here).


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def svd_linear(
    x: torch.Tensor,
    U: torch.Tensor,
    S: torch.Tensor,
    dS: torch.Tensor,
    Vh: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = ((x Vh^T) * (S + dS)) U^T + bias, differentiable in every input.

    x [..., d_in]; U [d_out, r]; S, dS [r]; Vh [r, d_in]; bias [d_out] or None -> y [..., d_out] in
    x.dtype, computed in float32 (float64 if any input is float64).
    """
    ct = _compute_dtype(x, U, S, dS, Vh)
    h = x.to(ct) @ Vh.to(ct).T
    h = h * (S.to(ct) + dS.to(ct))
    y = h @ U.to(ct).T
    if bias is not None:
        y = y + bias.to(ct)
    return y.to(x.dtype)


def delta_grad(
    x: torch.Tensor,
    gy: torch.Tensor,
    U: torch.Tensor,
    Vh: torch.Tensor,
    segment_ids: torch.Tensor | None = None,
    n_segments: int | None = None,
) -> torch.Tensor:
    """Gradient of sum(gy * y) with respect to dS, for y = svd_linear(x, U, S, dS, Vh).

    dL/dS_i = sum over rows n of (x_n . Vh_i) * (gy_n . U_:,i): a column sum of (x Vh^T) * (gy U).
    x [..., d_in], gy [..., d_out] with the same leading shape; rows are x.reshape(-1, d_in).
    segment_ids: int64 [N] (one id per row), or None. Returns float32 [r] (float64 for float64
    inputs), or [n_segments, r] per-segment sums with segment_ids; n_segments defaults to
    max(segment_ids) + 1.
    """
    ct = _compute_dtype(x, gy, U, Vh)
    xr = x.reshape(-1, x.shape[-1]).to(ct)
    gr = gy.reshape(-1, gy.shape[-1]).to(ct)
    per_row = (xr @ Vh.to(ct).T) * (gr @ U.to(ct))  # [N, r]
    if segment_ids is None:
        return per_row.sum(0)
    if n_segments is None:
        n_segments = int(segment_ids.max().item()) + 1 if segment_ids.numel() else 0
    out = torch.zeros(n_segments, per_row.shape[1], dtype=ct, device=per_row.device)
    return out.index_add_(0, segment_ids.to(per_row.device), per_row)


def merge_weight(
    U: torch.Tensor,
    S: torch.Tensor,
    dS: torch.Tensor,
    Vh: torch.Tensor,
    base: torch.Tensor | None = None,
) -> torch.Tensor:
    """W_eff = U diag(S + dS) Vh [d_out, d_in], in U.dtype.

    With base (the dense weight W that U, S, Vh decompose): W + U diag(dS) Vh instead, which equals
    W exactly at dS = 0 and differs from U diag(S + dS) Vh only by W's SVD reconstruction error.
    """
    ct = _compute_dtype(U, S, dS, Vh)
    if base is None:
        return ((U.to(ct) * (S.to(ct) + dS.to(ct))) @ Vh.to(ct)).to(U.dtype)
    return (base.to(ct) + (U.to(ct) * dS.to(ct)) @ Vh.to(ct)).to(base.dtype)


def project_(
    grad: torch.Tensor,
    offsets: torch.Tensor,
    basis: torch.Tensor,
    basis_offsets: torch.Tensor,
    ks: torch.Tensor,
    mode: str = "hackward",
    alpha: float = 1.0,
    preserve_magnitude: bool = False,
) -> torch.Tensor:
    """Project each module's slice of the packed gradient in place; return statistics [M, 4].

    grad [R_total] (any float dtype; math in float32, float64 for float64 grads) is modified in
    place. Module m owns grad[offsets[m]:offsets[m+1]] (length r_m) and the row-major k_max_m x r_m
    block basis[basis_offsets[m]:basis_offsets[m+1]]; its first ks[m] rows V [k, r_m] are used.
    With c = V g:
      hackward: g' = g - alpha V^T relu(c)   (removes the hack-ward side only)
      both:     g' = g - alpha V^T c         (removes span(V))
      reverse:  g' = g - 2 alpha V^T c       (reflects through span(V))
      measure:  g' = g                       (statistics only)
    preserve_magnitude rescales g' to |g|, except when |g'| <= PRESERVE_MIN_RATIO |g| (g lies in
    span(V) up to rounding: rescaling that residue would blow rounding noise up to |g|). Modules
    with ks[m] = 0, and modules whose |g| or c is not finite (a NaN/inf gradient, or a non-finite
    basis block), are left untouched (their statistics show the NaN/inf), so nothing non-finite
    spreads within a module.
    Returns float32 [M, 4] (float64 for float64 grads): |c|, |relu(c)|, |g| before, |g'| after.
    """
    check_mode(mode)
    ct = torch.float64 if grad.dtype == torch.float64 else torch.float32
    n_modules = offsets.numel() - 1
    stats = torch.zeros(n_modules, 4, dtype=ct, device=grad.device)
    for m in range(n_modules):
        lo, hi = int(offsets[m]), int(offsets[m + 1])
        r = hi - lo
        k = int(ks[m])
        g = grad[lo:hi].to(ct)
        norm_before = torch.linalg.vector_norm(g)
        if k > 0 and r > 0:
            b0 = int(basis_offsets[m])
            V = basis[b0 : b0 + k * r].reshape(k, r).to(ct)
            c = V @ g
        else:
            V = torch.zeros(0, r, dtype=ct, device=grad.device)
            c = torch.zeros(0, dtype=ct, device=grad.device)
        stats[m, 0] = torch.linalg.vector_norm(c)
        stats[m, 1] = torch.linalg.vector_norm(torch.relu(c))
        stats[m, 2] = norm_before
        finite = torch.isfinite(norm_before) and torch.isfinite(stats[m, 0])
        if mode == "measure" or k == 0 or not finite:
            stats[m, 3] = norm_before
            continue
        phi = {"hackward": torch.relu(c), "both": c, "reverse": 2.0 * c}[mode] * alpha
        g_new = g - V.T @ phi
        norm_after = torch.linalg.vector_norm(g_new)
        if preserve_magnitude and norm_after > PRESERVE_MIN_RATIO * norm_before:
            g_new = g_new * (norm_before / norm_after)
            norm_after = torch.linalg.vector_norm(g_new)
        stats[m, 3] = norm_after
        grad[lo:hi] = g_new.to(grad.dtype)
    return stats
