"""Packed layout helpers: many per-module tensors in one flat buffer plus an int64 offsets table.

Module m of a packed vector owns flat[offsets[m]:offsets[m+1]]; module m of a packed basis owns the
row-major k_max_m x r_m block basis[basis_offsets[m]:basis_offsets[m+1]], of which the first ks[m]
rows are used. See ../ARCHITECTURE.md ("Data layout: packed, not per-module").
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["offsets_from_sizes", "pack_blocks", "pack_vectors"]


def offsets_from_sizes(sizes: Sequence[int], device: torch.device | str = "cpu") -> torch.Tensor:
    """int64 [M + 1] exclusive prefix sums of sizes: offsets[0] = 0, offsets[M] = sum(sizes)."""
    out = torch.zeros(len(sizes) + 1, dtype=torch.int64)
    if len(sizes):
        out[1:] = torch.cumsum(torch.tensor(list(sizes), dtype=torch.int64), 0)
    return out.to(device)


def pack_vectors(
    vectors: Sequence[torch.Tensor], dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate 1-D tensors into (flat [sum r_m], offsets int64 [M + 1]) on their device.

    dtype defaults to the first vector's dtype. Raises ValueError for an empty list or a tensor that
    is not 1-D.
    """
    if not vectors:
        raise ValueError("pack_vectors needs at least one tensor")
    for i, v in enumerate(vectors):
        if v.dim() != 1:
            raise ValueError(f"tensor {i} must be 1-D, got shape {tuple(v.shape)}")
    dtype = dtype or vectors[0].dtype
    device = vectors[0].device
    flat = torch.cat([v.to(device=device, dtype=dtype) for v in vectors])
    return flat, offsets_from_sizes([v.numel() for v in vectors], device)


def pack_blocks(
    blocks: Sequence[torch.Tensor | None],
    rs: Sequence[int],
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pack per-module basis blocks V_m [k_m, r_m] (None = module absent, k_m = 0) row-major.

    rs [M]: the width r_m every block must have. Returns (basis [sum k_m r_m] in dtype,
    basis_offsets int64 [M + 1], ks int64 [M]) on device.
    """
    if len(blocks) != len(rs):
        raise ValueError(f"got {len(blocks)} blocks for {len(rs)} modules")
    parts, sizes, ks = [], [], []
    for m, (block, r) in enumerate(zip(blocks, rs, strict=True)):
        if block is None:
            sizes.append(0)
            ks.append(0)
            continue
        if block.dim() != 2 or block.shape[1] != r:
            raise ValueError(f"block {m} must be [k, {r}], got shape {tuple(block.shape)}")
        parts.append(block.detach().to(device=device, dtype=dtype).reshape(-1))
        sizes.append(block.numel())
        ks.append(block.shape[0])
    basis = torch.cat(parts) if parts else torch.zeros(0, dtype=dtype, device=device)
    return (
        basis.contiguous(),
        offsets_from_sizes(sizes, device),
        torch.tensor(ks, dtype=torch.int64, device=device),
    )
