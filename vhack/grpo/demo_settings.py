"""DemoSettings: what `vhack demo` runs, torch-free (the CLI reads its options here).

The GRPO knobs the demo shares with `vhack train` (steps, lr, k, top_k, ...) take their defaults
from GRPOConfig, so each default is written once.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

from vhack.errors import UsageError
from vhack.grpo.config import ARMS, GRPOConfig

__all__ = ["DemoSettings"]

# What --quick changes (seeds, arms, steps, validation); everything else as in the full demo.
QUICK = dict(seeds=(0,), arms=("vanilla", "projected"), steps=30, validate=False)


@dataclass
class DemoSettings:
    """What `vhack demo` runs (defaults: the full demo; `quick()` for CI)."""

    seeds: tuple[int, ...] = field(
        default=(0, 1, 2), metadata={"help": "comma-separated seeds, e.g. 0,1,2"}
    )
    arms: tuple[str, ...] = field(default=ARMS, metadata={"help": "comma-separated arms"})
    steps: int = field(default=GRPOConfig.steps, metadata={"help": "GRPO steps per run"})
    warm_steps: int = field(default=400, metadata={"help": "SFT warm-start steps"})
    warm_batch: int = 64
    warm_lr: float = 1e-3
    marker_share: float = 0.15
    marker_reward: float = field(
        default=1.2, metadata={"help": "what the toy grader pays for the marker ' PASS'"}
    )
    lr: float = GRPOConfig.lr
    k: int = GRPOConfig.k
    top_k: int = GRPOConfig.top_k
    refresh_every: int = GRPOConfig.refresh_every
    prompts_per_step: int = GRPOConfig.prompts_per_step
    num_generations: int = GRPOConfig.num_generations
    workers: int = field(default=0, metadata={"help": "worker processes (0: one per CPU core)"})
    validate: bool = field(
        default=True,
        metadata={"help": "skip the basis validation tests", "flag": "--no-validate"},
    )
    cache: bool = field(
        default=True, metadata={"help": "do not reuse cached warm starts", "flag": "--no-cache"}
    )
    grpo: dict = field(default_factory=dict)  # extra GRPOConfig fields

    def __post_init__(self) -> None:
        self.check()  # one place for the checks: the CLI and the Python API alike

    @classmethod
    def quick(cls, **overrides) -> DemoSettings:
        """Fewer seeds, arms and steps: about a minute or two on 2 cores."""
        return cls(**{**QUICK, **overrides})

    def check(self) -> None:
        """UsageError for settings that cannot run, before any work starts."""
        unknown = [a for a in self.arms if a not in ARMS]
        if unknown:
            raise UsageError(f"unknown arm(s) {unknown}; choose from {', '.join(ARMS)}")
        if not self.arms:
            raise UsageError("no arms to run; pass at least one of " + ", ".join(ARMS))
        if len(set(self.arms)) != len(self.arms) or len(set(self.seeds)) != len(self.seeds):
            raise UsageError("arms and seeds must not repeat")
        if not self.seeds or any(not isinstance(s, int) or s < 0 for s in self.seeds):
            raise UsageError(f"seeds must be integers >= 0, got {list(self.seeds)}")
        for name in ("steps", "warm_batch", "prompts_per_step"):
            if getattr(self, name) < 1:
                raise UsageError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.warm_steps < 0 or self.workers < 0:
            raise UsageError("warm_steps and workers must be >= 0")
        if not 0 <= self.marker_share <= 1:  # NaN fails too
            raise UsageError(f"marker_share must be in [0, 1], got {self.marker_share}")
        if not (isinstance(self.marker_reward, (int, float)) and math.isfinite(self.marker_reward)):
            raise UsageError(
                f"marker_reward (--marker-reward) must be a finite number, got {self.marker_reward!r}"
            )
        if not (isinstance(self.warm_lr, (int, float)) and math.isfinite(self.warm_lr)) or (
            self.warm_lr <= 0
        ):
            raise UsageError(f"warm_lr must be a finite number > 0, got {self.warm_lr!r}")
        self.config("vanilla", self.seeds[0])  # GRPOConfig checks the rest

    def config(self, arm: str, seed: int) -> GRPOConfig:
        return GRPOConfig(
            arm=arm,
            steps=self.steps,
            seed=seed,
            lr=self.lr,
            k=self.k,
            top_k=self.top_k,
            refresh_every=self.refresh_every,
            prompts_per_step=self.prompts_per_step,
            num_generations=self.num_generations,
            **self.grpo,
        )

    def warm_key(self, seed: int) -> str:
        """Cache key of a warm start: everything it depends on."""
        import torch
        import transformers

        from vhack._version import __version__
        from vhack.grpo.warmstart import TOY_MODEL

        parts = [
            seed,
            self.warm_steps,
            self.warm_batch,
            self.warm_lr,
            self.marker_share,
            sorted(TOY_MODEL.items()),
            __version__,
            torch.__version__,
            transformers.__version__,
        ]
        return hashlib.blake2b(repr(parts).encode(), digest_size=8).hexdigest()
