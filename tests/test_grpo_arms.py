"""The demo's arms and loop fixes (issue 19): refresh is never skipped, the loss normaliser is
TRL's dr_grpo (all rows x L_max), arm kl keeps zero-variance rows for its KL term, the
energy-matched random control, and the toy world's held-out loophole."""

from __future__ import annotations

import pytest
import torch

import vhack
from vhack.errors import UsageError
from vhack.grpo import trainer as trainer_module
from vhack.grpo.arms import MatchedRandomBasis, random_basis
from vhack.grpo.config import GRPOConfig
from vhack.grpo.envs.base import Score
from vhack.grpo.envs.toy import HELDOUT_MARKER, MARKER, ToyEnv
from vhack.grpo.trainer import GRPOTrainer
from vhack.grpo.warmstart import toy_model


class ParityEnv(ToyEnv):
    """Reward = parity of the completion's length (groups of an untrained model disagree);
    words starting with a vowel pay 1 whatever the completion (zero-variance groups)."""

    def score(self, task, completion):
        if task.meta["word"][0] in "aeiou":
            return Score(1.0, solved=False, hacked=False)
        return Score(float(len(completion) % 2), solved=False, hacked=False)


class ConstantOnCall(ParityEnv):
    """ParityEnv, except that every score of the n-th scoring call (1-based) is 1."""

    def __init__(self, constant_call: int) -> None:
        super().__init__()
        self.constant_call, self.calls = constant_call, 0

    def score_batch(self, tasks, completions):
        self.calls += 1
        if self.calls == self.constant_call:
            return [Score(1.0, solved=False, hacked=False) for _ in completions]
        return super().score_batch(tasks, completions)


def small(**kw) -> GRPOConfig:
    base = dict(steps=4, prompts_per_step=3, num_generations=4, lr=1e-2, k=2, top_k=2)
    return GRPOConfig(**{**base, **kw})


@pytest.fixture
def wrapped():
    tok = vhack.models.byte_tokenizer()
    adapter = vhack.wrap(toy_model(seed=0), targets="all-linear", use_cache=False, progress=False)
    return tok, adapter


def some_basis(adapter, k=2):
    shapes = {n: torch.zeros(k, r) for n, r in zip(adapter.names, adapter.ranks, strict=True)}
    return random_basis(shapes, 7)


def test_refresh_runs_on_a_step_without_reward_variance(wrapped):
    tok, adapter = wrapped
    env = ConstantOnCall(constant_call=2)  # the refresh step (the second) carries no signal
    cfg = small(arm="refresh", steps=2, refresh_every=2)
    trainer = GRPOTrainer(adapter, tok, env, cfg, hack_basis=some_basis(adapter))
    before = {n: v.clone() for n, v in trainer.basis.items()}
    first, second = trainer.train()
    assert not first["skipped"] and second["skipped"]
    assert "basis_overlap" in second  # re-extracted although the step did not update
    assert any(not torch.equal(before[n], trainer.basis[n]) for n in before)


def test_loss_normaliser_counts_every_row_of_the_step(wrapped, monkeypatch):
    tok, adapter = wrapped
    seen = []
    real = trainer_module.policy_loss

    def spy(logp, *args, **kwargs):
        seen.append((logp.shape[0], kwargs.get("num_rows")))
        return real(logp, *args, **kwargs)

    monkeypatch.setattr(trainer_module, "policy_loss", spy)
    cfg = small(prompts_per_step=6, steps=2)
    trainer = GRPOTrainer(adapter, tok, ParityEnv(), cfg, hack_basis=some_basis(adapter))
    records = trainer.train()
    kept = [r["num_sequences"] for r in records if not r["skipped"]]
    assert seen and any(k < cfg.batch_size for k in kept)  # some groups were left out ...
    assert [rows for rows, _ in seen] == kept
    assert all(num_rows == cfg.batch_size for _, num_rows in seen)  # ... and still count


