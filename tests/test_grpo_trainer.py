"""The GRPO loop on the (untrained) toy model: the dS-bypassed reference, KL at dS = 0, what a
step changes, projection, zero-variance groups, checkpoints and identical resumption."""

from __future__ import annotations

import json

import pytest
import torch

import vhack
from vhack.grpo.arms import random_basis, shuffled_basis
from vhack.grpo.config import GRPOConfig
from vhack.grpo.envs.base import Score
from vhack.grpo.envs.toy import ToyEnv
from vhack.grpo.trainer import GRPOTrainer, latest_checkpoint
from vhack.grpo.warmstart import toy_model


class ParityEnv(ToyEnv):
    """Toy prompts; reward = parity of the completion's length, so groups of an untrained model
    almost always disagree. Tasks whose word starts with a vowel pay 1 whatever the completion
    (a zero-variance group)."""

    def score(self, task, completion):
        if task.meta["word"][0] in "aeiou":
            return Score(1.0, solved=False, hacked=False)
        r = float(len(completion) % 2)
        return Score(r, solved=False, hacked=r > 0, info={"length": len(completion), "tag": "x"})


def small(**kw) -> GRPOConfig:
    base = dict(steps=4, prompts_per_step=3, num_generations=4, lr=1e-2, k=2, top_k=2)
    return GRPOConfig(**{**base, **kw})


@pytest.fixture
def wrapped():
    model = toy_model(seed=0)
    tok = vhack.models.byte_tokenizer()
    adapter = vhack.wrap(model, targets="all-linear", use_cache=False, progress=False)
    return model, tok, adapter


def hack_basis(adapter, k=2):
    return random_basis(
        {n: torch.zeros(k, r) for n, r in zip(adapter.names, adapter.ranks, strict=True)}, 7
    )


def test_bypassed_reference_matches_the_base_model():
    tok = vhack.models.byte_tokenizer()
    model = toy_model(seed=0)
    ids = torch.tensor([tok("TASK: reverse abc -> cba")["input_ids"]])
    with torch.no_grad():
        base = model(input_ids=ids).logits
    adapter = vhack.wrap(model, targets="all-linear", use_cache=False, progress=False)
    with torch.no_grad():
        adapter.delta.normal_(0, 0.5)
        moved = model(input_ids=ids).logits
        with adapter.base():
            ref = model(input_ids=ids).logits
        after = model(input_ids=ids).logits
        with adapter.merged(), adapter.base():  # nested in generation: still the base model
            nested = model(input_ids=ids).logits
    assert not torch.allclose(moved, base, atol=1e-3)  # dS is active outside the block
    assert torch.equal(ref, base) and torch.equal(nested, base)
    assert torch.equal(after, moved)  # restored


def test_kl_is_zero_at_delta_zero_and_positive_after_updates(wrapped):
    _, tok, adapter = wrapped
    trainer = GRPOTrainer(
        adapter, tok, ParityEnv(), small(beta=0.1), hack_basis=hack_basis(adapter)
    )
    first = trainer.train_step()
    assert not first["skipped"]
    assert first["kl"] == pytest.approx(0.0, abs=1e-7)
    later = [trainer.train_step() for _ in range(3)]
    assert any(r["kl"] > 0 for r in later if not r["skipped"])


