"""A real TRL GRPOTrainer on the tiny model (CPU) with VHackCallback: projects every optimizer step,
logs cin; beta > 0 through the dS = 0 reference (no second model)."""

from __future__ import annotations

import pytest
import torch

import vhack
from vhack.errors import UsageError
from vhack.integrations import VHackCallback, ZeroDeltaReference, use_zero_delta_reference

trl = pytest.importorskip("trl", reason="TRL is not installed (pip install 'vhack-kernels[trl]')")
datasets = pytest.importorskip("datasets", reason="datasets comes with TRL")

from _integrations import wrapped as _wrapped  # noqa: E402
from test_integrations_callback import _Probe  # noqa: E402

STEPS = 3


def _reward(completions, **kwargs):
    """Longer completions with more 'a's pay more: enough signal for nonzero advantages."""
    return [len(c) / 8 + c.count("a") for c in completions]


def _grpo(tmp_path, model, callbacks, **overrides):
    fields = dict(
        output_dir=str(tmp_path),
        use_cpu=True,
        bf16=False,
        use_vllm=False,
        per_device_train_batch_size=4,
        num_generations=4,  # the generation batch (4) must be divisible by it
        max_completion_length=8,
        max_steps=STEPS,
        logging_steps=1,
        learning_rate=1e-2,
        beta=0.0,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    fields.update(overrides)
    dataset = datasets.Dataset.from_dict({"prompt": ["count: 1 2 3", "abc", "hello", "xyz"] * 2})
    return trl.GRPOTrainer(
        model=model,
        reward_funcs=_reward,
        args=trl.GRPOConfig(**fields),
        train_dataset=dataset,
        processing_class=vhack.models.byte_tokenizer(),
        callbacks=callbacks,
    )


def test_grpo_trainer_projects_every_step_and_logs_cin(tmp_path):
    model, adapter, basis = _wrapped()
    callback = VHackCallback(vhack.Projector(adapter, basis, mode="both"))
    probe = _Probe(adapter, basis)
    trainer = _grpo(tmp_path, model, [callback, probe])
    trainer.train()
    assert callback.steps == STEPS and len(probe.grad_cin) == STEPS
    assert max(probe.grad_cin) < 1e-5, probe.grad_cin
    train_logs = [r for r in trainer.state.log_history if "loss" in r]
    assert [r["step"] for r in train_logs] == list(range(1, STEPS + 1))
    for record in train_logs:
        assert record["vhack/cin_mean"] > 0.01 and "reward" in record, record
    assert adapter.delta.abs().max() > 1e-3


def test_grpo_trainer_with_kl_against_the_zero_delta_reference(tmp_path):
    model, adapter, basis = _wrapped()
    trainer = _grpo(tmp_path, model, [VHackCallback(vhack.Projector(adapter, basis))])
    reference = use_zero_delta_reference(trainer, adapter, beta=0.1)
    assert isinstance(trainer.ref_model, ZeroDeltaReference) and trainer.beta == 0.1
    trainer.train()
    kl = [r["kl"] for r in trainer.state.log_history if "kl" in r]
    assert len(kl) == STEPS
    assert kl[0] == 0.0  # step 1: dS = 0, the policy IS the reference
    assert min(kl[1:]) > 0  # afterwards the policy moved away from it
    x = torch.randint(0, 256, (1, 8))
    torch.testing.assert_close(
        reference(input_ids=x).logits, vhack.models.tiny_model()(input_ids=x).logits
    )


def test_zero_delta_reference_needs_a_trainer_built_with_beta_zero(tmp_path):
    model, adapter, _ = _wrapped()
    trainer = _grpo(tmp_path, model, [])
    use_zero_delta_reference(trainer, adapter, beta=0.1)
    with pytest.raises(ValueError, match=r"GRPOConfig\(beta=0.0\)"):
        use_zero_delta_reference(trainer, adapter, beta=0.1)
    with pytest.raises(ValueError, match="positive"):
        use_zero_delta_reference(trainer, adapter, beta=0)


def test_beta_above_zero_on_an_in_memory_model_points_to_the_zero_delta_reference(tmp_path):
    """TRL would fail inside with "Repo id must use alphanumeric chars" (from_pretrained(''));
    the callback refuses at on_init_end, before TRL builds its reference."""
    model, adapter, basis = _wrapped()
    with pytest.raises(UsageError, match=r"beta=0.1.*use_zero_delta_reference") as err:
        _grpo(tmp_path, model, [VHackCallback(vhack.Projector(adapter, basis))], beta=0.1)
    assert "\n" not in str(err.value)


def test_beta_above_zero_with_a_loadable_name_builds_trls_reference(tmp_path):
    """A model loaded from a directory: TRL's own reference (a second copy of the base) works."""
    base = vhack.models.tiny_model(seed=0)
    base.save_pretrained(tmp_path / "base")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    adapter = vhack.wrap(model, progress=False, use_cache=False)
    basis = _wrapped()[2]
    trainer = _grpo(
        tmp_path / "run", model, [VHackCallback(vhack.Projector(adapter, basis))], beta=0.1
    )
    assert trainer.ref_model is not None and trainer.beta == 0.1
