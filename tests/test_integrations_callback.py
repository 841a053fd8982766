"""VHackCallback in a real transformers Trainer: projects once per optimizer step (grad and update
mode), its statistics reach log_history, the reporting callbacks and the console, bad setups are
refused before training."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip(
    "accelerate", reason="the Trainer needs accelerate (pip install 'vhack-kernels[trl]')"
)

from _integrations import wrapped as _wrapped
from transformers import Trainer, TrainerCallback, TrainingArguments

import vhack
from vhack.errors import UsageError
from vhack.integrations import VHackCallback

KEYS = ("vhack/cin_mean", "vhack/fired", "vhack/energy_removed", "vhack/norm_before")


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int = 16, length: int = 12) -> None:
        self.ids = torch.randint(0, 256, (n, length), generator=torch.Generator().manual_seed(5))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _args(tmp_path, **overrides) -> TrainingArguments:
    fields = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=4,
        logging_steps=2,
        learning_rate=1e-2,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,  # PrinterCallback: logs go to stdout
        dataloader_num_workers=0,
    )
    fields.update(overrides)
    return TrainingArguments(**fields)


class _Probe(TrainerCallback):
    """Registered AFTER VHackCallback: sees the gradient / update the optimizer gets."""

    def __init__(self, adapter, basis) -> None:
        self.adapter = adapter
        self.measure = vhack.Projector(adapter, basis, mode="measure")
        self.grad_cin, self.grad_norm, self.update_cin = [], [], []
        self.before = None

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        grad = self.adapter.delta.grad
        self.grad_cin.append(self.measure.measure(grad.clone()).cin_mean)
        self.grad_norm.append(grad.norm().item())
        self.before = self.adapter.delta.detach().clone()

    def on_optimizer_step(self, args, state, control, **kwargs):
        change = self.adapter.delta.detach() - self.before
        self.update_cin.append(self.measure.measure(change).cin_mean)


class _Reporter(TrainerCallback):
    """Registered BEFORE VHackCallback, like transformers' report_to integrations."""

    def __init__(self) -> None:
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


def test_grad_mode_projects_every_optimizer_step_and_logs_everywhere(tmp_path, capsys):
    model, adapter, basis = _wrapped()
    base = vhack.models.tiny_model(seed=0)
    proj = vhack.Projector(adapter, basis, mode="both")
    callback, probe, reporter = VHackCallback(proj), _Probe(adapter, basis), _Reporter()
    trainer = Trainer(
        model=model,
        args=_args(tmp_path),
        train_dataset=_Tokens(),
        callbacks=[reporter, callback, probe],
    )
    trainer.train()

    # once per optimizer step (4 steps of 2 accumulated micro-batches), on the projected gradient
    assert callback.steps == 4 and len(probe.grad_cin) == 4
    assert max(probe.grad_cin) < 1e-5, probe.grad_cin  # "both": nothing left in span(V)
    train_logs = [r for r in trainer.state.log_history if "loss" in r]
    assert [r["step"] for r in train_logs] == [2, 4]
    for record in train_logs:
        assert all(k in record for k in KEYS), record
        assert record["vhack/cin_mean"] > 0.01  # there was something to remove
        assert 0 < record["vhack/energy_removed"] < 1
    # the reporting callbacks (registered before it) and the console got them too
    assert [r["vhack/cin_mean"] for r in reporter.logs if "loss" in r] == [
        r["vhack/cin_mean"] for r in train_logs
    ]
    assert "vhack/cin_mean" in capsys.readouterr().out
    assert "log" not in trainer.__dict__  # the log wrapper is removed at the end of training
    # the model the Trainer trained really moved (its default optimizer is fused AdamW, which
    # writes dS without a version bump: the merge cache must still see the step)
    x = torch.randint(0, 256, (1, 8))
    assert (model(input_ids=x).logits - base(input_ids=x).logits).abs().max() > 1e-3


def test_update_mode_projects_the_step(tmp_path):
    model, adapter, basis = _wrapped()
    proj = vhack.Projector(adapter, basis, mode="both", where="update")
    callback, probe = VHackCallback(proj), _Probe(adapter, basis)
    trainer = Trainer(
        model=model,
        args=_args(tmp_path, max_steps=3, logging_steps=1),
        train_dataset=_Tokens(),
        callbacks=[callback, probe],
    )
    trainer.train()
    assert callback.steps == 3
    assert min(probe.grad_cin) > 0.01  # the gradient itself is not projected in update mode
    assert max(probe.update_cin) < 1e-5, probe.update_cin  # the change of dS is
    assert all("vhack/cin_mean" in r for r in trainer.state.log_history if "loss" in r)


