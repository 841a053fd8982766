"""Hack basis from paired gradient differences: per module, the top principal directions of
D = G_hack - G_clean, oriented hack-ward by per-pair majority vote.

The math of extraction after the gradients are in (`vhack.extract` computes them): one SVD per
group of modules of one width, in float32 (float64 for float64 input).
"""

from __future__ import annotations

import torch

from vhack.basis import HackBasis
from vhack.extract_config import EXTRACT_TOP_K

__all__ = [
    "basis_from_differences",
    "basis_from_gradients",
    "difference_basis",
    "orient_by_majority",
    "paired_difference_basis",
]


def orient_by_majority(V: torch.Tensor, D: torch.Tensor) -> torch.Tensor:
    """Flip each row of V so that most pairs project positively on it.

    V [..., k, r] (rows = axes), D [..., n_pairs, r] (rows = hack - clean gradient differences);
    leading dims batch independent modules. A row is flipped when more pairs project negatively
    than positively on it; pairs projecting exactly 0 abstain and a tie keeps the sign (+).
    Returns a new [..., k, r] tensor.
    """
    proj = D @ V.transpose(-1, -2)  # [..., n_pairs, k]
    n_pos = (proj > 0).sum(-2)
    n_neg = (proj < 0).sum(-2)
    sign = torch.where(n_neg > n_pos, -1.0, 1.0).to(V.dtype)
    return V * sign[..., :, None]


def paired_difference_basis(
    G_hack: torch.Tensor,
    G_clean: torch.Tensor,
    top_k: int,
    tau_axis: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hack basis of one module from paired gradients: `difference_basis(G_hack - G_clean)`.

    G_hack, G_clean [n_pairs, r]: dS gradients of the hack and clean completion of each pair
    (or [..., n_pairs, r]: leading dims batch modules of one shape); the difference is taken in
    float32 (float64 for float64 input).
    """
    if G_hack.shape != G_clean.shape or G_hack.dim() < 2:
        raise ValueError(
            f"G_hack and G_clean must both be [n_pairs, r], got {tuple(G_hack.shape)} and "
            f"{tuple(G_clean.shape)}"
        )
    ct = torch.float64 if G_hack.dtype == torch.float64 else torch.float32
    return difference_basis(G_hack.to(ct) - G_clean.to(ct), top_k, tau_axis)


def difference_basis(
    D: torch.Tensor, top_k: int, tau_axis: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hack basis of one module from paired differences: PCA of D.

    D [n_pairs, r] (or [..., n_pairs, r]: leading dims batch modules of one shape): per pair, the
    dS gradient of the hack completion minus that of the clean one. D = U_d diag(S_d) Vh_d (SVD in
    float32, float64 for float64 input); V = the first k = min(top_k, n_pairs, r) rows of Vh_d,
    each oriented by per-pair majority vote; rows with S_d[i] / S_d[0] < tau_axis are zeroed (all
    rows when D = 0). Returns (V [..., k, r], sv [..., k]); the singular values are kept for
    every row, zeroed or not.
    """
    if D.dim() < 2:
        raise ValueError(f"D must be [n_pairs, r], got {tuple(D.shape)}")
    ct = torch.float64 if D.dtype == torch.float64 else torch.float32
    D = D.to(ct)
    _, S_d, Vh_d = torch.linalg.svd(D, full_matrices=False)
    k = min(top_k, Vh_d.shape[-2])
    V = orient_by_majority(Vh_d[..., :k, :], D)
    sv = S_d[..., :k].clone()
    if k > 0:
        s0 = sv[..., :1]
        keep = (s0 > 0) & (sv >= tau_axis * s0)
        V = V * keep[..., :, None].to(ct)
    return V, sv


def basis_from_differences(
    D: torch.Tensor,
    layout,
    top_k: int = EXTRACT_TOP_K,
    tau_axis: float = 0.0,
    metadata: dict[str, str] | None = None,
) -> HackBasis:
    """Per module m: the SVD of the paired differences D[:, m] in float32, top-k rows oriented by
    per-pair majority vote, rows with S_i / S_0 < tau_axis zeroed (`difference_basis`).

    D [n_pairs, R_total] (G_hack - G_clean, see `pair_differences`) packed in the order of
    `layout` (an Adapter, or any object with `.names` and `.ranks`). Returns a HackBasis on D's
    device with min(top_k, n_pairs, r_m) axes per module.
    """
    names, ranks = list(layout.names), list(layout.ranks)
    total = sum(ranks)
    if D.dim() != 2 or D.shape[1] != total:
        raise ValueError(f"D must be [n_pairs, {total}], got {tuple(D.shape)}")
    # Modules of one width r share one batched SVD (a model has few distinct shapes).
    starts = [0]
    for r in ranks[:-1]:
        starts.append(starts[-1] + r)
    by_width: dict[int, list[int]] = {}
    for m, r in enumerate(ranks):
        by_width.setdefault(r, []).append(m)
    V, sv = {}, {}
    D = D.float()
    for r, members in by_width.items():
        cols = torch.stack([torch.arange(starts[m], starts[m] + r) for m in members])
        cols = cols.to(D.device)  # [n_modules, r]
        V_group, sv_group = difference_basis(
            D[:, cols].transpose(0, 1), top_k, tau_axis
        )  # D[:, cols]: [n_pairs, n_modules, r]
        for i, m in enumerate(members):
            V[names[m]], sv[names[m]] = V_group[i], sv_group[i]
    return HackBasis({n: V[n] for n in names}, {n: sv[n] for n in names}, metadata)


def basis_from_gradients(
    G_hack: torch.Tensor,
    G_clean: torch.Tensor,
    layout,
    top_k: int = EXTRACT_TOP_K,
    tau_axis: float = 0.0,
    metadata: dict[str, str] | None = None,
) -> HackBasis:
    """`basis_from_differences(G_hack - G_clean, ...)`; G_hack, G_clean [n_pairs, R_total] are the
    gradients of each pair's hack and clean completion (see `pair_gradients`)."""
    total = sum(layout.ranks)
    if G_hack.shape != G_clean.shape or G_hack.dim() != 2 or G_hack.shape[1] != total:
        raise ValueError(
            f"G_hack and G_clean must both be [n_pairs, {total}], got {tuple(G_hack.shape)} and "
            f"{tuple(G_clean.shape)}"
        )
    return basis_from_differences(
        G_hack.float() - G_clean.float(), layout, top_k, tau_axis, metadata
    )
