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
  flat partition): `ShardedProjector` assembles the full packed gradient (or update) on every rank
  in one all-reduce of R_total floats (each rank contributes its shard, zeros elsewhere; about
  2 MB for a 4B model), runs the ordinary Projector's projection on it (the one projection step,
  through vhack.ops' backend dispatch: Triton on CUDA, C++ on CPU when built), and keeps its
  shard. Results and statistics are exactly those of the single-process projection of the
  concatenated gradient, on every rank.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

import vhack

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
    change since snapshot() (where="update"); target may also be a local shard tensor [hi - lo]
    (a gradient for where="grad", a change Delta for where="update", as for Projector.project_).
    pre_step() / post_step() run it around optimizer.step() in the Projector's order. Returns
    global ProjStats (identical on every rank), also kept as last_stats; on_nonfinite behaves as
    the Projector's. Collective: every rank must call it.
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
        self._full: torch.Tensor | None = None

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

    def pre_step(self) -> vhack.ProjStats | None:
        """`vhack.Projector.pre_step` on the shards: where="grad" projects the local gradient
        (None when there is none), where="update" snapshots. Collective for where="grad"."""
        if self.where == "update":
            self.snapshot()
            return None
        if self.param.grad is None:
            return None
        return self.project_()

    def post_step(self) -> vhack.ProjStats | None:
        """`vhack.Projector.post_step` on the shards: where="update" projects the change."""
        return self.project_() if self.where == "update" else None

    def _run(self, target, mode: str) -> vhack.ProjStats:
        """Assemble the full target on every rank, project it with the Projector (its checks,
        on_nonfinite contract and backend), keep this rank's shard."""
        run = self.projector.measure if mode == "measure" else self.projector.project_
        step = target is None and self.where == "update"
        if target is not None:
            local = self._local(target)
        elif self.where == "grad":
            grad = self.param.grad
            if grad is None:
                raise RuntimeError("adapter.delta.grad is None: call project_() after backward")
            local = self._local(grad)
        else:
            if self._snapshot is None:
                raise RuntimeError('where="update": call snapshot() before the optimizer step')
            local = self._local(self.param.detach())
        try:
            # a packed target of a where="update" Projector is the change Delta (see Projector)
            full = self._assemble(local - self._snapshot if step else local)
            try:
                stats = run(full)
            except RuntimeError:  # on_nonfinite="raise": nothing projected, on every rank
                if step:
                    with torch.no_grad():
                        local.copy_(self._snapshot)  # all-or-nothing: undo the step, as Projector
                    self._snapshot = None
                raise
        finally:
            # The merged weights cached from dS must not outlive this step: under FSDP2 the next
            # forward all-gathers the new values into the same unsharded buffer, a write the
            # adapter's cache cannot see by itself (host-side counter, no device work).
            self.adapter.invalidate()
        if mode != "measure":
            mine = full[self.lo : self.hi]
            with torch.no_grad():
                if step:
                    new = self._snapshot + mine
                    if self.projector.on_nonfinite != "ignore" and not stats.all_finite():
                        bad = self._module_mask(~torch.isfinite(stats.raw[:, [0, 2]]).all(1))
                        new = torch.where(bad, self._snapshot, new)  # pre-step values
                    local.copy_(new.to(local.dtype))
                    self._snapshot = None
                else:
                    local.copy_(mine)
        self.last_stats = stats
        return stats

    def _assemble(self, local: torch.Tensor) -> torch.Tensor:
        """The full packed tensor [R_total] on every rank: each rank's shard, zeros elsewhere,
        summed in one all-reduce (the shards tile the buffer, so the sum is the concatenation,
        exactly)."""
        delta = self.adapter.delta
        if self._full is None or self._full.dtype != local.dtype:
            self._full = torch.empty(delta.shape, dtype=local.dtype, device=local.device)
        full = self._full
        with torch.no_grad():
            full.zero_()
            full[self.lo : self.hi].copy_(local)
            dist.all_reduce(full, op=dist.ReduceOp.SUM, group=self.group)
        return full

    def _module_mask(self, modules: torch.Tensor) -> torch.Tensor:
        """bool [hi - lo]: the local elements that belong to the given modules (bool [M])."""
        ranks = torch.tensor(self.adapter.ranks, device=modules.device)
        full = modules.repeat_interleave(ranks, output_size=sum(self.adapter.ranks))
        return full[self.lo : self.hi]


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
