"""The validated, cached layout of a packed module set, shared by every backend of
`vhack.ops.project_`.

A layout is (offsets, basis_offsets, ks) plus the sizes of the grad and basis they index. Checking
its values needs them on the host (one synchronisation on CUDA), so it is done once per layout and
cached, keyed by the identity and in-place version counter of the three index tensors: calls that
pass the same tensors again (the Projector, a training loop reusing adapter.offsets) pay nothing.
The cached layout also holds what each backend precomputes from it: the largest-first launch order
and k_max (Triton), and the per-shape module groups of the torch path.
"""

from __future__ import annotations

import itertools
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

__all__ = ["ModuleGroup", "ProjectionLayout", "build_layout", "layout_for"]

_CACHE_SIZE = 16


@dataclass
class ModuleGroup:
    """Modules that share (r, k): gathered and projected together by batched matmuls."""

    modules: torch.Tensor  # int64 [n] module indices
    index: torch.Tensor  # int64 [n * r]: the grad elements of those modules, module-major
    r: int
    k: int


@dataclass
class ProjectionLayout:
    """A checked packed layout (see vhack.packing). Host copies of the index tables, plus:
    `order` int64 [M] on the layout's device (modules by decreasing (k + 2) r, the work of each),
    `k_max` and `max_r`."""

    lo: list[int]
    r: list[int]
    b0: list[int]
    k: list[int]
    order: torch.Tensor
    k_max: int
    max_r: int
    _groups: list[ModuleGroup] | None = None
    _basis_key: tuple | None = None
    _basis_blocks: list[torch.Tensor] = field(default_factory=list)

    @property
    def n_modules(self) -> int:
        return len(self.r)

    def groups(self, device: torch.device) -> list[ModuleGroup]:
        """Modules grouped by (r, k), with their gather indices (built once)."""
        if self._groups is None:
            by_shape: dict[tuple[int, int], list[int]] = {}
            for m, (r, k) in enumerate(zip(self.r, self.k, strict=True)):
                by_shape.setdefault((r, k), []).append(m)
            self._groups = []
            for (r, k), mods in by_shape.items():
                starts = torch.tensor([self.lo[m] for m in mods], dtype=torch.int64)
                index = (starts[:, None] + torch.arange(r, dtype=torch.int64)).reshape(-1)
                self._groups.append(
                    ModuleGroup(
                        torch.tensor(mods, dtype=torch.int64, device=device), index.to(device), r, k
                    )
                )
        return self._groups

    def basis_blocks(self, basis: torch.Tensor, dtype: torch.dtype) -> list[torch.Tensor]:
        """Per group, the basis rows in use as one [n, k, r] tensor of `dtype`: a copy, cached
        for the most recent basis (its identity, storage and version)."""
        key = (id(basis), basis.data_ptr(), _version(basis), dtype)
        if key[2] is None or key != self._basis_key:
            blocks = []
            for grp in self.groups(basis.device):
                mods = grp.modules.tolist()
                starts = torch.tensor([self.b0[m] for m in mods], dtype=torch.int64)
                index = starts[:, None] + torch.arange(grp.k * grp.r, dtype=torch.int64)
                blocks.append(
                    basis[index.reshape(-1).to(basis.device)]
                    .to(dtype)
                    .reshape(len(mods), grp.k, grp.r)
                )
            self._basis_key, self._basis_blocks = key, blocks
        return self._basis_blocks


def _version(t: torch.Tensor) -> int | None:
    """The in-place version counter of t (None for inference tensors, which have none)."""
    try:
        return t._version
    except RuntimeError:
        return None


# (ids, versions, sizes) -> (weak references to the index tensors, layout)
_layouts: OrderedDict[tuple, tuple[tuple, ProjectionLayout]] = OrderedDict()


def layout_for(
    offsets: torch.Tensor,
    basis_offsets: torch.Tensor,
    ks: torch.Tensor,
    grad_numel: int,
    basis_numel: int,
) -> ProjectionLayout:
    """The checked layout of these index tensors (cached). Raises ValueError naming the first bad
    module: offsets must be nondecreasing within [0, grad_numel], basis_offsets nondecreasing
    within [0, basis_numel], and module m's block must hold its ks[m] rows of r_m values."""
    tensors = (offsets, basis_offsets, ks)
    versions = tuple(_version(t) for t in tensors)
    key = (*(id(t) for t in tensors), *versions, grad_numel, basis_numel, offsets.device)
    hit = _layouts.get(key)
    if hit is not None and all(ref() is t for ref, t in zip(hit[0], tensors, strict=True)):
        _layouts.move_to_end(key)
        return hit[1]
    layout = build_layout(offsets, basis_offsets, ks, grad_numel, basis_numel)
    if None not in versions:
        _layouts[key] = (tuple(weakref.ref(t) for t in tensors), layout)
        while len(_layouts) > _CACHE_SIZE:
            _layouts.popitem(last=False)
    return layout


def build_layout(offsets, basis_offsets, ks, grad_numel, basis_numel) -> ProjectionLayout:
    off = offsets.tolist()
    boff = basis_offsets.tolist()
    kk = ks.tolist()
    n_modules = len(kk)
    lo, r = off[:-1], [b - a for a, b in itertools.pairwise(off)]
    for m in range(n_modules):
        if off[m] < 0 or r[m] < 0 or off[m + 1] > grad_numel:
            raise ValueError(
                f"offsets must be nondecreasing within [0, grad.numel() = {grad_numel}]; module "
                f"{m} spans [{off[m]}, {off[m + 1]})"
            )
        if boff[m] < 0 or boff[m + 1] < boff[m] or boff[m + 1] > basis_numel:
            raise ValueError(
                f"basis_offsets must be nondecreasing within [0, basis.numel() = {basis_numel}]; "
                f"module {m} spans [{boff[m]}, {boff[m + 1]})"
            )
        if kk[m] < 0 or kk[m] * r[m] > boff[m + 1] - boff[m]:
            stored = (boff[m + 1] - boff[m]) // r[m] if r[m] else "any number of"
            raise ValueError(
                f"ks[{m}] = {kk[m]} but module {m}'s basis block stores {stored} rows of length "
                f"r = {r[m]} ({boff[m + 1] - boff[m]} values); ks must lie in [0, stored rows]"
            )
    work = [(k + 2) * n for k, n in zip(kk, r, strict=True)]
    order = sorted(range(n_modules), key=lambda m: -work[m])  # stable: ties keep packed order
    return ProjectionLayout(
        lo=lo,
        r=r,
        b0=boff[:-1],
        k=kk,
        order=torch.tensor(order, dtype=torch.int64, device=offsets.device),
        k_max=max(kk, default=0),
        max_r=max(r, default=0),
    )
