"""SVD-basis adapter: every target Linear becomes W_eff = U diag(S + dS) Vh, and only dS trains.

All dS of a model live in ONE packed float32 Parameter (`Adapter.delta`), module m owning
delta[offsets[m]:offsets[m+1]]. Each `SVDLinear.delta_S` is a view of it, so `delta.grad` is one
contiguous buffer that the projector walks in one launch. The Parameter is registered once, under
the first wrapped module (`<first module>.vhack_store.delta`), so `model.parameters()` yields it
and device moves carry it, whatever the model's type (on the root it would become a layer of an
nn.Sequential).

Exactness at dS = 0: the forward runs through a dense effective weight W_eff = W + U diag(dS) Vh
(W the original weight), which is W itself at dS = 0, while the dS gradient is always the exact
SVD-basis one. The wrapped model therefore reproduces the base model's logits at dS = 0 and doubles
as the KL reference.

Merge cache (when W_eff is recomputed). Each SVDLinear caches W_eff and reuses it while it is sure
dS did not change; deciding must not synchronise with the device (every layer checks on every
forward), so it compares host-side counters, never dS itself. W_eff is re-merged at the next
forward after any of:
  * an in-place op on `adapter.delta` or a view of it (`delta.add_`, `delta_S.copy_`, also under
    torch.no_grad() / inference_mode): autograd's version counter;
  * any `torch.optim.Optimizer.step()` (every torch optimizer and subclass: for-loop, foreach and
    fused, including ones that write through `.data` inside step): a global step post-hook
    (`register_optimizer_step_post_hook`) bumps a write clock;
  * reading or assigning `adapter.delta.data`: the Parameter is a `DeltaParameter`, whose `.data`
    bumps the clock (a `.data` tensor has its own version counter, so writes through it are
    otherwise invisible);
  * `adapter.load_state_dict`, the model's `load_state_dict`, device moves, `adapter.invalidate()`.
The clock is process-wide, so any optimizer step re-merges every adapter once (cheap: one merge per
module per step). Writes that none of these see need `adapter.invalidate()` afterwards: through a
`.data` alias kept from before, through `.data` of a view (`lin.delta_S.data`), or by kernels called
directly (`torch._fused_adamw_`, custom CUDA) outside an optimizer step.

Base weights written after wrapping. U, S, Vh are computed from the base weight at wrap time; if
the weight changes later, each module recomputes them (through the SVD cache) so that the forward
is W_new + U_new diag(dS) Vh_new, never new weights with stale factors:
  * `model.load_state_dict` (wrapped names `*.base_weight` or plain `*.weight`, also assign=True):
    at the load, only for modules whose weight really changed;
  * an in-place write into `base_weight` (`copy_`: its version counter) or a `.data` assignment
    (its storage moves): at the module's next forward (host-side counters, no device sync).
Writes through a `.data` alias (`base_weight.data.copy_(w)`) are not seen: call
`SVDLinear.refresh_factors()` after them. Saving and reloading a trained adapter:
`vhack.adapter_files`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils.hooks import RemovableHandle
from tqdm.auto import tqdm

from vhack import ops
from vhack.ops.svd_linear import check_segment_range
from vhack.svd_cache import svd_cache_dir, svd_factors

__all__ = [
    "DEFAULT_TARGETS",
    "Adapter",
    "DeltaParameter",
    "SVDLinear",
    "SegmentGrads",
    "peft_modules",
    "wrap",
]

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
STORE_NAME = "vhack_store"


# ---------------------------------------------------------------------------------------------
# The write clock: counts dS writes that autograd's version counter does not see (module docstring)
# ---------------------------------------------------------------------------------------------

_write_clock = 0
_optimizer_hook: RemovableHandle | None = None


def _tick() -> None:
    """Record that some adapter's dS may have changed behind its version counter."""
    global _write_clock
    _write_clock += 1


def _on_optimizer_step(optimizer, args, kwargs) -> None:
    _tick()  # a host-side counter: no device work, no synchronisation


def _install_optimizer_hook() -> None:
    """Register the global optimizer step post-hook once per process (on the first wrap())."""
    global _optimizer_hook
    if _optimizer_hook is None:
        _optimizer_hook = register_optimizer_step_post_hook(_on_optimizer_step)


