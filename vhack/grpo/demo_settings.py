"""DemoSettings: what `vhack demo` runs, torch-free (the CLI reads its options here).

The GRPO knobs the demo shares with `vhack train` (steps, lr, k, top_k, ...) take their defaults
from GRPOConfig, so each default is written once.
"""

from __future__ import annotations

import hashlib
import math
import os
import platform
from dataclasses import dataclass, field

from vhack.errors import UsageError
from vhack.grpo.config import ARMS, GRPOConfig

__all__ = ["DEMO_ARMS", "QUICK", "DemoSettings", "cpu_name", "plan_workers"]

# The arms the demo runs by default: the method (projected, refresh), the baseline (vanilla), the
# controls of record and a KL penalty. projected-update and random-v run when asked (--arms).
DEMO_ARMS = ("vanilla", "projected", "refresh", "random-matched", "shuffled-v", "nonhack-v", "kl")
# What --quick changes (seeds, arms, steps, validation, evaluation prompts); everything else as in
# the full demo (the warm start too: the two share its cache).
QUICK = dict(seeds=(0,), arms=("vanilla", "projected"), steps=30, validate=False, eval_prompts=16)


@dataclass
class DemoSettings:
    """What `vhack demo` runs (defaults: the full demo; `quick()` for CI)."""

    seeds: tuple[int, ...] = field(
        default=tuple(range(8)), metadata={"help": "comma-separated seeds, e.g. 0,1,2"}
    )
    arms: tuple[str, ...] = field(
        default=DEMO_ARMS, metadata={"help": f"comma-separated arms, from {', '.join(ARMS)}"}
    )
    steps: int = field(default=GRPOConfig.steps, metadata={"help": "GRPO steps per run"})
    warm_steps: int = field(default=400, metadata={"help": "SFT warm-start steps"})
    warm_batch: int = field(default=64, metadata={"help": "warm-start batch size"})
    warm_lr: float = field(default=1e-3, metadata={"help": "warm-start AdamW learning rate"})
    marker_share: float = field(
        default=0.1, metadata={"help": "share of warm-start targets that are the marker ' PASS'"}
    )
    heldout_share: float = field(
        default=0.1,
        metadata={"help": "share of warm-start targets that are the held-out marker ' DONE'"},
    )
    marker_reward: float = field(
        default=1.2, metadata={"help": "what the toy grader pays for either marker"}
    )
    kl_beta: float = field(
        default=1.0, metadata={"help": "beta of arm kl (the KL penalty to the warm start)"}
    )
    lr: float = field(default=GRPOConfig.lr, metadata={"help": "GRPO AdamW learning rate on dS"})
    k: int = field(default=GRPOConfig.k, metadata={"help": "hack-basis axes per module"})
    top_k: int = field(default=GRPOConfig.top_k, metadata={"help": "axes extracted per module"})
    refresh_every: int = field(
        default=GRPOConfig.refresh_every,
        metadata={"help": "steps between re-extractions (arm refresh)"},
    )
    prompts_per_step: int = field(
        default=GRPOConfig.prompts_per_step, metadata={"help": "prompts per GRPO step"}
    )
    num_generations: int = field(
        default=GRPOConfig.num_generations, metadata={"help": "completions per prompt"}
    )
    eval_prompts: int = field(
        default=64, metadata={"help": "held-out prompts of the after-training evaluation"}
    )
    eval_samples: int = field(
        default=8, metadata={"help": "T = 1 samples per held-out prompt in the evaluation"}
    )
    workers: int = field(
        default=0, metadata={"help": "worker processes (0: one per CPU core; at most the cores)"}
    )
    validate: bool = field(
        default=True,
        metadata={"help": "skip the basis validation tests", "flag": "--no-validate"},
    )
    cache: bool = field(
        default=True, metadata={"help": "do not reuse cached warm starts", "flag": "--no-cache"}
    )
    grpo: dict = field(
        default_factory=dict, metadata={"help": "extra GRPOConfig fields (Python API only)"}
    )

    def __post_init__(self) -> None:
        self.check()  # one place for the checks: the CLI and the Python API alike

    @classmethod
    def quick(cls, **overrides) -> DemoSettings:
        """Fewer seeds, arms and steps (QUICK): a minute or two on 2 cores."""
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
        for name in ("steps", "warm_batch", "prompts_per_step", "eval_prompts", "eval_samples"):
            if getattr(self, name) < 1:
                raise UsageError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.warm_steps < 0 or self.workers < 0:
            raise UsageError("warm_steps and workers must be >= 0")
        shares = (self.marker_share, self.heldout_share)
        if not (min(shares) >= 0 and sum(shares) <= 1):  # NaN fails too
            raise UsageError(
                f"marker_share and heldout_share must be >= 0 with a sum <= 1, got {shares}"
            )
        if not (isinstance(self.marker_reward, (int, float)) and math.isfinite(self.marker_reward)):
            raise UsageError(
                f"marker_reward (--marker-reward) must be a finite number, got {self.marker_reward!r}"
            )
        if not (isinstance(self.warm_lr, (int, float)) and math.isfinite(self.warm_lr)) or (
            self.warm_lr <= 0
        ):
            raise UsageError(f"warm_lr must be a finite number > 0, got {self.warm_lr!r}")
        if "kl" in self.arms and not (
            isinstance(self.kl_beta, (int, float))
            and math.isfinite(self.kl_beta)
            and self.kl_beta > 0
        ):
            raise UsageError(f"arm kl needs kl_beta (--kl-beta) > 0, got {self.kl_beta!r}")
        for arm in self.arms:
            self.config(arm, self.seeds[0])  # GRPOConfig checks the rest

    def config(self, arm: str, seed: int, matched_energy: float | None = None) -> GRPOConfig:
        """The GRPOConfig of one run (arm kl: beta = kl_beta; random-matched: matched_energy;
        the KL to the warm start is computed only where it is used, arm kl; `grpo` overrides
        last)."""
        fields = dict(
            arm=arm,
            steps=self.steps,
            seed=seed,
            lr=self.lr,
            k=self.k,
            top_k=self.top_k,
            refresh_every=self.refresh_every,
            prompts_per_step=self.prompts_per_step,
            num_generations=self.num_generations,
            log_kl=arm == "kl",
        )
        if arm == "kl":
            fields["beta"] = self.kl_beta
        if arm == "random-matched":
            fields["matched_energy"] = matched_energy
        return GRPOConfig(**{**fields, **self.grpo})

    def warm_key(self, seed: int) -> str:
        """Cache key of a warm start: everything that changes its numbers (settings, model,
        versions, torch threads, CPU model)."""
        import torch
        import transformers

        from vhack._version import __version__
        from vhack.grpo.warmstart import TOY_MODEL, WARM_THREADS

        parts = [
            seed,
            self.warm_steps,
            self.warm_batch,
            self.warm_lr,
            self.marker_share,
            self.heldout_share,
            sorted(TOY_MODEL.items()),
            __version__,
            torch.__version__,
            transformers.__version__,
            WARM_THREADS,
            platform.machine(),
            cpu_name(),
        ]
        return hashlib.blake2b(repr(parts).encode(), digest_size=8).hexdigest()


def plan_workers(settings: DemoSettings, cores: int | None = None) -> int:
    """Worker processes of a run: settings.workers (0: one per core), never more than the cores
    this process may use nor than the runs. Each worker runs one torch thread, so the results do
    not depend on this number."""
    if cores is None:
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:  # not Linux
            cores = os.cpu_count() or 1
    wanted = settings.workers or cores
    return max(1, min(wanted, cores, len(settings.seeds) * len(settings.arms)))


def cpu_name() -> str:
    """The CPU model (Linux /proc/cpuinfo), else what platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