def test_project_then_clip(tmp_path):
    model, adapter, basis = _wrapped()
    proj = vhack.Projector(adapter, basis, mode="both")
    probe = _Probe(adapter, basis)
    trainer = Trainer(
        model=model,
        args=_args(tmp_path, max_steps=2, max_grad_norm=0),
        train_dataset=_Tokens(),
        callbacks=[VHackCallback(proj, max_grad_norm=0.01), probe],
    )
    trainer.train()
    assert max(probe.grad_norm) <= 0.01 * (1 + 1e-5)
    assert max(probe.grad_cin) < 1e-5


# ---- bad input -----------------------------------------------------------------------------------


def _train_with(tmp_path, model, callbacks, **args):
    trainer = Trainer(
        model=model, args=_args(tmp_path, **args), train_dataset=_Tokens(), callbacks=callbacks
    )
    trainer.train()


def test_a_model_that_was_not_wrapped_is_refused(tmp_path):
    _, adapter, basis = _wrapped()
    other = vhack.models.tiny_model(seed=1)  # not wrapped: the Trainer trains all its weights
    with pytest.raises(UsageError, match="does not hold this projector's adapter.delta"):
        _train_with(tmp_path, other, [VHackCallback(vhack.Projector(adapter, basis))])


def test_a_basis_for_another_model_is_refused():
    _, adapter, _ = _wrapped()
    _, _, other_basis = _wrapped(num_hidden_layers=3)  # a module the adapter does not wrap
    with pytest.raises(ValueError, match="another model"):
        vhack.Projector(adapter, other_basis)


def test_a_callback_attached_twice_is_refused(tmp_path):
    model, adapter, basis = _wrapped()
    callback = VHackCallback(vhack.Projector(adapter, basis))
    with pytest.raises(UsageError, match="VHackCallbacks project the same adapter"):
        _train_with(tmp_path, model, [callback, callback])
    other = VHackCallback(vhack.Projector(adapter, basis))
    with pytest.raises(UsageError, match="VHackCallbacks project the same adapter"):
        _train_with(tmp_path, model, [callback, other])
    assert adapter.delta.abs().max() == 0  # refused before any step


def test_a_projector_also_attached_to_an_optimizer_is_refused(tmp_path):
    model, adapter, basis = _wrapped()
    proj = vhack.Projector(adapter, basis).attach(torch.optim.SGD([adapter.delta], lr=0.1))
    with pytest.raises(UsageError, match="also attached to an optimizer"):
        _train_with(tmp_path, model, [VHackCallback(proj)])


def test_clip_after_projection_needs_the_trainer_not_to_clip(tmp_path):
    model, adapter, basis = _wrapped()
    callback = VHackCallback(vhack.Projector(adapter, basis), max_grad_norm=1.0)
    with pytest.raises(UsageError, match="max_grad_norm=0"):
        _train_with(tmp_path, model, [callback], max_grad_norm=1.0)


@pytest.mark.parametrize("how", ["args", "env"])
def test_deepspeed_is_refused_with_the_reason(tmp_path, monkeypatch, how):
    model, adapter, basis = _wrapped()
    callback = VHackCallback(vhack.Projector(adapter, basis))
    args = _args(tmp_path)
    if how == "args":
        args.deepspeed = {"zero_optimization": {"stage": 2}}  # what a DeepSpeed run carries
    else:
        monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # set by accelerate launch
    opt = torch.optim.AdamW([adapter.delta])
    with pytest.raises(UsageError, match="DeepSpeed performs the optimizer step inside backward"):
        callback.on_train_begin(args, None, None, model=model, optimizer=opt)


def test_bad_arguments():
    _, adapter, basis = _wrapped()
    with pytest.raises(TypeError, match="vhack.Projector"):
        VHackCallback(basis)
    with pytest.raises(ValueError, match="positive"):
        VHackCallback(vhack.Projector(adapter, basis), max_grad_norm=-1)
    with pytest.raises(ValueError, match='where="grad" only'):
        VHackCallback(vhack.Projector(adapter, basis, where="update"), max_grad_norm=1.0)


def test_the_callback_wires_the_vllm_sync_of_its_trainer(tmp_path):
    model, adapter, basis = _wrapped()

    class Generation:  # trainer.vllm_generation of TRL with use_vllm=True
        def __init__(self, model) -> None:
            self.model = model

        def _iter_named_params(self):
            yield from self.model.named_parameters()

    trainer = Trainer(
        model=model,
        args=_args(tmp_path, max_steps=1),
        train_dataset=_Tokens(),
        callbacks=[VHackCallback(vhack.Projector(adapter, basis))],
    )
    trainer.vllm_generation = Generation(model)
    trainer.train()
    names = [n for n, _ in trainer.vllm_generation._iter_named_params()]
    assert names == [n for n, _ in vhack.models.tiny_model().named_parameters()]