class DeltaParameter(nn.Parameter):
    """The packed dS Parameter: an nn.Parameter whose `.data` (read or assigned) marks dS as
    possibly written, so merged weights cached from it are recomputed (see the module docstring).

    `.data` returns a tensor with its own version counter, so in-place writes through it would
    otherwise be invisible to the merge cache. Every other use is exactly an nn.Parameter's;
    operations on it return plain tensors. One visible difference: torch's optimizers pick their
    foreach implementation by default only for plain Tensors/Parameters, so on CUDA a group holding
    it defaults to the for-loop one (the same cost for this one packed tensor; pass foreach=True or
    fused=True if the group also holds many other parameters).
    """

    @property
    def data(self) -> torch.Tensor:
        _tick()
        return torch.Tensor.data.__get__(self)

    @data.setter
    def data(self, value: torch.Tensor) -> None:
        _tick()
        torch.Tensor.data.__set__(self, value)

    def __repr__(self) -> str:
        return "Parameter containing:\n" + repr(self.detach())

    def __reduce_ex__(self, proto):
        # Pickles as a DeltaParameter (nn.Parameter's own reduce would rebuild a plain Parameter).
        return (DeltaParameter, (self.detach(), self.requires_grad))


class DeltaStore(nn.Module):
    """Holds the packed dS Parameter [R_total] (float32) inside the wrapped model.

    It stays float32 whatever the model is cast to (`model.half()` moves it, never rounds it).
    """

    def __init__(self, total: int, device: torch.device) -> None:
        super().__init__()
        self.delta = DeltaParameter(torch.zeros(total, dtype=torch.float32, device=device))
        self.generation = 0  # bumped by invalidate(), loads and moves
        # The key() of `delta` while it is known to be all zero: merges are skipped then.
        self.zero_key: tuple[int, int, int, int] | None = self.key()
        self.capture: SegmentGrads | None = None

    def key(self) -> tuple[int, int, int, int]:
        """Host-side identity of `delta`'s current contents (no device sync): its storage, its
        in-place version counter, this store's generation and the process-wide write clock."""
        delta = self.delta
        return (delta.data_ptr(), delta._version, self.generation, _write_clock)

    def invalidate(self) -> None:
        """Make every merged weight cached from `delta` stale."""
        self.generation += 1

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self.invalidate()  # also covers load_state_dict(assign=True), which swaps the Parameter

    def _apply(self, fn, recurse=True):
        # Follow device moves but keep float32: probe the target device with an empty tensor.
        device = fn(torch.empty(0, dtype=torch.float32, device=self.delta.device)).device
        if device != self.delta.device:
            self.delta.data = self.delta.data.to(device)
            if self.delta.grad is not None:
                self.delta.grad = self.delta.grad.to(device)
            self.zero_key = None  # unknown after a move; merges are exact either way
            self.invalidate()
        return self

    def extra_repr(self) -> str:
        return f"delta: {self.delta.numel()} float32 parameters"


