"""The bases and projectors of each arm, and the control bases.

    vanilla            the extracted hack basis, measure only (cin is logged, nothing removed)
    projected          the extracted hack basis, hack-ward part of every gradient removed
    projected-update   the same, applied to every optimizer update (closes the Adam leak)
    refresh            projected, the basis re-extracted every N steps at the current dS
    random-matched     random orthonormal axes, as many per module and step as remove the
                       gradient energy the hack basis would remove there (the control of record)
    random-v           random orthonormal bases of the same shapes (k rows per module; they
                       remove far less energy than the hack basis: a weak control)
    shuffled-v         the extracted bases moved to other modules of the same rank
    nonhack-v          a basis extracted from pairs that differ in something other than hacking
    kl                 no projection (measure only, as vanilla); the loss carries beta * KL

The controls remove gradient energy without aiming at the hack: comparing their energy removed
and hack rate with "projected" separates "any projection this strong" from "the hack directions".
"""

from __future__ import annotations

import torch

import vhack
from vhack.errors import UsageError

__all__ = [
    "MatchedRandomBasis",
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


class MatchedRandomBasis:
    """The random-matched control: for a gradient g, random orthonormal axes that remove (one-
    sided, as "projected" does) a matched amount of every module's gradient energy: a given share
    of it, or as much as the hack basis would remove.

    Each module m of rank r gets one fixed random orthonormal basis Q_m [r, r] (QR of a Gaussian,
    deterministic per seed). For a gradient, `choose` keeps the first k_m rows of Q_m, k_m the
    count whose one-sided removal sum_{i<k} relu(q_i . g_m)^2 comes closest to the target. Only
    the count looks at g; the directions stay random. A module whose target is 0 gets one
    all-zero row (the Projector skips it).
    """

    def __init__(self, adapter, hack_basis, seed: int = 0) -> None:
        hack = subspace(hack_basis)
        gen = torch.Generator().manual_seed(seed)
        self.names = list(adapter.names)
        self.offsets = [0]
        for r in adapter.ranks:
            self.offsets.append(self.offsets[-1] + r)
        self.hack: dict[str, torch.Tensor] = {}
        self.Q: dict[str, torch.Tensor] = {}
        for m, name in enumerate(self.names):
            r = self.offsets[m + 1] - self.offsets[m]
            q, _ = torch.linalg.qr(torch.randn(r, r, generator=gen, dtype=torch.float64))
            device = adapter.delta.device
            self.Q[name] = q.T.contiguous().to(torch.float32).to(device)
            if name in hack:
                self.hack[name] = hack[name].to(device=device, dtype=torch.float32)

    def choose(self, grad: torch.Tensor, share: float | None = None) -> dict[str, torch.Tensor]:
        """{module name: V [k_m or 1, r]} for the packed gradient grad [R] (adapter.delta.grad).
        share: the target is share * |g_m|^2; None: the hack basis' |relu(V_m g_m)|^2."""
        out = {}
        for m, name in enumerate(self.names):
            g = grad[self.offsets[m] : self.offsets[m + 1]].float()
            Q = self.Q[name]
            target = torch.zeros((), device=g.device)
            if share is not None:
                target = share * g.square().sum()
            elif name in self.hack:
                target = torch.relu(self.hack[name] @ g).square().sum()
            removed = torch.cat([target.new_zeros(1), torch.relu(Q @ g).square().cumsum(0)])
            k = int((removed - target).abs().argmin())
            out[name] = Q[:k] if k > 0 else torch.zeros_like(Q[:1])
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
    """The Projector of an arm: measure-only for vanilla and kl, update mode for projected-update,
    one-sided (hack-ward) gradient projection otherwise."""
    mode = "measure" if arm in ("vanilla", "kl") else "hackward"
    where = "update" if arm == "projected-update" else "grad"
    V = subspace(basis)
    if k is not None:
        V = {n: v[:k] for n, v in V.items()}
    return vhack.Projector(adapter, V, mode=mode, where=where)