def test_without_a_trainer_the_statistics_go_in_through_on_log():
    """A custom loop driving the callback events: no Trainer on the stack, so on_log adds the
    statistics to the logs and to the last log_history record, and warns once."""
    _, adapter, basis = _wrapped()
    callback, one_step, (args, state, control) = _custom_loop(vhack.Projector(adapter, basis))
    model = adapter.model
    for _ in range(2):
        one_step(1.0)
    logs = {"loss": 1.0}
    state.log_history.append({**logs, "step": state.global_step})
    with pytest.warns(RuntimeWarning, match="no transformers Trainer"):
        callback.on_log(args, state, control, logs=logs)
    assert (
        logs["vhack/cin_mean"] > 0.01
        and state.log_history[-1]["vhack/cin_mean"] == logs["vhack/cin_mean"]
    )
    with pytest.raises(UsageError, match="ran twice in one optimizer step"):
        callback.on_pre_optimizer_step(args, state, control, model=model)
        callback.on_pre_optimizer_step(args, state, control, model=model)


def _custom_loop(projector):
    """(callback, one_step, (args, state, control)): a callback driven by hand, no Trainer.
    one_step(scale) runs backward on scale * loss (scale None: no backward, dS.grad is None)
    and the optimizer-step events around opt.step(); returns dS.grad as the callback got it."""
    from transformers import TrainerControl, TrainerState

    adapter = projector.adapter
    model = adapter.model
    callback = VHackCallback(projector)
    args, state, control = (
        TrainingArguments(output_dir="unused", report_to=[]),
        TrainerState(),
        TrainerControl(),
    )
    opt = torch.optim.AdamW([adapter.delta], lr=1e-2)
    callback.on_train_begin(args, state, control, model=model, optimizer=opt)
    x = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(3))

    def one_step(scale):
        opt.zero_grad(set_to_none=True)
        if scale is not None:
            (scale * model(input_ids=x, labels=x).loss).backward()
        grad = None if adapter.delta.grad is None else adapter.delta.grad.clone()
        callback.on_pre_optimizer_step(args, state, control, model=model)
        opt.step()
        callback.on_optimizer_step(args, state, control)
        state.global_step += 1
        return grad  # as the callback got it

    return callback, one_step, (args, state, control)


def test_steps_without_a_gradient_are_counted_not_averaged():
    """A step whose dS gradient is zero (every GRPO group without reward variance) or absent
    neither turns the window's averages into NaN nor halves energy_removed: the window averages
    over the steps that had a gradient and logs how many it skipped."""
    _, adapter, basis = _wrapped()
    callback, one_step, _ = _custom_loop(vhack.Projector(adapter, basis))
    one_step(1.0)
    first = callback.projector.last_stats.as_dict()
    one_step(0.0)  # a zero gradient
    one_step(None)  # no gradient reached dS at all
    metrics = callback.pop_metrics()
    assert all(v == v for v in metrics.values()), metrics  # no NaN
    assert metrics["vhack/skipped_steps"] == 2
    assert first["energy_removed"] > 0
    for field in ("cin_mean", "fired", "energy_removed", "norm_before"):
        assert metrics["vhack/" + field] == pytest.approx(first[field], rel=1e-6), field
    assert callback.pop_metrics() == {}  # reset


def test_a_measure_only_run_logs_the_one_sided_cin_of_a_projected_run():
    """Baseline (mode="measure") and projected runs log the same statistic as vhack/cin_mean
    (the hack-ward, one-sided cin), so their curves compare directly; the two-sided one has its
    own name."""
    _, adapter, basis = _wrapped()
    callback, one_step, _ = _custom_loop(vhack.Projector(adapter, basis, mode="measure"))
    grad = one_step(1.0)
    metrics = callback.pop_metrics()
    projected = vhack.Projector(adapter, basis).project_(grad)
    assert metrics["vhack/cin_mean"] == pytest.approx(projected.cin_mean, rel=1e-6)
    assert metrics["vhack/cin_mean_two_sided"] == pytest.approx(
        projected.cin_mean_two_sided, rel=1e-6
    )
    assert metrics["vhack/cin_mean_two_sided"] > metrics["vhack/cin_mean"] > 0.01
    assert metrics["vhack/energy_removed"] == 0.0
