"""The bases and projectors of each arm, and the control bases.

    vanilla            the extracted hack basis, measure only (cin is logged, nothing removed)
    projected          the extracted hack basis, hack-ward part of every gradient removed
    projected-update   the same, applied to every optimizer update (closes the Adam leak)
    refresh            projected, the basis re-extracted every N steps at the current dS
    random-v           random orthonormal bases of the same shapes (k rows per module)
    shuffled-v         the extracted bases moved to other modules of the same rank
    nonhack-v          a basis extracted from pairs that differ in something other than hacking

The controls remove gradient energy without aiming at the hack: comparing their energy removed
and hack rate with "projected" separates "any projection this strong" from "the hack directions".
"""

from __future__ import annotations

import torch

import vhack
from vhack.errors import UsageError

__all__ = [
    "basis_overlap",
    "make_projector",
    "random_basis",
    "shuffled_basis",
    "subspace",
]


def subspace(basis) -> dict[str, torch.Tensor]:
    """{module name: V [k, r]} of a HackBasis or a dict."""
    if isinstance(basis, dict):
        return dict(basis)
    return {n: basis.V(n) for n in basis.names}


def random_basis(basis, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random orthonormal rows with the shapes of `basis` ({name: [k, r]}), deterministic per
    seed (QR of a Gaussian, float32, on the basis' device)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, V in subspace(basis).items():
        k, r = V.shape
        q, _ = torch.linalg.qr(torch.randn(r, k, generator=gen, dtype=torch.float64))
        out[name] = q.T.contiguous().to(torch.float32).to(V.device)
    return out


def shuffled_basis(basis) -> dict[str, torch.Tensor]:
    """Each module gets the basis of the NEXT module of the same (k, r) shape, cyclically: every
    module of a shape shared by two or more modules is projected with a wrong module's axes.
    Modules whose shape is unique keep no basis (they are not projected) rather than their own."""
    V = subspace(basis)
    by_shape: dict[tuple[int, int], list[str]] = {}
    for name, v in V.items():
        by_shape.setdefault(tuple(v.shape), []).append(name)
    out = {}
    for names in by_shape.values():
        if len(names) < 2:
            continue
        for i, name in enumerate(names):
            out[name] = V[names[(i + 1) % len(names)]]
    if not out:
        raise UsageError("shuffled-v needs at least two modules of the same rank")
    return {n: out[n] for n in V if n in out}  # adapter order


def basis_overlap(old, new) -> float:
    """Mean over common modules of |V_new V_old^T|_F^2 / k: 1 = the same subspace, ~k/r for
    unrelated random ones."""
    a, b = subspace(old), subspace(new)
    vals = []
    for name in a:
        if name in b:
            va, vb = a[name].float(), b[name].float()
            vals.append((vb @ va.T).square().sum() / max(min(va.shape[0], vb.shape[0]), 1))
    return float(torch.stack(vals).mean()) if vals else float("nan")


def make_projector(arm: str, adapter, basis, k: int | None = None) -> vhack.Projector:
    """The Projector of an arm: measure-only for vanilla, update mode for projected-update,
    one-sided (hack-ward) gradient projection otherwise."""
    mode = "measure" if arm == "vanilla" else "hackward"
    where = "update" if arm == "projected-update" else "grad"
    V = subspace(basis)
    if k is not None:
        V = {n: v[:k] for n, v in V.items()}
    return vhack.Projector(adapter, V, mode=mode, where=where)