class SVDLinear(nn.Module):
    """A Linear re-parameterised in its own SVD basis: y = x (U diag(S + dS) Vh)^T + bias.

    Buffers (not saved in the model's state_dict; they are recomputed or read from the SVD cache):
    U [d_out, r] and Vh [r, d_in] in the weight's dtype, S [r] float32. Parameters: `base_weight`
    (the original weight, frozen) and `bias` (the original bias or None). `delta_S` [r] float32 is a
    view of the adapter's packed Parameter. Usable where code expects an nn.Linear: `in_features`,
    `out_features`, `bias`, and a read-only `weight` (the effective weight, detached).
    """

    def __init__(
        self,
        linear: nn.Linear,
        U: torch.Tensor,
        S: torch.Tensor,
        Vh: torch.Tensor,
        store: DeltaStore,
        span: tuple[int, int],
        owns_store: bool = False,
        *,
        name: str = "",
        svd_cache: Path | None = None,
    ) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.rank = S.numel()
        self.base_weight = linear.weight  # the same Parameter object as the original Linear's
        self.bias = linear.bias
        self.register_buffer("U", U, persistent=False)
        self.register_buffer("S", S, persistent=False)
        self.register_buffer("Vh", Vh, persistent=False)
        # Plain attributes, not submodules: the store is registered once (owns_store, the first
        # module) and the original Linear is only kept to be put back by unwrap().
        object.__setattr__(self, "_store", store)
        object.__setattr__(self, "_linear", linear)
        if owns_store:
            self.add_module(STORE_NAME, store)
        self._span = span
        self._merged: torch.Tensor | None = None
        # (the delta Parameter, its key()) the cached merge was computed from; a tuple, so that
        # nn.Module does not register the Parameter under this module too.
        self._merged_from: tuple | None = None
        # Set by Adapter.merged() to the merged weight: a plain dense forward, no dS gradient,
        # and no per-call cache check (generation is launch-bound at small batch).
        self.generation_weight: torch.Tensor | None = None
        self._name = name  # the module's name in the model, for error messages
        self._svd_cache = svd_cache  # where refresh_factors() finds or puts its SVDs
        # (base weight Parameter, its _version, its data_ptr) that U, S, Vh were computed from
        self._factors_of: tuple | None = self._weight_identity()

    @property
    def delta_S(self) -> torch.Tensor:
        """dS [r] float32: a view of the adapter's packed `delta` (gradients land in delta.grad)."""
        lo, hi = self._span
        return self._store.delta[lo:hi]

    @property
    def weight(self) -> torch.Tensor:
        """The effective weight W + U diag(dS) Vh [d_out, d_in], detached (read-only)."""
        return self.merged_weight()

    def __setattr__(self, name: str, value) -> None:
        if name == "weight":
            raise AttributeError(
                "SVDLinear.weight is read-only (the effective weight W + U diag(dS) Vh); train "
                "adapter.delta, or call adapter.merge() to get a plain nn.Linear back"
            )
        super().__setattr__(name, value)

    # Host-side bookkeeping: run eagerly under torch.compile (traced, its integer key would be
    # guarded on and recompiled at every optimizer step).
    @torch.compiler.disable
    def merged_weight(self) -> torch.Tensor:
        """W_eff [d_out, d_in] in the weight's dtype, cached until dS may have changed.

        The check compares host-side counters only (no device sync); the module docstring lists
        what invalidates the cache, and when to call `adapter.invalidate()` yourself. At dS = 0
        this is the original weight itself: no copy, no rounding.
        """
        self._check_factors()
        store = self._store
        delta_key = store.key()
        key = (*delta_key, self.base_weight.data_ptr(), self.U.dtype)
        # The source Parameter is compared by identity and kept alive by the cache, so a new
        # Parameter (load_state_dict(assign=True)) can never reuse the old storage's address.
        cached = self._merged_from
        if cached is None or cached[0] is not store.delta or cached[1] != key:
            with torch.no_grad():
                if delta_key == store.zero_key:
                    self._merged = self.base_weight.detach()
                else:
                    self._merged = ops.merge_weight(
                        self.U, self.S, self.delta_S.detach(), self.Vh, base=self.base_weight
                    )
            self._merged_from = (store.delta, key)
        return self._merged

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.generation_weight is not None:
            return nn.functional.linear(x, self.generation_weight, self.bias)
        capture = self._store.capture
        if capture is not None and torch.is_grad_enabled():
            weight = self.merged_weight()
            return _CapturedLinear.apply(x, self.delta_S, weight, self.bias, self, capture)
        return ops.svd_linear(
            x, self.U, self.S, self.delta_S, self.Vh, self.bias, weight=self.merged_weight()
        )

    def _apply(self, fn, recurse=True):
        S = self.S
        super()._apply(fn, recurse)
        self.S = S.to(self.U.device)  # singular values stay float32 whatever the model dtype
        self._merged, self._merged_from = None, None
        self._factors_of = self._weight_identity()  # U, Vh were moved / cast with the weight
        return self

    # ---- the SVD factors follow the base weight ----------------------------------------------
    def _weight_identity(self) -> tuple:
        weight = self.base_weight
        return (weight, weight._version, weight.data_ptr())

    def _check_factors(self) -> None:
        """Recompute U, S, Vh if the base weight was written since they were computed: an
        in-place write (`base_weight.copy_(w)`, bumps its version counter) or a `.data`
        assignment (moves its storage). Host-side counters only, no device work. A different
        Parameter object (FSDP2 swaps in its unsharded parameter during the forward) is not
        checked; `load_state_dict` handles its own replacements."""
        weight, source = self.base_weight, self._factors_of
        if (
            source is not None
            and weight is source[0]
            and (weight._version != source[1] or weight.data_ptr() != source[2])
        ):
            self.refresh_factors()

    def refresh_factors(self) -> None:
        """Recompute U, S, Vh from the current base weight (through the SVD cache of wrap), e.g.
        after writing the base weight in a way the version counter does not see (through a
        `.data` alias: `base_weight.data.copy_(w)`). dS keeps its values, now in the new
        weight's basis."""
        weight = self.base_weight
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(
                f"{self._name or 'SVDLinear'}: the base weight now has shape "
                f"{tuple(weight.shape)}, but the module was wrapped as [{self.out_features}, "
                f"{self.in_features}]; load weights of the same shape, or wrap the model again"
            )
        with torch.inference_mode(False), torch.no_grad():
            U, S, Vh = svd_factors(weight.detach(), self._svd_cache)
        self.U, self.S, self.Vh = U, S, Vh
        self._merged, self._merged_from = None, None
        self._factors_of = self._weight_identity()

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        # A plain (unwrapped) checkpoint names the base weight `<module>.weight`: accept it.
        plain, wrapped = prefix + "weight", prefix + "base_weight"
        if plain in state_dict and wrapped not in state_dict:
            state_dict = {(wrapped if k == plain else k): v for k, v in state_dict.items()}
        incoming = state_dict.get(wrapped)
        unchanged = (
            isinstance(incoming, torch.Tensor)
            and incoming.shape == self.base_weight.shape
            and torch.equal(
                incoming.detach().to(self.base_weight.device, self.base_weight.dtype),
                self.base_weight.detach(),
            )
        )
        before = self.base_weight
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if incoming is None or self.base_weight.shape != (self.out_features, self.in_features):
            return  # nothing loaded here, or a size mismatch torch reports itself
        if unchanged and self.base_weight is before:
            self._factors_of = self._weight_identity()  # the same values: U, S, Vh still hold
        else:
            self.refresh_factors()  # new weights (or a new Parameter, assign=True)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"bias={self.bias is not None}, dtype={self.U.dtype}"
        )


