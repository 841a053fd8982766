"""Reference GRPO loop: environments, rollouts, advantages, the clipped objective and training."""
