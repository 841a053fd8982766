"""VHackCallback: the projector inside a transformers Trainer (and TRL trainers built on it).

    proj = vhack.Projector(adapter, basis)
    trainer = Trainer(model=model, args=args, ..., callbacks=[VHackCallback(proj)])

Where it runs, in transformers' order for every optimizer step (also with gradient accumulation,
where the hooks fire once, on the fully accumulated gradient):

    backward (DDP all-reduces the gradient here)
    -> clip to args.max_grad_norm (the Trainer)
    -> on_pre_optimizer_step: where="grad" projects dS.grad; where="update" snapshots dS
    -> optimizer.step()
    -> on_optimizer_step: where="update" projects the change of dS

So by default the gradient is clipped, then projected; the one-sided projection only shrinks a
gradient, so the clipping bound still holds. To project first and clip afterwards (the order the
design notes recommend), set TrainingArguments(max_grad_norm=0) and VHackCallback(proj,
max_grad_norm=1.0): the callback clips right after projecting.

Statistics (`vhack.projstats`: one formula, one set of names): every projection's
`vhack/cin_mean` (one-sided also in a measure-only run, so baseline and projected curves compare),
`vhack/cin_mean_two_sided`, `vhack/fired`, `vhack/energy_removed` (the fraction of the squared
gradient norm, or update norm, the projection took out), `vhack/energy_hackward`,
`vhack/norm_before` and `vhack/norm_after` are averaged over the optimizer steps between two
logging steps that had a gradient; `vhack/skipped_steps` counts the steps without one (a zero dS
gradient: every GRPO group without reward variance), which would otherwise turn the window's
averages into NaN. They are added to the trainer's periodic training log (the one with "loss";
steps after the last logging step stay in `callback.pop_metrics()`). They go in before
the log record is written, so they reach `trainer.state.log_history`, every report_to
integration and the console. How: at on_train_begin the callback finds the Trainer that fired
the event (the caller on the stack) and wraps its `log` method on that instance (restored at
on_train_end). The Trainer hands its callbacks no reference to itself, and mutating `logs` in
on_log is too late: the record is already copied into log_history and the reporting callbacks
registered before this one have already run. Where no Trainer can be found (a custom loop driving
the callbacks) the statistics are added in on_log instead, to the logs and the last log_history
record, with a warning that earlier report_to integrations miss them.

TRL: GRPOTrainer(model=wrapped_model, ..., callbacks=[VHackCallback(proj)]) works as is with
beta = 0. For beta > 0, see `vhack.integrations.use_zero_delta_reference` (the dS = 0 state of the
same model as the KL reference, no second model). With use_vllm=True the callback makes TRL's
weight sync send the merged dense weights under the base model's names (see
`vhack.integrations.weights`).

Saving: at on_init_end (and on_train_begin) the callback makes its trainer's `save_model`,
checkpoints and `push_to_hub` write the adapter files (adapter_config.json +
adapter_model.safetensors, dS only) instead of the base model under vhack's internal names, and
`train(resume_from_checkpoint=...)` load them; see `vhack.integrations.checkpoints`. It also
refuses, before TRL gets there, a PEFT-modified model and GRPOConfig(beta > 0) on a model TRL
cannot reload as its reference.

Not supported: DeepSpeed (the optimizer step runs inside backward, so no hook ever sees the
gradient; a clear error is raised) and FSDP through the Trainer (the packed dS would be sharded by
accelerate; use vhack.integrations.distributed in your own loop).
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Any

import torch
from transformers import TrainerCallback

import vhack
from vhack.adapter import peft_modules
from vhack.errors import UsageError
from vhack.integrations.checkpoints import install_adapter_checkpoints
from vhack.integrations.reference_model import check_reference_source
from vhack.projstats import METRIC_PREFIX, ProjStatsWindow

__all__ = ["METRIC_PREFIX", "VHackCallback"]


def _deepspeed_in_use(args) -> bool:
    """True when this run is (or will be) driven by DeepSpeed, through the Trainer or accelerate."""
    if getattr(args, "deepspeed", None) or getattr(args, "deepspeed_plugin", None) is not None:
        return True
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in ("1", "true", "yes"):
        return True
    try:
        from accelerate.state import AcceleratorState

        state = AcceleratorState._shared_state
        return bool(state) and state.get("deepspeed_plugin") is not None
    except ImportError:  # pragma: no cover - accelerate comes with transformers' Trainer
        return False


def _fsdp_in_use(args) -> bool:
    if getattr(args, "fsdp", None):
        return True
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true", "yes")


def _refuse_peft(model) -> None:
    peft = peft_modules(model) if model is not None else []
    if peft:
        raise UsageError(
            f"the Trainer's model has PEFT modules (e.g. {peft[-1]!r}): PEFT on a vhack-wrapped "
            "model is not supported (dS replaces LoRA, and PEFT freezes dS); pass the wrapped "
            "model without peft_config / get_peft_model"
        )


def _find_trainer(callback):
    """The transformers Trainer firing the current event: the nearest Trainer method on the call
    stack whose callbacks include `callback` (None when a custom loop drives the callbacks)."""
    from transformers import Trainer

    frame = sys._getframe(1)
    for _ in range(16):
        if frame is None:
            return None
        owner = frame.f_locals.get("self")
        if isinstance(owner, Trainer) and any(
            cb is callback for cb in owner.callback_handler.callbacks
        ):
            return owner
        frame = frame.f_back
    return None


class VHackCallback(TrainerCallback):
    """Runs a vhack projector once per optimizer step of a transformers Trainer and logs cin.

    projector: a vhack.Projector on the adapter of the model handed to the Trainer; where="grad" projects the gradient in on_pre_optimizer_step,
    where="update" projects the parameter change in on_optimizer_step. max_grad_norm: None (the
    Trainer clips before the projection, transformers' order) or a positive float: clip the
    gradient to it right after the projection (needs TrainingArguments(max_grad_norm=0), so that
    the Trainer does not clip first). log_metrics: add the statistics to the trainer's logs.
    """

    def __init__(
        self, projector, *, max_grad_norm: float | None = None, log_metrics: bool = True
    ) -> None:
        if not isinstance(projector, vhack.Projector):
            raise TypeError(
                f"projector must be a vhack.Projector, got {type(projector).__name__} (a "
                "ShardedProjector is for your own FSDP2 loop: the Trainer's FSDP is not supported)"
            )
        if max_grad_norm is not None and not (
            isinstance(max_grad_norm, (int, float)) and max_grad_norm > 0
        ):
            raise ValueError(
                f"max_grad_norm must be None or a positive number, got {max_grad_norm!r}"
            )
        if max_grad_norm is not None and projector.where != "grad":
            raise ValueError(
                'max_grad_norm (clip after projecting) applies to where="grad" only; with '
                'where="update" the update is projected after the step, so leave clipping to the '
                "Trainer"
            )
        self.projector = projector
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        self.log_metrics = bool(log_metrics)
        self.steps = 0  # optimizer steps projected since on_train_begin
        self._window = ProjStatsWindow()
        self._trainer = None
        self._wrapped_log = None
        self._pre_step: int | None = None
        self._post_step: int | None = None
        self._warned_fallback = False

    def __repr__(self) -> str:
        return f"VHackCallback({self.projector!r}, max_grad_norm={self.max_grad_norm})"

    # ---- checks ----------------------------------------------------------------------------------
    def _check_setup(self, args, model, optimizer) -> None:
        if _deepspeed_in_use(args):
            raise UsageError(
                "VHackCallback cannot run under DeepSpeed: DeepSpeed performs the optimizer step "
                "inside backward, so no callback ever sees the full dS gradient and the projection "
                "would silently do nothing; train without DeepSpeed (DDP: plain torchrun / "
                "accelerate multi-process; dS is small enough to stay replicated)"
            )
        if _fsdp_in_use(args):
            raise UsageError(
                "VHackCallback does not support the Trainer's FSDP (accelerate would shard the "
                "packed dS); use DDP, or FSDP2 in your own loop with "
                "vhack.integrations.distributed (dS kept replicated or sharded)"
            )
        adapter = self.projector.adapter
        if model is not None and not any(p is adapter.delta for p in model.parameters()):
            raise UsageError(
                "the Trainer's model does not hold this projector's adapter.delta: pass the "
                "model you wrapped with vhack.wrap (adapter = vhack.wrap(model)), and build "
                "the Projector on that adapter"
            )
        if not adapter.delta.requires_grad:
            raise UsageError(
                "adapter.delta does not require grad (frozen?): call adapter.delta.requires_grad_()"
            )
        if optimizer is not None:
            groups = getattr(optimizer, "param_groups", [])
            if not any(p is adapter.delta for g in groups for p in g["params"]):
                raise UsageError(
                    "the Trainer's optimizer does not hold adapter.delta; let the Trainer build it "
                    "from the wrapped model (only dS is trainable), or pass an optimizer over "
                    "adapter.delta"
                )
        if self.projector.attached:
            raise UsageError(
                "the projector is also attached to an optimizer (projector.attach): it would "
                "project twice per step; call projector.detach() and let the callback run it"
            )
        args_clip = getattr(args, "max_grad_norm", 0) or 0
        if self.max_grad_norm is not None and args_clip > 0:
            raise UsageError(
                f"VHackCallback(max_grad_norm={self.max_grad_norm}) clips after projecting, but "
                f"TrainingArguments.max_grad_norm={args_clip} also clips before it; set "
                "TrainingArguments(max_grad_norm=0)"
            )

    def _check_single(self, trainer) -> None:
        mine = [
            cb
            for cb in trainer.callback_handler.callbacks
            if isinstance(cb, VHackCallback)
            and (cb is self or cb.projector.adapter is self.projector.adapter)
        ]
        if len(mine) > 1:
            raise UsageError(
                f"{len(mine)} VHackCallbacks project the same adapter in this Trainer (the "
                "callback was added twice?): the projection would run several times per step; "
                "keep one (combine bases into one Projector if you need several)"
            )

    def _once_per_step(self, state, attr: str) -> None:
        """A second call for the same optimizer step means the callback was registered twice."""
        if getattr(self, attr) == state.global_step:
            raise UsageError(
                "VHackCallback ran twice in one optimizer step: it is registered twice on this "
                "Trainer; keep one"
            )
        setattr(self, attr, state.global_step)

    # ---- events ----------------------------------------------------------------------------------
    def on_init_end(self, args, state, control, model=None, **kwargs):
        _refuse_peft(model)
        check_reference_source(args, model)  # TRL builds its reference right after this event
        self._install_checkpoints(_find_trainer(self))
        return control

    def _install_checkpoints(self, trainer) -> None:
        """Checkpoints and save_model of this trainer write the adapter files (see
        vhack.integrations.checkpoints)."""
        adapter = self.projector.adapter
        if trainer is not None and any(p is adapter.delta for p in trainer.model.parameters()):
            install_adapter_checkpoints(trainer, adapter)

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        _refuse_peft(model)
        self._check_setup(args, model, optimizer)
        self._window = ProjStatsWindow()
        self.steps = 0
        self._pre_step = self._post_step = None
        trainer = _find_trainer(self)
        if trainer is not None:
            self._check_single(trainer)
            self._install_checkpoints(trainer)  # a callback added after __init__
            if self.log_metrics:
                self._install_log(trainer)
            vllm = getattr(trainer, "vllm_generation", None)
            if vllm is not None:  # TRL with use_vllm=True
                from vhack.integrations.weights import patch_vllm_sync

                patch_vllm_sync(vllm, self.projector.adapter)
        return control

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self._once_per_step(state, "_pre_step")
        stats = self.projector.pre_step()  # None: snapshot only (update), or no gradient reached dS
        if self.projector.where == "update":
            return control
        if stats is not None and self.max_grad_norm is not None:
            params = [p for p in (model or self.projector.adapter.model).parameters()]
            torch.nn.utils.clip_grad_norm_(
                [p for p in params if p.grad is not None], self.max_grad_norm
            )
        self._record(stats)
        return control

    def on_optimizer_step(self, args, state, control, **kwargs):
        self._once_per_step(state, "_post_step")
        if self.projector.where == "update":
            self._record(self.projector.post_step())
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self._wrapped_log is None and self.log_metrics and logs is not None:
            # Fallback: no Trainer found at on_train_begin (see the module docstring).
            added = self._add_metrics(logs)
            if (
                added
                and state.log_history
                and state.log_history[-1].get("step") == state.global_step
            ):
                state.log_history[-1].update(added)
            if added and not self._warned_fallback:
                self._warned_fallback = True
                warnings.warn(
                    "VHackCallback found no transformers Trainer on the call stack: its statistics "
                    "were added in on_log, which report_to integrations registered before it do "
                    "not see",
                    RuntimeWarning,
                    stacklevel=2,
                )
        return control

    def on_train_end(self, args, state, control, **kwargs):
        self._uninstall_log()
        return control

    # ---- statistics -----------------------------------------------------------------------------
    def _record(self, stats) -> None:
        """Add one optimizer step's statistics (None: no gradient reached dS) to the window."""
        self._window.add(stats)
        if stats is not None:
            self.steps += 1

    def pop_metrics(self) -> dict[str, float]:
        """The statistics averaged over the steps since the last call that had a gradient, plus
        `vhack/skipped_steps` ({} if no step ran); resets them."""
        return self._window.pop()

    def _add_metrics(self, logs: dict[str, Any]) -> dict[str, float]:
        # Only the periodic training log carries "loss"; evaluation and the end-of-training
        # summary do not, and pending statistics wait for the next training log.
        if "loss" not in logs or any(str(k).startswith("eval_") for k in logs):
            return {}
        added = self.pop_metrics()
        logs.update(added)
        return added

    def _install_log(self, trainer) -> None:
        self._uninstall_log()
        original = trainer.log  # bound method, or another instance-level wrapper

        def log(logs, *args, **kwargs):
            self._add_metrics(logs)
            return original(logs, *args, **kwargs)

        trainer.log = log
        self._trainer, self._wrapped_log = trainer, log

    def _uninstall_log(self) -> None:
        trainer, wrapped = self._trainer, self._wrapped_log
        if trainer is not None and trainer.__dict__.get("log") is wrapped:
            del trainer.log
        self._trainer = self._wrapped_log = None