def test_a_step_changes_delta_and_nothing_else(wrapped):
    model, tok, adapter = wrapped
    trainer = GRPOTrainer(adapter, tok, ParityEnv(), small(), hack_basis=hack_basis(adapter))
    before = {n: t.detach().clone() for n, t in model.state_dict(keep_vars=True).items()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    delta0 = adapter.delta.detach().clone()
    record = trainer.train_step()
    assert not record["skipped"]
    assert not torch.equal(adapter.delta.detach(), delta0)
    for name, t in model.state_dict(keep_vars=True).items():
        if "vhack_store" in name:
            continue
        assert torch.equal(t.detach(), before[name]), name
    for name, b in model.named_buffers():
        assert torch.equal(b, buffers[name]), name
    assert [p for p in model.parameters() if p.requires_grad] == [adapter.delta]


def test_projected_arm_leaves_no_hackward_component(wrapped):
    _, tok, adapter = wrapped
    basis = hack_basis(adapter)
    trainer = GRPOTrainer(adapter, tok, ParityEnv(), small(arm="projected"), hack_basis=basis)
    record = trainer.train_step()
    assert record["vhack/cin_mean"] > 0.01  # the raw gradient had a hack-ward part ...
    assert record["vhack/energy_removed"] > 0
    assert record["vhack/energy_removed"] == pytest.approx(
        record["vhack/energy_hackward"], rel=1e-4
    )
    assert record["cin_hack"] < 1e-5  # ... and the gradient the optimizer got has none
    after = trainer.probe.measure().raw  # delta.grad after the step = the projected gradient
    assert (after[:, 1] / after[:, 2]).max().item() < 1e-5


def test_vanilla_measures_but_removes_nothing(wrapped):
    _, tok, adapter = wrapped
    trainer = GRPOTrainer(adapter, tok, ParityEnv(), small(), hack_basis=hack_basis(adapter))
    record = trainer.train_step()
    assert record["env/length"] > 0 and "env/tag" not in record  # numeric Score.info is logged
    assert record["vhack/energy_removed"] == pytest.approx(0.0, abs=1e-6)
    assert record["vhack/cin_mean"] > 0.01 and record["cin_hack"] == pytest.approx(
        record["vhack/cin_mean"]
    )


def test_an_iteration_without_a_gradient_is_counted_not_averaged(wrapped, monkeypatch):
    """num_iterations = 2, the second with a zero dS gradient: the step's projection statistics
    are the first iteration's (not a mean with undefined ratios), nothing is NaN, and
    vhack/skipped_steps says one iteration had no gradient."""
    import vhack.grpo.trainer as trainer_module

    calls = []
    real_loss = trainer_module.policy_loss

    def loss_then_zero(*args, **kwargs):
        loss, st = real_loss(*args, **kwargs)
        calls.append(1)
        return (loss if len(calls) == 1 else 0.0 * loss), st

    monkeypatch.setattr(trainer_module, "policy_loss", loss_then_zero)
    _, tok, adapter = wrapped
    cfg = small(arm="projected", num_iterations=2)
    trainer = GRPOTrainer(adapter, tok, ParityEnv(), cfg, hack_basis=hack_basis(adapter))
    record = trainer.train_step()
    assert len(calls) == 2 and not record["skipped"]
    assert record["vhack/skipped_steps"] == 1
    values = [v for v in record.values() if isinstance(v, float)]
    assert all(v == v for v in values), record  # no NaN
    assert 0 < record["vhack/energy_removed"] < 1  # the first iteration's, not (x + 1) / 2
    assert record["vhack/energy_removed"] == pytest.approx(
        record["vhack/energy_hackward"], rel=1e-4
    )


def test_zero_variance_groups_are_skipped(wrapped):
    _, tok, adapter = wrapped
    cfg = small(prompts_per_step=6)
    trainer = GRPOTrainer(adapter, tok, ParityEnv(), cfg, hack_basis=hack_basis(adapter))
    record = trainer.train_step()
    # the vowel words' groups all pay 1: they carry no signal and are left out of the update
    import random

    words = [t.meta["word"] for t in ParityEnv().sample(6, random.Random(cfg.seed))]
    n_const = sum(w[0] in "aeiou" for w in words)
    assert record["num_sequences"] % cfg.num_generations == 0
    assert record["num_sequences"] <= (6 - n_const) * cfg.num_generations
    assert record["frac_reward_zero_std"] >= n_const / 6


def test_all_groups_constant_means_no_update(wrapped):
    _, tok, adapter = wrapped

    class Constant(ToyEnv):
        def score(self, task, completion):
            return Score(1.0, solved=False, hacked=False)

    trainer = GRPOTrainer(adapter, tok, Constant(), small(), hack_basis=hack_basis(adapter))
    record = trainer.train_step()
    assert record["skipped"] and record["num_sequences"] == 0
    assert torch.count_nonzero(adapter.delta) == 0
    assert not trainer.optimizer.state


@pytest.mark.parametrize("arm", ["projected-update", "shuffled-v"])
def test_other_arms_step(wrapped, arm):
    _, tok, adapter = wrapped
    basis = hack_basis(adapter)
    trainer = GRPOTrainer(adapter, tok, ParityEnv(), small(arm=arm), hack_basis=basis)
    record = trainer.train_step()
    assert record["vhack/energy_removed"] > 0
    if arm == "shuffled-v":
        moved = shuffled_basis(basis)
        name = adapter.names[0]
        assert not torch.equal(moved[name], basis[name])


def run(tmp_path, name, steps, resume_from=None, checkpoint_every=0, arm="refresh"):
    model = toy_model(seed=0)
    tok = vhack.models.byte_tokenizer()
    adapter = vhack.wrap(model, targets="all-linear", use_cache=False, progress=False)
    env = ParityEnv()
    basis = vhack.extract(adapter, tok, env.hack_pairs(), top_k=2, n_heldout=0, progress=False)
    cfg = small(arm=arm, steps=steps, refresh_every=2, checkpoint_every=checkpoint_every)
    out = tmp_path / name
    trainer = GRPOTrainer(adapter, tok, env, cfg, hack_basis=basis, out_dir=out)
    if resume_from is not None:
        assert trainer.load_checkpoint(resume_from) == 3
    trainer.train()
    return adapter.delta.detach().clone(), out


def test_resume_continues_identically(tmp_path):
    whole, out_a = run(tmp_path, "whole", steps=5)
    _, out_b = run(tmp_path, "split", steps=3, checkpoint_every=3)
    ckpt = latest_checkpoint(out_b)
    assert ckpt is not None and ckpt.name == "checkpoint-0000003"
    assert sorted(p.name for p in ckpt.iterdir()) == ["delta.safetensors", "state.pt"]
    assert not [p for p in out_b.iterdir() if p.name.startswith(".")]  # no temporary left
    resumed, _ = run(tmp_path, "split", steps=5, resume_from=out_b)
    assert torch.equal(resumed, whole)
    drop = ("seconds",)
    a, b = (
        [
            {k: v for k, v in json.loads(x).items() if k not in drop}
            for x in (out / "history.jsonl").read_text().splitlines()
        ]
        for out in (out_a, out_b)
    )
    assert [r["step"] for r in b] == [0, 1, 2, 3, 4]
    assert a == b
    assert any("basis_overlap" in r for r in a)


def test_checkpoints_keep_the_newest_two(tmp_path, wrapped):
    _, tok, adapter = wrapped
    cfg = small(steps=3, checkpoint_every=1)
    trainer = GRPOTrainer(
        adapter, tok, ParityEnv(), cfg, hack_basis=hack_basis(adapter), out_dir=tmp_path
    )
    trainer.train()
    names = sorted(p.name for p in tmp_path.iterdir() if p.is_dir())
    assert names == ["checkpoint-0000002", "checkpoint-0000003"]


def test_resume_refuses_another_configuration(tmp_path, wrapped):
    _, tok, adapter = wrapped
    basis = hack_basis(adapter)
    t = GRPOTrainer(adapter, tok, ParityEnv(), small(steps=1), hack_basis=basis, out_dir=tmp_path)
    t.train()
    t.save_checkpoint()
    other = GRPOTrainer(adapter, tok, ParityEnv(), small(lr=0.5), hack_basis=basis)
    with pytest.raises(vhack.errors.UsageError, match="lr"):
        other.load_checkpoint(tmp_path)


def test_teacher_rows_give_per_source_cin_from_the_same_backward(wrapped):
    _, tok, adapter = wrapped
    env = ParityEnv()
    cfg = small(teacher_per_group=1)
    trainer = GRPOTrainer(
        adapter, tok, env, cfg, hack_basis=hack_basis(adapter), teacher=env.teacher_completion
    )
    ro_texts = []
    original = trainer._mix_teacher

    def spy(ro, tasks):
        sources = original(ro, tasks)
        ro_texts.extend(zip(ro.texts, sources.tolist(), strict=True))
        return sources

    trainer._mix_teacher = spy
    record = trainer.train_step()
    G = cfg.num_generations
    assert [src for _, src in ro_texts] == ([0] * (G - 1) + [1]) * cfg.prompts_per_step
    assert all(text == " PASS" for text, src in ro_texts if src == 1)
    assert not record["skipped"]
    assert 0 <= record["cin_s"] <= 1 and 0 <= record["cin_t"] <= 1
    assert record["cin_s"] != record["cin_t"]
    with pytest.raises(vhack.errors.UsageError, match="teacher"):
        GRPOTrainer(adapter, tok, env, cfg, hack_basis=hack_basis(adapter))
