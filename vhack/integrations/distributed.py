"""The projection under torch.distributed data parallelism.

The one-sided projection is not linear, so it must run once per optimizer step on the full,
averaged gradient, never per process on local gradients. Three setups:

- DDP (and the Trainer / accelerate multi-process): the gradient is all-reduced inside backward,
  every rank holds the same full dS gradient, and the ordinary `vhack.Projector` runs unchanged
  on each rank, giving identical results and statistics everywhere. Nothing to do.
- dS replicated, the rest sharded or averaged by hand (FSDP2 with
  `fully_shard(model, ignored_params={adapter.delta})`, or a loop without DDP):
  `all_reduce_grad(adapter)` averages the flat dS gradient in one collective; then project
  (then clip) with the ordinary Projector. dS is small (about 0.5 M scalars for a 4B model), so
  this is the recommended FSDP2 setup.
- dS sharded across ranks as contiguous flat shards (FSDP2 sharding the packed dS itself, or any
  flat partition): `ShardedProjector` computes each module's partial coefficients V g and partial
  |g|^2 on the local shard, all-reduces (SUM) them in one collective of M * (k_max + 1) floats,
  applies the mode (relu for "hackward") to the reduced coefficients, and subtracts V^T phi from
  the local shard. A second small all-reduce gives the global |g'|. Results and statistics equal
  the single-process projection of the concatenated gradient (to float32 rounding).
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.distributed as dist

import vhack
from vhack.reference import PRESERVE_MIN_RATIO

__all__ = ["ShardedProjector", "all_reduce_grad", "fsdp2_shard_range"]


def all_reduce_grad(adapter: vhack.Adapter, group=None, average: bool = True) -> torch.Tensor:
    """All-reduce adapter.delta.grad in place in ONE collective (mean over ranks by default);
    returns it. For dS kept replicated while the rest of the model is sharded (FSDP2 with
    ignored_params) or when no DDP averages it. Call after backward, before projecting."""
    grad = adapter.delta.grad
    if grad is None:
        raise RuntimeError("adapter.delta.grad is None: call all_reduce_grad after backward")
    if type(grad) is not torch.Tensor:
        raise TypeError(
            f"adapter.delta.grad is a {type(grad).__name__} (sharded?): all_reduce_grad is for a "
            "replicated dS; keep it out of FSDP sharding (fully_shard(..., ignored_params="
            "{adapter.delta})) or use ShardedProjector"
        )
    dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=group)
    if average:
        grad.div_(dist.get_world_size(group))
    return grad


def fsdp2_shard_range(param: torch.Tensor) -> tuple[int, int]:
    """(lo, hi) of the flat range this rank holds of a 1-D parameter sharded by FSDP2 (a DTensor
    with a Shard(0) placement on a 1-D mesh): torch.chunk's split, ceil(N / world) per rank."""
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(param, DTensor):
        raise TypeError(f"expected a DTensor sharded by FSDP2, got {type(param).__name__}")
    if param.dim() != 1 or len(param.placements) != 1 or param.placements[0] != Shard(0):
        raise ValueError(
            f"expected a 1-D DTensor sharded on dim 0 over a 1-D mesh, got shape "
            f"{tuple(param.shape)} with placements {param.placements}"
        )
    n = param.shape[0]
    world = param.device_mesh.size()
    rank = param.device_mesh.get_local_rank()
    chunk = math.ceil(n / world)
    lo = min(rank * chunk, n)
    hi = min(lo + chunk, n)
    local = param.to_local().numel()
    if local != hi - lo:
        raise ValueError(
            f"rank {rank} holds {local} elements of the sharded dS, expected {hi - lo} (flat range "
            f"[{lo}, {hi}) of {n}); only FSDP2's even dim-0 sharding is supported"
        )
    return lo, hi