class _CapturedLinear(torch.autograd.Function):
    """SVDLinear inside Adapter.segment_grads(): the dense forward, and a backward that computes
    the per-segment dS gradients ONCE, stores them, and returns their sum as the dS gradient
    (instead of a summed reduction plus a second, per-segment one)."""

    @staticmethod
    def forward(ctx, x, dS, weight, bias, module, capture):
        ctx.save_for_backward(x, weight)
        ctx.module, ctx.capture = module, capture
        ctx.has_bias = bias is not None
        return nn.functional.linear(x, weight.to(x.dtype), bias)

    @staticmethod
    def backward(ctx, gy):
        x, weight = ctx.saved_tensors
        gx = g_dS = g_bias = None
        if ctx.needs_input_grad[0]:
            gx = (gy @ weight.to(gy.dtype)).to(x.dtype)
        g = ctx.capture.add(ctx.module, x.detach(), gy)
        if ctx.needs_input_grad[1]:
            g_dS = g.sum(0)
        if ctx.has_bias and ctx.needs_input_grad[3]:
            g_bias = gy.reshape(-1, gy.shape[-1]).sum(0)
        return gx, g_dS, None, g_bias, None, None


class SegmentGrads:
    """Per-segment dS gradients captured during one backward (see `Adapter.segment_grads`).

    `packed` [n_segments, R_total] float32, segment s of module m at packed[s, offsets[m]:
    offsets[m+1]]; `grads[name]` is the [n_segments, r] view of one module.
    """

    def __init__(self, adapter: Adapter, segment_ids: torch.Tensor, n_segments: int) -> None:
        self.segment_ids = segment_ids
        self.n_segments = n_segments
        self.packed = torch.zeros(
            n_segments, adapter.delta.numel(), dtype=torch.float32, device=adapter.delta.device
        )
        self.grads = {
            name: self.packed[:, mod._span[0] : mod._span[1]]
            for name, mod in adapter.modules.items()
        }

    def add(self, module: SVDLinear, x: torch.Tensor, gy: torch.Tensor) -> torch.Tensor:
        """Add the per-segment dS gradient of `module` for input x and output gradient gy;
        return it [n_segments, r]."""
        # The ids were range-checked once by Adapter.segment_grads: no host sync per module.
        g = ops.delta_grad(
            x,
            gy,
            module.U,
            module.Vh,
            self.segment_ids,
            n_segments=self.n_segments,
            check_ids=False,
        )
        lo, hi = module._span
        self.packed[:, lo:hi] += g
        return g

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.grads[name]