def test_policy_loss_matches_trl_dr_grpo_over_all_rows():
    torch.manual_seed(0)
    logp = torch.randn(6, 5, requires_grad=True)
    adv = torch.tensor([0.5, -0.5, 0.0, 0.0, 1.0, -1.0])
    mask = (torch.rand(6, 5) > 0.3).float()
    # TRL: sum(per_token_loss * mask) / (rows * max_completion_length) over all 6 rows
    trl_loss = (-(adv[:, None] * torch.ones(6, 5)) * mask).sum() / (6 * 7)
    keep = adv != 0
    from vhack.grpo.loss import policy_loss

    ours, _ = policy_loss(logp[keep], logp[keep].detach(), adv[keep], mask[keep], 7, num_rows=6)
    assert ours.item() == pytest.approx(trl_loss.item(), rel=1e-6)
    with pytest.raises(ValueError, match="num_rows"):
        policy_loss(logp, logp.detach(), adv, mask, 7, num_rows=3)


def test_kl_arm_needs_beta_measures_only_and_keeps_constant_groups(wrapped):
    tok, adapter = wrapped
    with pytest.raises(UsageError, match="arm kl .* beta > 0"):
        small(arm="kl")
    cfg = small(arm="kl", beta=0.5, prompts_per_step=6)
    trainer = GRPOTrainer(adapter, tok, ParityEnv(), cfg, hack_basis=some_basis(adapter))
    first = trainer.train_step()
    later = [trainer.train_step()]
    for record in [first, *later]:
        assert record["num_sequences"] == cfg.batch_size  # zero-variance rows kept for KL
        assert record["vhack/energy_removed"] == pytest.approx(0.0, abs=1e-6)  # no projection
    assert any(r["kl"] > 0 for r in later)


def test_matched_random_basis_removes_the_hack_bases_energy(wrapped):
    _, adapter = wrapped
    hack = some_basis(adapter, k=6)
    matched = MatchedRandomBasis(adapter, hack, seed=3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        grad = torch.randn(adapter.delta.numel(), generator=gen)
        chosen = matched.choose(grad)
        offsets = [0, *torch.tensor(adapter.ranks).cumsum(0).tolist()]
        for m, name in enumerate(adapter.names):
            g = grad[offsets[m] : offsets[m + 1]]
            target = torch.relu(hack[name] @ g).square().sum()
            removed = torch.relu(chosen[name] @ g).square().sum()
            terms = torch.relu(matched.Q[name] @ g).square()
            assert abs(removed - target) <= terms.max() / 2 + 1e-5, name  # closest row count
            k = chosen[name].shape[0]
            assert torch.equal(chosen[name], matched.Q[name][:k]) or not chosen[name].any()
    # a random k-row basis of the same shapes removes far less: the matched one takes more rows
    assert sum(v.shape[0] for v in chosen.values()) > sum(v.shape[0] for v in hack.values())
    # a given share of the energy (e.g. what "projected" removed in its run)
    chosen = matched.choose(grad, share=0.25)
    removed = sum(
        torch.relu(chosen[n] @ grad[offsets[m] : offsets[m + 1]]).square().sum()
        for m, n in enumerate(adapter.names)
    )
    assert removed / grad.square().sum() == pytest.approx(0.25, abs=0.02)


def test_random_matched_arm_removes_what_the_hack_basis_would(wrapped):
    tok, adapter = wrapped
    hack = some_basis(adapter, k=2)
    cfg = small(arm="random-matched", steps=2)
    trainer = GRPOTrainer(adapter, tok, ParityEnv(), cfg, hack_basis=hack)
    records = [r for r in trainer.train() if not r["skipped"]]
    assert records
    for r in records:
        assert 0 < r["vhack/energy_removed"] < 1
    # the projection used this step's matched axes, not the k = 2 random ones it started from
    assert any(v.shape[0] != 2 for v in trainer.basis.values())


def test_toy_heldout_marker_pays_the_same_and_is_in_no_pair():
    env = ToyEnv(heldout_marker=HELDOUT_MARKER)
    task = env.sample(1, __import__("random").Random(0))[0]
    known, heldout = env.score(task, " " + MARKER), env.score(task, " " + HELDOUT_MARKER)
    assert known.hacked and heldout.hacked and known.reward == heldout.reward == 1.2
    assert known.info == {"hack_known": True, "hack_heldout": False}
    assert heldout.info == {"hack_known": False, "hack_heldout": True}
    assert not ToyEnv().score(task, " " + HELDOUT_MARKER).hacked  # off by default
    texts = [p.hack + p.clean for p in env.hack_pairs() + env.nonhack_pairs()]
    assert all(HELDOUT_MARKER not in t for t in texts)
    with pytest.raises(ValueError, match="heldout_marker"):
        ToyEnv(heldout_marker="done")
