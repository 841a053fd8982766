"""Projector: remove the hack-ward component of every module's dS gradient (or update), with the
cin statistics of the same pass.

    proj = vhack.Projector(adapter, basis)            # basis packed once, in the adapter's order
    loss.backward(); stats = proj.project_(); optimizer.step()
    # or: proj.attach(optimizer)  (projects inside every optimizer.step())
    # or: stats = proj.pre_step(); optimizer.step(); stats = proj.post_step() or stats
    #     (the one projection step, in the order attach, VHackCallback and the GRPO trainer use)

The basis is a dict {module name: V [k, r]} (research-code style) or any object with `.names`
and `.V(name)` (vhack.HackBasis). Modules the basis does not cover are not projected (k = 0) but
still get statistics (`vhack.projstats`). Each call is one `vhack.ops.project_` over the packed
gradient: one kernel launch on CUDA, one parallel C++ pass on CPU.

Update mode (where="update") closes the leak through Adam: even with every gradient projected,
the moments and the per-coordinate scaling move the parameter change back into span(V). The
projector then snapshots dS before the optimizer step and projects the change Delta after it.
Sign: the optimizer moves AGAINST the loss gradient, so the hack-promoting side of an update is
V Delta < 0 (the mirror of V g > 0 for a gradient), and the one-sided rule becomes
    Delta <- Delta + V^T relu(-V Delta).
It is computed as the gradient rule applied to u = -Delta (u <- u - V^T relu(V u)), which also
makes the statistics directly comparable: |relu(Vu)| = |relu(-V Delta)|, the hack-promoting part
of the update. Applying the gradient rule to Delta itself would keep exactly the hack-promoting
part and remove the rest.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Mapping

import torch

from vhack import ops
from vhack.adapter import Adapter
from vhack.basis import SV_PREFIX, HackBasis, check_compatible, fingerprint_mismatches
from vhack.ops.modes import check_mode
from vhack.projstats import ONE_SIDED_MODES, ProjStats, cin, cin_mean

__all__ = [
    "ORTHONORMAL_TOL",
    "ProjStats",
    "Projector",
    "as_hack_basis",
    "check_basis_rows",
    "cin",
    "cin_mean",
]

# Basis rows must satisfy max |V V^T - I| <= ORTHONORMAL_TOL (all-zero rows are exempt: extraction
# zeroes weak axes with tau_axis). float32 SVD output is orthonormal to ~1e-6.
ORTHONORMAL_TOL = 1e-3
WHERE = ("grad", "update")
ON_NONFINITE = ("raise", "warn", "ignore")


class Projector:
    """Projects the hack-ward component out of an adapter's packed dS gradient (or update).

    adapter: a vhack.Adapter. basis: a vhack.HackBasis, a dict {module name: V [k, r]}, or an
    object with `.names` and `.V(name)`; rows orthonormal (or all zero), oriented hack-ward. It is
    packed once, in the adapter's module order (`HackBasis.packed`). mode: "hackward" (one-sided,
    default), "both", "reverse" or "measure"; alpha: overshoot factor; where: "grad" (project
    dS.grad) or "update" (project the parameter change of each optimizer step; see the module
    docstring for the sign).

    Compatibility (checked here, like `HackBasis.load`): every basis module must be wrapped with
    the same r; a basis that carries a model fingerprint (from `vhack.extract` or a file) must
    match this model's weights (another seed, depth or checkpoint is refused: strict=False turns
    that into a warning). A basis that does not cover every wrapped module (a basis made for
    other targets or a smaller model, a hand-made dict) is refused unless partial=True; the
    modules left unprojected are then listed in `unprojected` and in a warning. Modules an
    extracted basis dropped itself (the noise floor of `HackBasis.load(drop_bottom_frac=...)`)
    are not a partial match.

    Keyword-only: k (use the first k rows of every module; None = all stored rows; a module that
    stores fewer is an error), preserve_magnitude (rescale each projected module to its original
    norm), on_nonfinite (what a NaN/inf gradient or update does; one host synchronisation per call
    unless "ignore"):
      "raise"  (default) all-or-nothing: nothing is projected, RuntimeError names the modules.
               where="grad": adapter.delta.grad is left exactly as backward produced it (and the
               optimizer step, when attached, does not run); where="update": adapter.delta is
               restored to its value before the optimizer step (the optimizer's own state, e.g.
               Adam's moments, has advanced).
      "warn"   the finite modules are projected, the non-finite ones left as they were (for an
               update: they keep their pre-step values); a RuntimeWarning names them.
      "ignore" as "warn" without the check or the warning; the statistics still show NaN.
    strict, partial: see Compatibility. orthonormal_tol (ORTHONORMAL_TOL), backend (force a
    vhack.ops backend).
    """

    def __init__(
        self,
        adapter: Adapter,
        basis,
        mode: str = "hackward",
        alpha: float = 1.0,
        where: str = "grad",
        *,
        k: int | None = None,
        preserve_magnitude: bool = False,
        on_nonfinite: str = "raise",
        strict: bool = True,
        partial: bool = False,
        orthonormal_tol: float = ORTHONORMAL_TOL,
        backend: str | None = None,
    ) -> None:
        if not isinstance(adapter, Adapter):
            raise TypeError(f"adapter must be a vhack.Adapter (from vhack.wrap), got {adapter!r}")
        check_mode(mode)
        if where not in WHERE:
            raise ValueError(f"where must be one of {WHERE}, got {where!r}")
        if on_nonfinite not in ON_NONFINITE:
            raise ValueError(f"on_nonfinite must be one of {ON_NONFINITE}, got {on_nonfinite!r}")
        if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
            raise TypeError(f"alpha must be a Python number, got {type(alpha).__name__}")
        if not (math.isfinite(alpha) and alpha >= 0):
            raise ValueError(
                f"alpha must be a finite number >= 0 (the overshoot factor; 1 removes the "
                f"hack-ward component exactly), got {alpha!r}"
            )
        if k is not None and (not isinstance(k, int) or isinstance(k, bool) or k < 0):
            raise ValueError(f"k must be None or an int >= 0, got {k!r}")
        hack_basis, declared = _convert(basis)
        self.unprojected = _check_coverage(
            adapter, hack_basis, declared, strict=strict, partial=partial
        )
        hack_basis = _checked_rows(hack_basis, k, orthonormal_tol)
        self.adapter = adapter
        self.mode = mode
        self.alpha = float(alpha)
        self.where = where
        self.preserve_magnitude = bool(preserve_magnitude)
        self.on_nonfinite = on_nonfinite
        self.backend = backend
        self.names = adapter.names
        packed = hack_basis.packed(adapter, device=adapter.delta.device)
        self.ks = packed.ks.tolist()
        self._packed: dict[torch.device, tuple[torch.Tensor, ...]] = {
            adapter.delta.device: (*packed, packed.ks > 0)
        }
        self._hooks: list = []
        self._snapshot: torch.Tensor | None = None
        self._work: torch.Tensor | None = None
        self._armed = False
        self.last_stats: ProjStats | None = None
        ops.project_(  # check the packed layout once, here, not in the first training step
            torch.zeros(adapter.delta.numel(), device=adapter.delta.device),
            adapter.offsets,
            *packed,
            "measure",
            backend=backend,
        )

    # ---- packed state --------------------------------------------------------------------------
    def _layout(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        """(basis, basis_offsets, ks, projected) on device: moved once if the adapter moved."""
        if device not in self._packed:
            first = next(iter(self._packed.values()))
            self._packed[device] = tuple(t.to(device) for t in first)
        return self._packed[device]

    @property
    def basis(self) -> torch.Tensor:
        """The packed basis float32 (module m's ks[m] x r_m rows at basis_offsets[m])."""
        return self._layout(self.adapter.delta.device)[0]

    def __repr__(self) -> str:
        n = sum(k > 0 for k in self.ks)
        return (
            f"Projector({n} of {len(self.names)} modules projected, k <= {max(self.ks, default=0)},"
            f" mode={self.mode!r}, alpha={self.alpha}, where={self.where!r})"
        )

    # ---- projection ----------------------------------------------------------------------------
    def project_(self, target=None) -> ProjStats:
        """Project in place and return the statistics (also kept as `last_stats`).

        target None: where="grad" projects adapter.delta.grad (call after backward, before the
        optimizer step); where="update" projects the change of adapter.delta since `snapshot()`
        (attach() does both around every step). target may also be a packed tensor [R_total] or a
        dict {module name: tensor [r]} (research-code style: packed on entry, written back in
        place; modules absent from the dict count as zero); it is a gradient for where="grad"
        and a parameter change Delta for where="update".
        """
        return self._run(target, self.mode)

    def measure(self, target=None) -> ProjStats:
        """The same statistics as project_(target), nothing modified."""
        return self._run(target, "measure")

    def _run(self, target, mode: str) -> ProjStats:
        delta = self.adapter.delta
        if target is None and self.where == "update":
            return self._project_step(mode)
        if target is None:
            if delta.grad is None:
                raise RuntimeError(
                    "adapter.delta.grad is None: call project_() after loss.backward() and before "
                    "optimizer.step() (or use attach(optimizer))"
                )
            return self._finish(self._project_checked(delta.grad, mode, negate=False))
        if isinstance(target, Mapping):
            packed, write_back = self._pack_dict(target)
            stats = self._project_checked(packed, mode, negate=self.where == "update")
            if mode != "measure":
                write_back(packed)
            return self._finish(stats)
        if isinstance(target, torch.Tensor):
            if target.dim() != 1 or target.numel() != delta.numel():
                raise ValueError(
                    f"a packed target must be 1-D with R_total = {delta.numel()} elements, got "
                    f"shape {tuple(target.shape)}"
                )
            if target.device != delta.device:
                raise ValueError(
                    f"target is on {target.device} but the adapter (and basis) on {delta.device}"
                )
            stats = self._project_checked(target, mode, negate=self.where == "update")
            return self._finish(stats)
        raise TypeError(
            "target must be None, a packed tensor [R_total] or a dict {module name: tensor [r]}, "
            f"got {type(target).__name__}"
        )

    def _project_packed(self, grad: torch.Tensor, mode: str, negate: bool) -> ProjStats:
        basis, basis_offsets, ks, projected = self._layout(grad.device)
        with torch.no_grad():
            if negate:
                grad.neg_()
            try:
                raw = ops.project_(
                    grad,
                    self.adapter.offsets,
                    basis,
                    basis_offsets,
                    ks,
                    mode,
                    self.alpha,
                    preserve_magnitude=self.preserve_magnitude,
                    backend=self.backend,
                )
            finally:
                if negate:
                    grad.neg_()
        return ProjStats(self.names, raw, projected, one_sided=self.mode in ONE_SIDED_MODES)

    def _project_checked(self, grad: torch.Tensor, mode: str, negate: bool) -> ProjStats:
        """_project_packed under the on_nonfinite="raise" contract: a non-finite target is not
        projected at all (one synchronisation, before any write) and raises."""
        if self.on_nonfinite == "raise" and mode != "measure" and not bool(grad.isfinite().all()):
            stats = self._project_packed(grad, "measure", negate)
            self.last_stats = stats
            what = "update" if self.where == "update" else "gradient"
            state = (
                "adapter.delta was restored to its value before the optimizer step"
                if self.where == "update" and grad is self._work
                else f"the {what} is unchanged"
            )
            raise RuntimeError(
                f"non-finite dS {what} in {_shorten(stats.nonfinite) or 'some module'}: nothing "
                f"was projected and {state} (on_nonfinite='raise'; 'warn' projects the finite "
                "modules and leaves these as they are)"
            )
        return self._project_packed(grad, mode, negate)

    def _finish(self, stats: ProjStats) -> ProjStats:
        self.last_stats = stats
        if self.on_nonfinite == "warn" and not stats.all_finite():  # one synchronisation
            bad = stats.nonfinite
            if bad:
                what = "update" if self.where == "update" else "gradient"
                kept = "keep their pre-step values" if self.where == "update" else "are unchanged"
                warnings.warn(
                    f"non-finite dS {what} in {len(bad)} module(s): {_shorten(bad)}; they {kept} "
                    "(the other modules were projected)",
                    RuntimeWarning,
                    stacklevel=3,
                )
        return stats

    # ---- update mode -----------------------------------------------------------------------------
    def snapshot(self) -> None:
        """Remember adapter.delta (before an optimizer step) for where="update"."""
        delta = self.adapter.delta.detach()
        if self._snapshot is None or self._snapshot.device != delta.device:
            self._snapshot = torch.empty_like(delta)
            self._work = torch.empty_like(delta)
        self._snapshot.copy_(delta)
        self._armed = True

    def _project_step(self, mode: str) -> ProjStats:
        """Project Delta = delta - snapshot: u = -Delta is projected like a gradient, then
        delta = snapshot - u'. Modules whose change is not finite keep their snapshot values
        (unless on_nonfinite="ignore")."""
        if not self._armed:
            raise RuntimeError(
                'where="update": call snapshot() before optimizer.step() and project_() after it '
                "(attach(optimizer) does both)"
            )
        delta = self.adapter.delta
        snap, work = self._snapshot, self._work
        with torch.no_grad():
            torch.sub(snap, delta, out=work)  # u = -Delta
            try:
                stats = self._project_checked(work, mode, negate=False)
            except RuntimeError:
                delta.data.copy_(snap)  # all-or-nothing: undo the step (see on_nonfinite)
                self._armed = False
                raise
            if mode != "measure":
                self._armed = False
                torch.sub(snap, work, out=delta.data)
                if self.on_nonfinite != "ignore" and not stats.all_finite():
                    bad = ~torch.isfinite(stats.raw[:, [0, 2]]).all(1)
                    ranks = torch.tensor(self.adapter.ranks, device=delta.device)
                    mask = bad.repeat_interleave(ranks, output_size=delta.numel())
                    delta.data.copy_(torch.where(mask, snap, delta.data))
        return self._finish(stats)

    # ---- the projection step around optimizer.step() ------------------------------------------
    def pre_step(self) -> ProjStats | None:
        """The projection's part just before optimizer.step(), the one order every caller uses
        (attach, VHackCallback, the GRPO trainer; ShardedProjector has the same two methods):
        where="grad" projects adapter.delta.grad and returns the statistics (None when no gradient
        reached dS this step: the optimizer skips dS then too); where="update" snapshots dS and
        returns None."""
        if self.where == "update":
            self.snapshot()
            return None
        if self.adapter.delta.grad is None:
            return None
        return self.project_()

    def post_step(self) -> ProjStats | None:
        """The projection's part just after optimizer.step(): where="update" projects the change
        of dS and returns the statistics; where="grad" does nothing (None)."""
        return self.project_() if self.where == "update" else None

    # ---- optimizer hooks -------------------------------------------------------------------------
    @property
    def attached(self) -> bool:
        """Whether attach() installed optimizer hooks that are still in place."""
        return bool(self._hooks)

    def attach(self, optimizer: torch.optim.Optimizer) -> Projector:
        """Run `pre_step` and `post_step` inside every optimizer.step(): where="grad" projects the
        gradient just before the step (after any gradient clipping you do outside the step: to
        project before clipping, call pre_step() yourself instead); where="update" snapshots dS
        before the step and projects the change after it. Statistics land in `last_stats`.
        Returns self."""
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {optimizer!r}")
        if self._hooks:
            raise RuntimeError("this Projector is already attached; call detach() first")
        other = getattr(optimizer, "_vhack_projector", None)
        if other is not None and other is not self and other.attached:
            raise RuntimeError(
                "another Projector is already attached to this optimizer (two would project "
                "twice and mix their statistics); detach() it first, or project with one "
                "Projector whose basis covers both"
            )
        delta = self.adapter.delta
        if not any(p is delta for group in optimizer.param_groups for p in group["params"]):
            raise ValueError(
                "the optimizer does not hold adapter.delta; build it with adapter.delta (e.g. "
                "torch.optim.AdamW([adapter.delta]))"
            )

        def no_closure(args, kwargs) -> None:
            # args = (optimizer, *step args) as torch passes them to step hooks
            closure = args[1] if len(args) > 1 else kwargs.get("closure")
            if closure is not None:
                raise RuntimeError(
                    "Projector.attach does not support optimizer.step(closure): the closure "
                    "recomputes gradients after the pre-step hook; call project_() yourself"
                )

        def pre(opt, args, kwargs):
            no_closure(args, kwargs)
            self.pre_step()

        def post(opt, args, kwargs):
            self.post_step()

        self._hooks = [optimizer.register_step_pre_hook(pre)]
        if self.where == "update":
            self._hooks.append(optimizer.register_step_post_hook(post))
        optimizer._vhack_projector = self  # what the next attach() to this optimizer checks
        return self

    def detach(self) -> None:
        """Remove the optimizer hooks (no-op when not attached)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        self._armed = False

    # ---- research-code style per-module tensors -----------------------------------------------
    def _pack_dict(self, grads: Mapping[str, torch.Tensor | None]):
        """Pack {name: tensor [r]} in the adapter's order (absent modules: zeros); return the
        packed tensor and a function that writes a packed tensor back into the dict's tensors."""
        modules = self.adapter.modules
        unknown = [n for n in grads if n not in modules]
        if unknown:
            raise ValueError(
                f"gradients for modules the adapter does not wrap: {_shorten(unknown)}"
            )
        missing = [n for n, t in grads.items() if t is None]
        if missing:
            raise RuntimeError(
                f"gradient missing (None) for {_shorten(missing)}: call after loss.backward()"
            )
        bad = [n for n, t in grads.items() if not isinstance(t, torch.Tensor)]
        if bad:
            raise TypeError(f"gradients must be tensors; not for {_shorten(bad)}")
        wrong = {
            n: tuple(t.shape) for n, t in grads.items() if tuple(t.shape) != (modules[n].rank,)
        }
        if wrong:
            expected = {n: (modules[n].rank,) for n in wrong}
            raise ValueError(f"wrong gradient shapes: got {wrong}, expected {expected}")
        dtypes = {t.dtype for t in grads.values()}
        if len(dtypes) > 1 or not dtypes <= {torch.float32, torch.bfloat16, torch.float16}:
            raise TypeError(
                f"gradients must share one float32/bfloat16/float16 dtype, got {sorted(map(str, dtypes))}"
            )
        device = self.adapter.delta.device
        off_device = [n for n, t in grads.items() if t.device != device]
        if off_device:
            raise ValueError(
                f"gradients of {_shorten(off_device)} are not on the adapter's device {device}"
            )
        dtype = dtypes.pop() if dtypes else torch.float32
        parts = [
            grads[n] if n in grads else torch.zeros(mod.rank, dtype=dtype, device=device)
            for n, mod in modules.items()
        ]
        packed = torch.cat(parts) if parts else torch.zeros(0, dtype=dtype, device=device)
        present = [n in grads for n in modules]

        def write_back(flat: torch.Tensor) -> None:
            views = flat.split(self.adapter.ranks)
            dst = [grads[n] for n, p in zip(modules, present, strict=True) if p]
            src = [v for v, p in zip(views, present, strict=True) if p]
            if dst:
                with torch.no_grad():
                    torch._foreach_copy_(dst, src)

        return packed, write_back


def _shorten(names: list[str], n: int = 8) -> str:
    shown = ", ".join(names[:n])
    return shown + (f", ... ({len(names) - n} more)" if len(names) > n else "")


def as_hack_basis(basis) -> HackBasis:
    """A HackBasis from a HackBasis (itself), a dict {name: V [k, r]} (research-code style; a
    raw file's "_sv/{name}" singular values are used when present, else sv is NaN: unknown), or
    an object with `.names` and `.V(name)`. Blocks with no rows are dropped (not projected)."""
    return _convert(basis)[0]


def _convert(basis) -> tuple[HackBasis, list[str]]:
    """(as_hack_basis(basis), the module names the basis declares, empty blocks included)."""
    if isinstance(basis, HackBasis):
        return basis, basis.names
    if isinstance(basis, Mapping):
        names = [n for n in basis if not str(n).startswith(SV_PREFIX)]
        get, get_sv = basis.__getitem__, lambda n: basis.get(SV_PREFIX + n)
    elif hasattr(basis, "names") and callable(getattr(basis, "V", None)):
        names, get = list(basis.names), basis.V
        sv_of = getattr(basis, "sv", None)
        get_sv = sv_of if callable(sv_of) else (lambda n: None)
    else:
        raise TypeError(
            "basis must be a vhack.HackBasis, a dict {module name: V [k, r]} or an object with "
            f".names and .V(name), got {type(basis).__name__}"
        )
    V, sv = {}, {}
    for name in names:
        block = get(name)
        if not isinstance(block, torch.Tensor) or block.dim() != 2:
            raise ValueError(
                f"basis block {name!r} must be a tensor [k, r], got "
                f"{tuple(block.shape) if isinstance(block, torch.Tensor) else type(block).__name__}"
            )
        if not block.is_floating_point():
            raise TypeError(
                f"basis block {name!r} has dtype {block.dtype}; expected a float tensor"
            )
        if block.shape[0] == 0:
            continue
        s = get_sv(name)
        V[name] = block
        sv[name] = s if s is not None else torch.full((block.shape[0],), float("nan"))
    if not V:
        raise ValueError("the basis holds no modules with basis rows")
    return HackBasis(V, sv, getattr(basis, "metadata", None)), names


def _check_coverage(
    adapter: Adapter, basis: HackBasis, declared: list[str], *, strict: bool, partial: bool
) -> list[str]:
    """Refuse a basis of another model (names, shapes, fingerprint) and, unless partial, one that
    does not cover every wrapped module; return the wrapped modules it does not cover. declared:
    the names the basis was given with (a dict's empty [0, r] blocks cover their module with no
    axes)."""
    rank_of = dict(zip(adapter.names, adapter.ranks, strict=True))
    foreign = [n for n in declared if n not in rank_of]
    if foreign:
        raise ValueError(
            f"basis: module names mismatch: {len(foreign)} basis module(s) are not wrapped in "
            f"this model ({_shorten(foreign)}); it was built for another model or other targets"
        )
    check_compatible(basis, rank_of, where="basis")
    stored = basis.metadata.get("fingerprint")
    source_names = list(declared)
    if stored:
        fingerprint = json.loads(stored)
        source_names = list(fingerprint.get("spectrum", {})) or source_names
        foreign = [n for n in source_names if n not in rank_of]
        problems = (
            [f"it was extracted from modules this model does not wrap: {_shorten(foreign)}"]
            if foreign
            else fingerprint_mismatches(fingerprint, adapter, source_names)
        )
        if problems:
            message = (
                "the basis was extracted from another model "
                f"({basis.metadata.get('model', 'unknown')!r}) than this adapter's: "
                + "; ".join(problems[:5])
                + (" ..." if len(problems) > 5 else "")
            )
            if strict:
                raise ValueError(message + ". Pass strict=False to use it anyway.")
            warnings.warn(message + " (used anyway: strict=False)", stacklevel=3)
    covered = set(source_names)
    uncovered = [n for n in adapter.names if n not in covered]
    if uncovered and not partial:
        raise ValueError(
            f"the basis covers {len(adapter.names) - len(uncovered)} of the {len(adapter.names)} "
            f"wrapped modules; not covered: {_shorten(uncovered)}. It was made for other targets "
            "or another model: extract one for this adapter, or pass partial=True to project "
            "only the covered modules"
        )
    if uncovered:
        warnings.warn(
            f"partial basis: {len(uncovered)} wrapped module(s) are not projected: "
            f"{_shorten(uncovered)}",
            stacklevel=3,
        )
    return uncovered


def check_basis_rows(
    basis: HackBasis, k: int | None = None, orthonormal_tol: float = ORTHONORMAL_TOL
) -> HackBasis:
    """The checks a Projector applies to a basis (ValueError naming the modules): k <= the rows
    stored, every row finite, rows orthonormal within orthonormal_tol (all-zero rows are legal).
    Returns the basis sliced to k rows (all for None). `vhack.validate` applies them too."""
    return _checked_rows(basis, k, orthonormal_tol)


def _checked_rows(basis: HackBasis, k: int | None, tol: float) -> HackBasis:
    """The first k rows of every module (all rows for k None), checked: finite and orthonormal
    (all-zero rows are legal: extraction zeroes weak axes with tau_axis)."""
    too_few = {n: basis.k(n) for n in basis.names if k is not None and basis.k(n) < k}
    if too_few:
        raise ValueError(
            f"k = {k} is larger than the rows stored for {len(too_few)} module(s): "
            f"{_shorten([f'{n} ({m} rows)' for n, m in too_few.items()])}; use k <= "
            f"{min(too_few.values())} or re-extract with a larger top_k"
        )
    if k == 0:
        raise ValueError("k = 0 projects nothing; use mode='measure' to only measure")
    nonfinite, not_orthonormal = [], {}
    for name in basis.names:
        V = basis.V(name)[:k].detach().to(device="cpu", dtype=torch.float64)
        if not torch.isfinite(V).all():
            nonfinite.append(name)
            continue
        gram = V @ V.T
        unit = (gram.diagonal() != 0).to(torch.float64)  # all-zero rows are legal
        err = (gram - torch.diag(unit)).abs().max().item()
        if err > tol:
            not_orthonormal[name] = err
    if nonfinite:
        raise ValueError(f"basis blocks with NaN/inf values: {_shorten(nonfinite)}")
    if not_orthonormal:
        worst = max(not_orthonormal.values())
        raise ValueError(
            f"basis rows must be orthonormal (or all zero): max |V V^T - I| > {tol} for "
            f"{_shorten([f'{n} ({e:.2e})' for n, e in not_orthonormal.items()])} (worst "
            f"{worst:.2e}); orthonormalise them (torch.linalg.qr(V.T).Q.T keeps the span) or "
            "pass a larger orthonormal_tol"
        )
    return basis if k is None else basis.sliced(k)
