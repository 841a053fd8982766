"""GRPOConfig: every knob of the reference GRPO loop, checked before any work starts.

Names follow TRL's GRPOConfig where the knob exists there (num_generations, beta, epsilon,
epsilon_high, num_iterations, scale_rewards, temperature, top_p, max_grad_norm); the defaults are
the toy world's (8 prompts x 8 completions, AdamW lr 1e-2 on dS).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from vhack.errors import UsageError

__all__ = ["ARMS", "CONTROL_ARMS", "GRPOConfig"]

# vanilla: measure only; projected / projected-update: the extracted basis on the gradient / the
# update; refresh: projected, re-extracted every refresh_every steps at the current dS; the
# controls project (like "projected") with a basis that is not the extracted hack basis
# (random-matched: random axes removing as much gradient energy as the hack basis would, the
# control of record; random-v: k random axes per module, which remove far less); kl: no
# projection, a KL penalty to the dS = 0 model instead (needs beta > 0).
ARMS = (
    "vanilla",
    "projected",
    "projected-update",
    "refresh",
    "random-matched",
    "random-v",
    "shuffled-v",
    "nonhack-v",
    "kl",
)
CONTROL_ARMS = ("random-matched", "random-v", "shuffled-v", "nonhack-v")
SCALE_REWARDS = ("none", "group")


def _named(name: str) -> str:
    """A field as errors name it: with its command-line flag where it is one (lr (--lr))."""
    f = next(f for f in dataclasses.fields(GRPOConfig) if f.name == name)
    if "help" not in f.metadata:
        return name
    return f"{name} ({f.metadata.get('flag', '--' + name.replace('_', '-'))})"


@dataclass
class GRPOConfig:
    """One GRPO run.

    Sampling: prompts_per_step prompts, num_generations completions each (the group), at most
    max_new_tokens new tokens (None = the environment's), temperature / top_p.
    Objective (Dr.GRPO by default): advantage A = r - group mean (scale_rewards="group" divides
    by the group's std as in the original GRPO); PPO clip with [1 - epsilon, 1 + epsilon_high];
    num_iterations optimizer steps per batch of rollouts; K3 KL to the dS = 0 model weighted by
    beta, its log-ratio clamped to +-kl_clamp; token losses summed and divided by
    (all sequences of the step x max_new_tokens), TRL's `loss_type="dr_grpo"` normaliser. Groups
    whose rewards all agree carry no policy-gradient signal: with beta = 0 they are left out of
    the update (their gradient is exactly 0), with beta > 0 they stay in for the KL term. With
    num_iterations = 1 the ratio is 1 and the clip never acts (on-policy REINFORCE with a group
    baseline, as in TRL at its default); it acts from the second iteration on.
    Optimizer: AdamW(lr, betas, weight_decay) on adapter.delta; gradients clipped to
    max_grad_norm (None: no clipping) after the projection.
    teacher_per_group: completions of each group replaced by a teacher's (cached rollouts, e.g.
    all hacks); their dS gradient and the students' are then told apart from the same backward
    and logged as cin_t / cin_s (the design doc's Test 4).
    Arm: see ARMS; k axes per module, refresh_every steps between re-extractions (arm
    "refresh"), basis_seed for the random controls. matched_energy (arm random-matched): the
    share of every module's gradient energy its random axes remove at each step, e.g. the
    energy "projected" removed in a run from the same start; None: as much as the hack basis
    would remove from that gradient.
    """

    arm: str = field(default="vanilla", metadata={"help": "one of " + ", ".join(ARMS)})
    steps: int = field(default=100, metadata={"help": "GRPO steps"})
    prompts_per_step: int = field(default=8, metadata={"help": "prompts sampled per step"})
    num_generations: int = field(
        default=8,
        metadata={"help": "completions per prompt (the group, >= 2)", "flag": "--group-size"},
    )
    max_new_tokens: int | None = field(
        default=None, metadata={"help": "new tokens per completion (default: the environment's)"}
    )
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature"})
    top_p: float = 1.0
    lr: float = field(default=1e-2, metadata={"help": "AdamW learning rate on dS"})
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    max_grad_norm: float | None = field(
        default=None,
        metadata={
            "help": "clip gradients to this norm after the projection (default: no clipping)"
        },
    )
    beta: float = field(default=0.0, metadata={"help": "KL weight (K3, to dS = 0)"})
    kl_clamp: float = 10.0
    epsilon: float = 0.2
    epsilon_high: float = 0.2
    num_iterations: int = field(
        default=1, metadata={"help": "optimizer steps per batch of rollouts"}
    )
    scale_rewards: str = field(
        default="none",
        metadata={"help": "none (Dr.GRPO) or group (GRPO: divide by the group's std)"},
    )
    log_kl: bool = True
    teacher_per_group: int = field(
        default=0,
        metadata={
            "help": "completions per group taken from the environment's hacking teacher; logs "
            "cin_s / cin_t"
        },
    )
    k: int = field(default=6, metadata={"help": "axes per module projected"})
    top_k: int = field(default=6, metadata={"help": "axes extracted per module (>= k)"})
    refresh_every: int = field(
        default=25, metadata={"help": "arm refresh: steps between re-extractions"}
    )
    basis_seed: int = 0
    matched_energy: float | None = field(
        default=None,
        metadata={
            "help": "arm random-matched: share of the gradient energy removed per step "
            "(default: what the hack basis would remove)"
        },
    )
    seed: int = field(default=0, metadata={"help": "seed of the run (and of the tiny / toy model)"})
    checkpoint_every: int = field(
        default=0, metadata={"help": "steps between checkpoints (0: never)"}
    )
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        self.validate()

    def validate(self) -> None:
        """UsageError naming the first bad field and what it accepts."""
        if self.arm not in ARMS:
            raise UsageError(f"unknown arm {self.arm!r}; choose one of {', '.join(ARMS)}")
        if self.arm == "kl" and not (isinstance(self.beta, (int, float)) and self.beta > 0):
            raise UsageError(
                f"arm kl is the KL penalty alone: it needs beta > 0, got {self.beta!r}"
            )
        if self.scale_rewards not in SCALE_REWARDS:
            raise UsageError(
                f"scale_rewards must be one of {SCALE_REWARDS}, got {self.scale_rewards!r}"
            )
        ints = {
            "steps": (self.steps, 1),
            "prompts_per_step": (self.prompts_per_step, 1),
            "num_generations": (self.num_generations, 2),
            "num_iterations": (self.num_iterations, 1),
            "k": (self.k, 1),
            "top_k": (self.top_k, 1),
            "refresh_every": (self.refresh_every, 1),
            "checkpoint_every": (self.checkpoint_every, 0),
        }
        if self.max_new_tokens is not None:
            ints["max_new_tokens"] = (self.max_new_tokens, 1)
        for name, (value, lowest) in ints.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
                why = (
                    " (a group needs >= 2 completions to compare)"
                    if name == "num_generations"
                    else ""
                )
                raise UsageError(
                    f"{_named(name)} must be an integer >= {lowest}{why}, got {value!r}"
                )
        if not 0 <= self.teacher_per_group < self.num_generations:
            raise UsageError(
                f"teacher_per_group must be in [0, num_generations), got {self.teacher_per_group}"
            )
        if self.k > self.top_k:
            raise UsageError(f"k={self.k} axes cannot exceed top_k={self.top_k} extracted axes")
        positive = {"lr": self.lr, "temperature": self.temperature, "kl_clamp": self.kl_clamp}
        nonnegative = {
            "beta": self.beta,
            "epsilon": self.epsilon,
            "epsilon_high": self.epsilon_high,
            "weight_decay": self.weight_decay,
        }
        if self.max_grad_norm is not None:
            positive["max_grad_norm"] = self.max_grad_norm
        for name, value in {**positive, **nonnegative, "top_p": self.top_p}.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise UsageError(f"{_named(name)} must be a number, got {value!r}")
            # NaN fails every comparison, inf is refused explicitly: neither trains anything
            if not math.isfinite(value) or (name in positive and value <= 0) or value < 0:
                rule = "> 0" if name in positive else ">= 0"
                raise UsageError(f"{_named(name)} must be a finite number {rule}, got {value!r}")
        if self.matched_energy is not None and not (
            isinstance(self.matched_energy, (int, float)) and 0 < self.matched_energy < 1
        ):
            raise UsageError(
                f"matched_energy must be None or in (0, 1), got {self.matched_energy!r}"
            )
        if not 0 < self.top_p <= 1:
            raise UsageError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if len(self.betas) != 2 or not all(
            isinstance(b, (int, float)) and 0 <= b < 1 for b in self.betas
        ):
            raise UsageError(f"betas must be two numbers in [0, 1), got {self.betas!r}")

    def check_fits(self, prompt_tokens: int, max_positions: int | None, env_tokens: int) -> int:
        """The new-token budget (max_new_tokens, or the environment's); UsageError when the longest
        prompt plus it exceeds the model's positions."""
        new = self.max_new_tokens if self.max_new_tokens is not None else env_tokens
        if max_positions is not None and prompt_tokens + new > max_positions:
            raise UsageError(
                f"prompts of up to {prompt_tokens} tokens plus max_new_tokens={new} exceed the "
                f"model's {max_positions} positions; lower max_new_tokens or use shorter prompts"
            )
        return new

    @property
    def batch_size(self) -> int:
        """Completions per step."""
        return self.prompts_per_step * self.num_generations

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> GRPOConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UsageError(f"unknown GRPOConfig fields {unknown}; known: {sorted(known)}")
        return cls(**d)