class ShardedProjector:
    """A Projector's projection on a dS split into contiguous flat shards across ranks.

    projector: the vhack.Projector (built identically on every rank) whose mode, alpha, where,
    preserve_magnitude and basis are used. shard: (lo, hi), the flat range of the packed dS this
    rank holds; None infers it from adapter.delta when FSDP2 shards it (`fsdp2_shard_range`). The
    shards of all ranks must tile [0, R_total) exactly (checked collectively here: every rank
    raises the same ValueError otherwise). group: the process group (default: world). param: the
    tensor holding this rank's shard (default adapter.delta, e.g. the DTensor FSDP2 made of it; or
    a Parameter [hi - lo] of your own flat sharding): its grad is projected for where="grad", its
    change for where="update".

    project_(target=None) projects the local shard of param.grad (where="grad") or of the
    change since snapshot() (where="update"); target may also be a local shard tensor [hi - lo].
    Returns global ProjStats (identical on every rank), also kept as last_stats. Collective: every
    rank must call it.
    """

    def __init__(
        self,
        projector: vhack.Projector,
        shard: tuple[int, int] | None = None,
        group=None,
        *,
        param: torch.Tensor | None = None,
    ):
        if not isinstance(projector, vhack.Projector):
            raise TypeError(f"projector must be a vhack.Projector, got {type(projector).__name__}")
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "ShardedProjector needs torch.distributed initialised (dist.init_process_group)"
            )
        self.projector = projector
        self.adapter = projector.adapter
        self.where = projector.where
        self.group = group
        self.param = self.adapter.delta if param is None else param
        total = sum(self.adapter.ranks)
        if shard is None:
            shard = fsdp2_shard_range(self.param)
        lo, hi = (int(x) for x in shard)
        _check_cover(lo, hi, total, group)
        self.lo, self.hi = lo, hi
        self.last_stats: vhack.ProjStats | None = None
        self._snapshot: torch.Tensor | None = None
        self._build(projector)

    def _build(self, projector: vhack.Projector) -> None:
        """Per local element: its module index and its basis column, as [k_max, n_local]."""
        ranks, ks = self.adapter.ranks, projector.ks
        basis = projector.basis.detach().to("cpu", torch.float32)
        self.n_modules = len(ranks)
        self.k_max = max(ks, default=0)
        n_local = self.hi - self.lo
        module_of = torch.empty(n_local, dtype=torch.int64)
        columns = torch.zeros(max(self.k_max, 1), n_local, dtype=torch.float32)
        start, b0 = 0, 0
        for m, (r, k) in enumerate(zip(ranks, ks, strict=True)):
            lo, hi = max(start, self.lo), min(start + r, self.hi)
            if lo < hi:
                module_of[lo - self.lo : hi - self.lo] = m
                if k > 0:
                    V = basis[b0 : b0 + k * r].reshape(k, r)
                    columns[:k, lo - self.lo : hi - self.lo] = V[:, lo - start : hi - start]
            start += r
            b0 += k * r
        device = self.adapter.delta.device
        self._module_of = module_of.to(device)
        self._columns = columns.to(device)
        self._projected = torch.tensor([k > 0 for k in ks], device=device)
        self._row_valid = (
            torch.arange(max(self.k_max, 1))[None, :] < torch.tensor(ks)[:, None]
        ).to(device)  # [M, k_max]

    def __repr__(self) -> str:
        return f"ShardedProjector([{self.lo}, {self.hi}) of {sum(self.adapter.ranks)}, {self.projector!r})"

    # ---- local tensors ---------------------------------------------------------------------------
    def _local(self, tensor: torch.Tensor) -> torch.Tensor:
        """The local shard of delta or its grad: a DTensor's local part, or the tensor itself."""
        if type(tensor) is not torch.Tensor and hasattr(tensor, "to_local"):
            tensor = tensor.to_local()
        if tensor.dim() != 1 or tensor.numel() != self.hi - self.lo:
            raise ValueError(
                f"the local shard must be 1-D with {self.hi - self.lo} elements (range "
                f"[{self.lo}, {self.hi})), got shape {tuple(tensor.shape)}"
            )
        return tensor

    def snapshot(self) -> None:
        """Remember the local shard of dS (before an optimizer step) for where="update"."""
        self._snapshot = self._local(self.param.detach()).clone()

    def project_(self, target: torch.Tensor | None = None) -> vhack.ProjStats:
        return self._run(target, self.projector.mode)

    def measure(self, target: torch.Tensor | None = None) -> vhack.ProjStats:
        return self._run(target, "measure")

    def _run(self, target, mode: str) -> vhack.ProjStats:
        if target is not None:
            stats = self._project_local(self._local(target), mode)
        elif self.where == "grad":
            grad = self.param.grad
            if grad is None:
                raise RuntimeError("adapter.delta.grad is None: call project_() after backward")
            stats = self._project_local(self._local(grad), mode)
        else:
            if self._snapshot is None:
                raise RuntimeError('where="update": call snapshot() before the optimizer step')
            local = self._local(self.param.detach())
            u = self._snapshot - local  # u = -Delta, projected like a gradient
            stats = self._project_local(u, mode)
            if mode != "measure":
                with torch.no_grad():
                    local.copy_(self._snapshot - u)
                self._snapshot = None
        self.last_stats = stats
        # The merged weights cached from dS must not outlive this step: under FSDP2 the next
        # forward all-gathers the new values into the same unsharded buffer, a write the
        # adapter's cache cannot see by itself (host-side counter, no device work).
        self.adapter.invalidate()
        on_nonfinite = self.projector.on_nonfinite
        if on_nonfinite != "ignore" and not stats.all_finite():  # global stats: same on every rank
            message = (
                f"non-finite dS {'update' if self.where == 'update' else 'gradient'} in "
                f"module(s) {stats.nonfinite[:8]}; they were left unprojected"
            )
            if on_nonfinite == "raise":
                raise RuntimeError(message)
            warnings.warn(message, RuntimeWarning, stacklevel=3)
        return stats

    # ---- the projection ----------------------------------------------------------------------------
    def _project_local(self, g: torch.Tensor, mode: str) -> vhack.ProjStats:
        M, K = self.n_modules, max(self.k_max, 1)
        alpha = self.projector.alpha
        with torch.no_grad():
            g32 = g.to(torch.float32)
            idx = self._module_of
            partial = torch.zeros(M * K + M, dtype=torch.float32, device=g.device)
            coef = partial[: M * K].view(M, K)
            gsq = partial[M * K :]
            contrib = self._columns * g32  # [K, n_local]
            coef.T.index_add_(1, idx, contrib)  # coef[m, i] += sum over module m's elements
            gsq.index_add_(0, idx, g32.square())
            dist.all_reduce(partial, op=dist.ReduceOp.SUM, group=self.group)

            finite = torch.isfinite(gsq) & torch.isfinite(coef).all(1)
            active = finite & self._projected & (mode != "measure")
            if mode == "hackward":
                phi = coef.clamp_min(0)
            elif mode == "reverse":
                phi = 2.0 * coef
            else:
                phi = coef.clone()
            phi = torch.where(active[:, None] & self._row_valid, phi * alpha, 0.0)
            step = (self._columns * phi.T[:, idx]).sum(0)  # [n_local]
            new = g32 - step
            after_sq = torch.zeros(M, dtype=torch.float32, device=g.device)
            after_sq.index_add_(0, idx, torch.where(active[idx], new, 0.0).square())
            dist.all_reduce(after_sq, op=dist.ReduceOp.SUM, group=self.group)
            after_sq = torch.where(active, after_sq, gsq)
            if self.projector.preserve_magnitude:
                before, after = gsq.sqrt(), after_sq.sqrt()
                rescale = active & (after > PRESERVE_MIN_RATIO * before)
                scale = torch.where(rescale, before / after.clamp_min(1e-38), 1.0)
                new = new * scale[idx]
                after_sq = torch.where(rescale, gsq, after_sq)
            if mode != "measure":
                g.copy_(torch.where(active[idx], new, g32).to(g.dtype))

            c_valid = torch.where(self._row_valid, coef, 0.0)
            raw = torch.stack(
                [
                    c_valid.norm(dim=1),
                    c_valid.clamp_min(0).norm(dim=1),
                    gsq.sqrt(),
                    after_sq.sqrt(),
                ],
                dim=1,
            )
        return vhack.ProjStats(
            self.adapter.names, raw, self._projected, one_sided=self.projector.mode == "hackward"
        )


