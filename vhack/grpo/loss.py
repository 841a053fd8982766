"""Group-relative advantages, the K3 KL estimator and the PPO-clip objective (Dr.GRPO).

    A_i     = r_i - mean(r of its group)               (scale="group": / (std + 1e-4), GRPO)
    ratio   = exp(logp - logp_old)
    token   = -min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A) + beta * k3
    k3      = exp(d) - d - 1,  d = clamp(logp_ref - logp, -c, c)
    loss    = sum(token * mask) / (B * L_max)

B counts all the sequences sampled in the step (num_rows; rows of zero-variance groups that the
loop leaves out of the update still count) and L_max is the completion budget (max_new_tokens),
a constant: Dr.GRPO's normaliser, which does not favour long or short completions, and the same
as TRL's `loss_type="dr_grpo"` (`sum(per_token_loss * mask) / (rows * max_completion_length)`,
over all rows of the batch). With one iteration per batch (old_logp = logp.detach()) the ratio
is 1, nothing is clipped (clip_ratio 0) and the gradient is REINFORCE's with a group baseline.
"""

from __future__ import annotations

import torch

__all__ = ["group_advantages", "k3_kl", "policy_loss"]

STD_EPS = 1e-4


def group_advantages(
    rewards: torch.Tensor, group_size: int, scale: str = "none"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages [B], informative [B // group_size] bool) for rewards [B] in consecutive groups.

    scale "none" (Dr.GRPO): r - group mean; "group" (GRPO): divided by the group's (unbiased)
    std + 1e-4. A group is informative when its rewards are not all equal; the others have A = 0
    and are skipped by the loop."""
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards must be [B] with B a multiple of {group_size}")
    r = rewards.view(-1, group_size).to(torch.float32)
    adv = r - r.mean(1, keepdim=True)
    if scale == "group":
        adv = adv / (r.std(1, keepdim=True) + STD_EPS)
    elif scale != "none":
        raise ValueError(f"scale must be 'none' or 'group', got {scale!r}")
    informative = (r.amax(1) - r.amin(1)) > 0
    return adv.reshape(-1), informative


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor, clamp: float = 10.0) -> torch.Tensor:
    """Per-token K3 estimate of KL(policy || reference) >= 0, with the log-ratio clamped."""
    d = (ref_logp - logp).clamp(-clamp, clamp)
    return torch.exp(d) - d - 1


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    max_tokens: int,
    *,
    epsilon: float = 0.2,
    epsilon_high: float = 0.2,
    beta: float = 0.0,
    ref_logp: torch.Tensor | None = None,
    kl_clamp: float = 10.0,
    num_rows: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The Dr.GRPO loss (module docstring) and detached statistics on the device.

    logp, old_logp, ref_logp, mask [b, T]; advantages [b]; max_tokens: L_max of the normaliser;
    num_rows: B of the normaliser, the step's sequences before any were left out (default b).
    Statistics: "kl" (masked token mean of k3, when ref_logp is given), "clip_ratio/low_mean",
    "clip_ratio/high_mean", "clip_ratio/region_mean" (fractions of tokens clipped, TRL's names).
    """
    mask = mask.to(logp.dtype)
    A = advantages[:, None].to(logp.dtype)
    ratio = torch.exp(logp - old_logp)
    clipped = ratio.clamp(1 - epsilon, 1 + epsilon_high)
    token = -torch.minimum(ratio * A, clipped * A)
    stats: dict[str, torch.Tensor] = {}
    n_tokens = mask.sum().clamp_min(1)
    if ref_logp is not None:
        kl = k3_kl(logp, ref_logp, kl_clamp)
        stats["kl"] = ((kl * mask).sum() / n_tokens).detach()
        if beta:
            token = token + beta * kl
    elif beta:
        raise ValueError("beta > 0 needs ref_logp")
    rows = logp.shape[0] if num_rows is None else num_rows
    if rows < logp.shape[0]:
        raise ValueError(f"num_rows={rows} is fewer than the {logp.shape[0]} rows given")
    loss = (token * mask).sum() / (rows * max_tokens)
    with torch.no_grad():
        low = ((ratio < 1 - epsilon) & (A < 0)).to(mask.dtype)
        high = ((ratio > 1 + epsilon_high) & (A > 0)).to(mask.dtype)
        stats["clip_ratio/low_mean"] = (low * mask).sum() / n_tokens
        stats["clip_ratio/high_mean"] = (high * mask).sum() / n_tokens
        stats["clip_ratio/region_mean"] = ((low + high) * mask).sum() / n_tokens
    return loss, stats
