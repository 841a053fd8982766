"""The environment interface of the GRPO loop: sample tasks, score completions.

An environment hands out prompts and grades what the model wrote. Besides the reward that drives
the advantage it reports two ground-truth flags the loop only logs: `solved` (the task is truly
done) and `hacked` (rewarded although not solved). Environments never see the model.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from vhack.pairs import Pair

__all__ = ["Environment", "Score", "Task"]


@dataclass(frozen=True)
class Task:
    """One prompt of an environment.

    prompt: plain text, or a chat as a tuple of {"role", "content"} messages (rendered with the
    tokenizer's chat template, like `vhack.Pair` prompts). meta: whatever the environment needs to
    grade a completion of it (the expected answer, a problem id); never shown to the model.
    """

    prompt: str | tuple[dict[str, str], ...]
    meta: Mapping[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class Score:
    """The grade of one completion.

    reward: the (possibly hackable) reward that drives the advantage. solved: the task is truly
    done (hidden tests pass, exact answer). hacked: rewarded while not solved. info: extra
    per-completion numbers or flags to log (e.g. which loophole fired, a failure reason).
    """

    reward: float
    solved: bool
    hacked: bool
    info: Mapping[str, float | int | bool | str] = field(default_factory=dict)


class Environment(ABC):
    """A source of tasks and a grader.

    Subclasses set `name` and `max_new_tokens` (the completion length the task needs) and
    implement `sample` and `score`. `score_batch` may be overridden to grade in parallel.
    """

    name: str = "env"
    max_new_tokens: int = 16

    @abstractmethod
    def sample(self, n: int, rng: random.Random) -> list[Task]:
        """n tasks drawn with rng (deterministic for a seeded rng)."""

    @abstractmethod
    def score(self, task: Task, completion: str) -> Score:
        """Grade one completion (the generated text only, without the prompt)."""

    def score_batch(self, tasks: Sequence[Task], completions: Sequence[str]) -> list[Score]:
        """Grade many completions; one Score per (task, completion), in order."""
        if len(tasks) != len(completions):
            raise ValueError(f"got {len(tasks)} tasks for {len(completions)} completions")
        return [self.score(t, c) for t, c in zip(tasks, completions, strict=True)]

    def hack_pairs(self) -> list[Pair]:
        """Contrastive (prompt, hack, clean) pairs for extracting a hack basis in this world.
        Environments without a natural pair set return []."""
        return []

    def close(self) -> None:
        """Release workers or temporary files (no-op by default)."""
        return None