def _check_cover(lo: int, hi: int, total: int, group) -> None:
    """Every rank's (lo, hi) must tile [0, total) exactly; the same error on every rank otherwise."""
    mine = torch.tensor([lo, hi], dtype=torch.int64)
    world = dist.get_world_size(group)
    gathered = [torch.empty(2, dtype=torch.int64) for _ in range(world)]
    if dist.get_backend(group) == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
        mine = mine.to(device)
        gathered = [t.to(device) for t in gathered]
    dist.all_gather(gathered, mine, group=group)
    shards = [tuple(int(x) for x in t.tolist()) for t in gathered]
    problems = []
    if any(a < 0 or b < a or b > total for a, b in shards):
        problems.append(f"each shard must satisfy 0 <= lo <= hi <= {total}")
    covered = sorted(s for s in shards if s[1] > s[0])
    position = 0
    for a, b in covered:
        if a != position:
            problems.append(f"{'overlap' if a < position else 'gap'} at element {min(a, position)}")
            break
        position = b
    if position != total and not problems:
        problems.append(f"the shards end at {position}, not at R_total = {total}")
    if problems:
        raise ValueError(
            f"the dS shards of the {world} ranks {shards} do not tile the packed buffer "
            f"[0, {total}): {'; '.join(problems)}; give each rank a contiguous (lo, hi) so that "
            "together they cover every element exactly once"
        )