class Adapter:
    """Handle on a wrapped model: the SVDLinear modules, the packed dS, and its life cycle.

    Created by `vhack.wrap`. `modules` is ordered as packed; `delta` [R_total] float32 is the only
    trainable Parameter of the model; `offsets` int64 [M + 1] (on delta's device) delimits modules.
    """

    def __init__(
        self,
        model: nn.Module,
        modules: dict[str, SVDLinear],
        store: DeltaStore,
        requires_grad_before: dict[str, bool],
    ) -> None:
        self.model = model
        self.modules = modules
        self._store = store
        self._requires_grad_before = requires_grad_before
        self._offsets_list = [0]
        for mod in modules.values():
            self._offsets_list.append(self._offsets_list[-1] + mod.rank)
        self._offsets_by_device: dict[torch.device, torch.Tensor] = {}
        self._attached = True

    # ---- packed state ------------------------------------------------------------------------
    @property
    def delta(self) -> nn.Parameter:
        """The packed dS, one float32 Parameter [R_total]."""
        return self._store.delta

    @property
    def offsets(self) -> torch.Tensor:
        """int64 [M + 1] on delta's device: module m owns delta[offsets[m]:offsets[m+1]]."""
        device = self.delta.device
        if device not in self._offsets_by_device:
            self._offsets_by_device[device] = torch.tensor(
                self._offsets_list, dtype=torch.int64, device=device
            )
        return self._offsets_by_device[device]

    @property
    def names(self) -> list[str]:
        """Module names in packed order."""
        return list(self.modules)

    @property
    def ranks(self) -> list[int]:
        """r of every module, in packed order."""
        return [mod.rank for mod in self.modules.values()]

    def __len__(self) -> int:
        return len(self.modules)

    def __repr__(self) -> str:
        return (
            f"Adapter({len(self.modules)} modules, {self.delta.numel()} trainable dS parameters, "
            f"device={self.delta.device})"
        )

    def _check_attached(self) -> None:
        if not self._attached:
            raise RuntimeError("this adapter was unwrapped or merged; wrap the model again")

    # ---- dS by module name ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """{module name: dS [r] float32}: independent copies, ready for safetensors."""
        self._check_attached()
        return {name: mod.delta_S.detach().clone() for name, mod in self.modules.items()}

    def load_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Load dS by module name. Every name, shape and value (finite) is checked before anything
        is written: a bad state dict raises ValueError and leaves dS as it was."""
        self._check_attached()
        missing = [n for n in self.modules if n not in state_dict]
        unexpected = [n for n in state_dict if n not in self.modules]
        if missing or unexpected:
            raise ValueError(
                f"adapter state_dict does not match the wrapped modules: missing {missing}, "
                f"unexpected {unexpected}"
            )
        wrong = {
            n: tuple(getattr(t, "shape", ()))
            for n, t in state_dict.items()
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != (self.modules[n].rank,)
        }
        if wrong:
            expected = {n: (self.modules[n].rank,) for n in wrong}
            raise ValueError(f"wrong dS shapes: got {wrong}, expected {expected}")
        nonfinite = [n for n, t in state_dict.items() if not bool(torch.isfinite(t).all())]
        if nonfinite:
            raise ValueError(
                f"dS holds NaN/inf values for {len(nonfinite)} module(s): {nonfinite[:4]}"
                f"{' ...' if len(nonfinite) > 4 else ''}; the adapter is unchanged (was the "
                "state saved from a diverged run?)"
            )
        with torch.no_grad():
            for name, mod in self.modules.items():
                mod.delta_S.copy_(state_dict[name].to(torch.float32))
        self.invalidate()  # the copies bump the version counter already; this keeps it explicit

    # ---- files (vhack.adapter_files) ----------------------------------------------------------
    def save_pretrained(self, path: str | Path) -> Path:
        """Write the trained dS as adapter files into directory `path`: adapter_config.json
        (targets, ranks, dtype, vhack version, the base model's fingerprint) and
        adapter_model.safetensors ({module name: dS [r] float32}); no base weights. Reload with
        `vhack.load_adapter(base_model, path)`. Returns the directory."""
        from vhack.adapter_files import save_adapter

        return save_adapter(self, path)

    def load_pretrained(self, path: str | Path, strict: bool = True) -> None:
        """Load dS saved by `save_pretrained` into this adapter (same targets and ranks; the base
        weights are checked against the saved fingerprint: ValueError, or a warning with
        strict=False). Nothing is written unless every check passes."""
        from vhack.adapter_files import load_adapter_weights

        load_adapter_weights(self, path, strict=strict)

    def save_merged(self, path: str | Path, tokenizer=None) -> Path:
        """Write the trained model as a plain Hugging Face model directory: merged weights
        W + U diag(dS) Vh under the base model's names, no vhack names, plus the tokenizer when
        given. `AutoModelForCausalLM.from_pretrained(path)` loads it: the way to serve (vLLM) or
        publish it (`from_pretrained(path).push_to_hub(repo)`, or upload the directory). The
        wrapped model is not changed."""
        from vhack.adapter_files import save_merged

        return save_merged(self, path, tokenizer=tokenizer)

    def invalidate(self) -> None:
        """Recompute every module's merged weight at its next use.

        Needed only after writing dS in a way the merge cache cannot see (see `vhack.adapter`):
        through a `.data` alias kept from before, through `.data` of a view such as
        `adapter.modules[name].delta_S.data`, or by calling kernels directly outside an
        `optimizer.step()`. Optimizer steps, in-place ops on `delta`, `delta.data` and
        `load_state_dict` are seen without it. Host-side only (no device work).
        """
        self._check_attached()
        self._store.invalidate()

    # ---- per-segment gradients ---------------------------------------------------------------------
    @contextmanager
    def segment_grads(
        self, segment_ids: torch.Tensor, n_segments: int | None = None
    ) -> Iterator[SegmentGrads]:
        """Capture per-segment dS gradients of every module from ONE backward.

        segment_ids: int64 [N], one id per token row (x.reshape(-1, d_in) of every wrapped Linear,
        e.g. torch.arange(B).repeat_interleave(T) for a [B, T] batch), in any order (contiguous
        ids are the fast case of the Triton kernel), checked once here. Run the forward inside the
        block (its backward may run inside or after it); once the backward ran, `.packed`
        [n_segments, R_total] holds each segment's gradient, and delta's gradient is their sum
        (each module's per-segment reduction runs once and gives both). Not for use with
        activation checkpointing, which would run the capturing forward twice.
        """
        self._check_attached()
        if self._store.capture is not None:
            raise RuntimeError("segment_grads() is already active on this adapter")
        if not isinstance(segment_ids, torch.Tensor) or segment_ids.dtype != torch.int64:
            raise TypeError("segment_ids must be an int64 tensor [N]")
        if segment_ids.dim() != 1:
            raise ValueError(f"segment_ids must be 1-D [N], got shape {tuple(segment_ids.shape)}")
        segment_ids = segment_ids.to(self.delta.device).contiguous()
        # Check the ids once here (one host sync), so the per-module reductions skip the check.
        n_segments = check_segment_range(segment_ids, n_segments)
        capture = SegmentGrads(self, segment_ids, n_segments)
        self._store.capture = capture
        try:
            yield capture
        finally:
            self._store.capture = None

    # ---- generation / life cycle -------------------------------------------------------------------
    @contextmanager
    def merged(self) -> Iterator[nn.Module]:
        """Run the model through dense merged weights (for generation); yields the model.

        Each module merges W_eff = W + U diag(dS) Vh on entry, re-merging only when dS may have
        changed since its last merge (the merge kernel on CUDA; what counts as a change: see
        `vhack.adapter`); the forward is then a plain dense Linear with no per-call check, so dS
        changed inside the block takes effect at the next entry. No dS gradient flows inside the
        block.
        """
        self._check_attached()
        for mod in self.modules.values():
            mod.generation_weight = mod.merged_weight()
        try:
            yield self.model
        finally:
            for mod in self.modules.values():
                mod.generation_weight = None

    @contextmanager
    def base(self) -> Iterator[nn.Module]:
        """Run the model as the base model (dS bypassed: a dense forward through the original
        weights, whatever dS holds); yields the model. The exact KL reference of RL fine-tuning
        without a second copy. dS is not touched and gets no gradient inside the block; nesting
        inside `merged()` (or the reverse) is fine: the outer block's weights come back after."""
        self._check_attached()
        saved = [mod.generation_weight for mod in self.modules.values()]
        for mod in self.modules.values():
            mod.generation_weight = mod.base_weight.detach()
        try:
            yield self.model
        finally:
            for mod, weight in zip(self.modules.values(), saved, strict=True):
                mod.generation_weight = weight

    def merged_state_dict(self) -> dict[str, torch.Tensor]:
        """The dense model's state_dict (what `merge()` then `model.state_dict()` would give)
        without changing the model: same keys and order, wrapped Linears' weights merged
        (W + U diag(dS) Vh in the weight's dtype), everything else shared with the model. For
        pushing weights to an inference engine (vLLM); see vhack.integrations.weights. Values
        are detached: merged weights are fresh tensors, the rest share storage with the model."""
        self._check_attached()
        store = {n for n, p in self.model.named_parameters() if p is self.delta}
        weights = {f"{name}.base_weight": mod for name, mod in self.modules.items()}
        out: dict[str, torch.Tensor] = {}
        for name, tensor in self.model.state_dict(keep_vars=False).items():
            if name in store:
                continue
            if name in weights:
                out[name.removesuffix(".base_weight") + ".weight"] = weights[name].merged_weight()
            else:
                out[name] = tensor
        return out

    def unwrap(self) -> nn.Module:
        """Put the original nn.Linear modules back (weights unchanged), restore every parameter's
        requires_grad, and remove the dS store. Returns the model."""
        self._check_attached()
        for name, mod in self.modules.items():
            _set_submodule(self.model, name, mod._linear)  # the store leaves with the first module
        for name, param in self.model.named_parameters():
            if name in self._requires_grad_before:
                param.requires_grad_(self._requires_grad_before[name])
        self._attached = False
        return self.model

    def merge(self) -> nn.Module:
        """Write W_eff = W + U diag(dS) Vh into the original Linear weights, then unwrap."""
        self._check_attached()
        with torch.no_grad():
            merged = {name: mod.merged_weight().clone() for name, mod in self.modules.items()}
            for name, mod in self.modules.items():
                mod._linear.weight.copy_(merged[name])
        return self.unwrap()


# ---------------------------------------------------------------------------------------------
# wrap()
# ---------------------------------------------------------------------------------------------


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _output_embedding_ids(model: nn.Module) -> set[int]:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return {id(head)} if head is not None else set()


def peft_modules(model: nn.Module) -> list[str]:
    """Names of the modules of `model` that come from the PEFT library (LoRA layers and the
    PeftModel wrappers; "" for the root): non-empty when PEFT was applied to it. Duck-typed, so
    it needs no PEFT install."""
    return [
        name
        for name, module in model.named_modules()
        if type(module).__module__.split(".")[0] == "peft"
    ]


def _resolve_targets(model: nn.Module, targets) -> list[tuple[str, nn.Linear]]:
    """(name, Linear) of every module `targets` selects, in model order; clear errors otherwise."""
    named = [(n, m) for n, m in model.named_modules() if n]
    linear_names = [n for n, m in named if isinstance(m, nn.Linear)]

    def available() -> str:
        shown = ", ".join(linear_names[:40]) + (" ..." if len(linear_names) > 40 else "")
        return f"nn.Linear modules in this model: [{shown}]" if linear_names else "it has none"

    if isinstance(targets, str) and targets == "all-linear":
        skip = _output_embedding_ids(model)
        chosen = [
            (n, m)
            for n, m in named
            if isinstance(m, nn.Linear) and id(m) not in skip and n.split(".")[-1] != "lm_head"
        ]
        if not chosen:
            raise ValueError(f"targets='all-linear' matched no module; {available()}")
        return chosen

    explicit = targets is not None
    if targets is None:
        patterns = list(DEFAULT_TARGETS)
    elif isinstance(targets, str):
        patterns = [targets]
    elif isinstance(targets, Sequence) and all(isinstance(t, str) for t in targets):
        patterns = list(targets)
    else:
        raise TypeError(
            "targets must be None, 'all-linear', or a list of module names / name suffixes"
        )

    def matches(name: str, pattern: str) -> bool:
        return name == pattern or name.endswith("." + pattern)

    chosen, unmatched = [], []
    for pattern in patterns:
        if not any(matches(n, pattern) for n, _ in named):
            unmatched.append(pattern)
    if (explicit and unmatched) or len(unmatched) == len(patterns):
        raise ValueError(f"targets {unmatched} matched no module; {available()}")
    for name, module in named:
        if any(matches(name, p) for p in patterns):
            if isinstance(module, SVDLinear):
                continue  # reported by the already-wrapped check
            if not isinstance(module, nn.Linear):
                raise TypeError(
                    f"target {name!r} is a {type(module).__name__}, not an nn.Linear; "
                    f"target Linear layers only ({available()})"
                )
            chosen.append((name, module))
    seen: dict[int, str] = {}
    for name, module in chosen:
        if id(module) in seen:
            raise ValueError(
                f"the same Linear appears as {seen[id(module)]!r} and {name!r}; "
                "shared modules cannot be wrapped"
            )
        seen[id(module)] = name
    return chosen


def wrap(
    model: nn.Module,
    targets: str | Sequence[str] | None = None,
    *,
    cache_dir: str | Path | None = None,
    use_cache: bool = True,
    progress: bool = True,
) -> Adapter:
    """Re-parameterise the target Linears of `model` in their SVD basis, in place.

    targets: None = the q/k/v/o/gate/up/down projections; "all-linear" = every nn.Linear but the LM
    head; or a list of full module names / name suffixes (each must match). Every other parameter
    is frozen (unwrap() restores them). SVDs run in float32 on the weight's device and are cached
    on disk by a content hash of the weight (cache_dir, default `vhack.cache.cache_dir()`; set
    use_cache=False, or VHACK_SVD_CACHE=0 in the environment, to skip it). Nothing in the model
    changes unless wrapping succeeds.
    Returns the `Adapter` handle.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if any(isinstance(m, SVDLinear) for m in model.modules()):
        raise ValueError("model is already wrapped by vhack; call adapter.unwrap() first")
    peft = peft_modules(model)
    if peft:
        raise ValueError(
            f"model is a PEFT model ({len(peft)} PEFT modules, e.g. {peft[-1]!r}): vhack trains dS "
            "of the base weights in place of LoRA and does not combine with PEFT; wrap the base "
            "model instead (before get_peft_model, or peft_model.merge_and_unload())"
        )
    chosen = _resolve_targets(model, targets)
    for name, lin in chosen:
        if lin.weight.dtype not in SUPPORTED_DTYPES:
            raise TypeError(
                f"{name}: weight dtype {lin.weight.dtype} is not supported (float32, bfloat16, "
                "float16, float64); dequantize the model first"
            )
        if lin.weight.device.type == "meta":
            raise ValueError(f"{name}: weight is on the meta device; load real weights first")
        if not bool(torch.isfinite(lin.weight).all()):
            raise ValueError(
                f"{name}: weight holds NaN/inf values, which have no SVD; load or repair the "
                "model's weights before wrapping"
            )
    devices = {lin.weight.device for _, lin in chosen}
    if len(devices) > 1:
        raise ValueError(
            f"target weights span several devices {sorted(map(str, devices))}; the packed dS "
            "lives on one device, so place the wrapped Linears on one device"
        )

    cache = svd_cache_dir(cache_dir, use_cache)
    factors = [
        svd_factors(lin.weight, cache)
        for _, lin in tqdm(chosen, desc="vhack: SVD of target weights", disable=not progress)
    ]

    # Everything that can fail has run; now change the model.
    _install_optimizer_hook()
    store = DeltaStore(sum(S.numel() for _, S, _ in factors), devices.pop())
    modules: dict[str, SVDLinear] = {}
    offset = 0
    for (name, lin), (U, S, Vh) in zip(chosen, factors, strict=True):
        span = (offset, offset + S.numel())
        modules[name] = SVDLinear(
            lin, U, S, Vh, store, span, owns_store=not modules, name=name, svd_cache=cache
        )
        offset += S.numel()
    requires_grad_before = {n: p.requires_grad for n, p in model.named_parameters()}
    for param in model.parameters():
        param.requires_grad_(False)
    for name, mod in modules.items():
        _set_submodule(model, name, mod)
    return Adapter(model, modules, store, requires_grad_before)
