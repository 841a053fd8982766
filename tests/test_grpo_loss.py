"""Advantages, K3 KL and the Dr.GRPO clipped loss against hand-computed cases."""

import math

import pytest
import torch

from vhack.grpo.loss import group_advantages, k3_kl, policy_loss


def test_dr_grpo_advantages_are_reward_minus_group_mean():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    adv, informative = group_advantages(r, 4)
    # group 1: mean 0.5 -> [0.5, -0.5, -0.5, 0.5]; group 2: all equal -> 0, not informative
    assert adv.tolist() == [0.5, -0.5, -0.5, 0.5, 0.0, 0.0, 0.0, 0.0]
    assert informative.tolist() == [True, False]


def test_grpo_scaled_advantages_divide_by_unbiased_std():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0])
    adv, _ = group_advantages(r, 4, scale="group")
    std = math.sqrt((4 * 0.25) / 3)  # unbiased std of [1, 0, 0, 1]
    expected = [0.5 / (std + 1e-4), -0.5 / (std + 1e-4)] * 2
    assert adv[[0, 1, 3, 2]].tolist() == pytest.approx(
        [expected[0], expected[1], expected[0], expected[1]]
    )


def test_advantages_reject_ragged_groups_and_unknown_scale():
    with pytest.raises(ValueError, match="multiple"):
        group_advantages(torch.zeros(5), 2)
    with pytest.raises(ValueError, match="scale"):
        group_advantages(torch.zeros(4), 2, scale="batch")


def test_k3_is_zero_at_equal_logprobs_and_matches_formula():
    lp = torch.tensor([-1.0, -2.0])
    assert k3_kl(lp, lp).tolist() == [0.0, 0.0]
    ref = torch.tensor([-1.5, -1.0])
    d = ref - lp  # [-0.5, 1.0]
    assert k3_kl(lp, ref).tolist() == pytest.approx((torch.exp(d) - d - 1).tolist())
    # the log-ratio is clamped: d = 50 counts as d = 10
    big = k3_kl(torch.tensor([0.0]), torch.tensor([50.0]), clamp=10.0)
    assert big.item() == pytest.approx(math.exp(10) - 11)


def test_policy_loss_hand_computed():
    # two sequences, L_max = 3; the second has one masked token
    logp = torch.tensor([[-1.0, -1.0, -1.0], [-2.0, -2.0, -2.0]])
    old = torch.tensor([[-1.0, -1.5, -0.5], [-2.0, -2.0, -2.0]])
    adv = torch.tensor([1.0, -2.0])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    loss, st = policy_loss(logp, old, adv, mask, 3, epsilon=0.2, epsilon_high=0.3)
    r = torch.exp(logp - old)  # row 0: [1, e^0.5 = 1.6487, e^-0.5 = 0.6065]
    # row 0 (A = 1): min(r, clip(r, 0.8, 1.3)) = [1, 1.3, 0.6065]; token loss = -that
    row0 = -(1.0 + 1.3 + math.exp(-0.5))
    # row 1 (A = -2): ratio 1 -> token loss 2 on the two real tokens
    row1 = 2.0 + 2.0
    assert loss.item() == pytest.approx((row0 + row1) / (2 * 3))
    # clipping: token (0, 1) has r > 1.3 with A > 0 -> high-clipped; 1 of 5 real tokens
    assert st["clip_ratio/high_mean"].item() == pytest.approx(1 / 5)
    assert st["clip_ratio/low_mean"].item() == 0.0
    assert torch.isclose(r[0, 1], torch.tensor(math.exp(0.5)))


def test_policy_loss_gradient_is_advantage_weighted_at_ratio_one():
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    adv = torch.tensor([0.5])
    loss, _ = policy_loss(logp, logp.detach(), adv, torch.ones(1, 2), 4)
    loss.backward()
    # d/dlogp of -A * ratio / (B * L_max) at ratio 1 = -A / 4
    assert logp.grad[0].tolist() == pytest.approx([-0.125, -0.125])


def test_policy_loss_kl_term():
    logp = torch.tensor([[-1.0, -1.0]])
    ref = torch.tensor([[-1.0, -2.0]])
    loss, st = policy_loss(logp, logp, torch.zeros(1), torch.ones(1, 2), 2, beta=0.5, ref_logp=ref)
    k3 = math.exp(-1) + 1 - 1  # d = -1: e^-1 - (-1) - 1
    assert st["kl"].item() == pytest.approx(k3 / 2)
    assert loss.item() == pytest.approx(0.5 * k3 / 2)
    with pytest.raises(ValueError, match="ref_logp"):
        policy_loss(logp, logp, torch.zeros(1), torch.ones(1, 2), 2, beta=0.1)
