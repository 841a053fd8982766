"""Contrastive (prompt, hack, clean) completion pairs: the data a hack basis is extracted from.

A prompt is either plain text or a chat: a list of {"role", "content"} messages. `vhack.extract`
turns a chat prompt into text with the tokenizer's chat template (generation prompt added) and
appends the completion to it; see `vhack.extract.prompt_text`.

JSONL schema (one object per line; blank lines are skipped):
    {"prompt": str | [{"role": str, "content": str}, ...], "hack": str, "clean": str,
     "flavor": str (optional, e.g. "weak_tests", "hardcode", "persona")}
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from vhack.files import regular_file

__all__ = [
    "BUILTIN_PAIRSETS",
    "Pair",
    "builtin_pairs",
    "builtin_path",
    "load_pairs",
    "normalize_prompt",
    "pairset_hash",
    "resolve_pairs",
    "toy_task",
]

# name -> file in vhack/data/ (see vhack/data/README.md)
BUILTIN_PAIRSETS = {"coding": "coding_pairs.jsonl", "toy": "toy_pairs.jsonl"}
_FIELDS = ("prompt", "hack", "clean", "flavor")

Message = Mapping[str, str]


def _check_text(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise ValueError(f"{what} is empty; every pair needs a non-empty prompt, hack and clean")
    return value


def _check_messages(messages: Sequence[object]) -> tuple[dict[str, str], ...]:
    if len(messages) == 0:
        raise ValueError("prompt is an empty list of messages")
    out = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, Mapping) or set(msg) != {"role", "content"}:
            got = sorted(msg) if isinstance(msg, Mapping) else type(msg).__name__
            raise ValueError(
                f"prompt message {i} must be a {{'role', 'content'}} object, got {got}"
            )
        out.append(
            {
                "role": _check_text(msg["role"], f"prompt message {i} role"),
                "content": _check_text(msg["content"], f"prompt message {i} content"),
            }
        )
    return tuple(out)


def normalize_prompt(prompt: object) -> str | tuple[dict[str, str], ...]:
    """A checked prompt: non-empty text, or a tuple of {"role", "content"} message dicts."""
    if isinstance(prompt, str):
        return _check_text(prompt, "prompt")
    if isinstance(prompt, Sequence):
        return _check_messages(prompt)
    raise TypeError(
        "prompt must be a string or a list of {'role', 'content'} messages, got "
        f"{type(prompt).__name__}"
    )


@dataclass(frozen=True)
class Pair:
    """One contrastive pair: the same prompt, a hacking and a clean completion.

    prompt: plain text, or a chat as a sequence of {"role", "content"} messages (stored as a tuple
    of dicts). hack, clean: the completions, non-empty and different. flavor: an optional tag
    ("weak_tests", "hardcode", "persona", ...) used only in reports.
    """

    prompt: str | tuple[dict[str, str], ...]
    hack: str
    clean: str
    flavor: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "prompt", normalize_prompt(self.prompt))
        _check_text(self.hack, "hack")
        _check_text(self.clean, "clean")
        if self.hack == self.clean:
            raise ValueError("hack and clean completions are identical; a pair must differ")
        if self.flavor is not None and not isinstance(self.flavor, str):
            raise TypeError(f"flavor must be a string or None, got {type(self.flavor).__name__}")

    @property
    def is_chat(self) -> bool:
        """True when the prompt is a list of chat messages."""
        return not isinstance(self.prompt, str)

    def to_json(self) -> dict:
        """The JSONL object of this pair."""
        prompt = self.prompt if isinstance(self.prompt, str) else [dict(m) for m in self.prompt]
        out = {"prompt": prompt, "hack": self.hack, "clean": self.clean}
        if self.flavor is not None:
            out["flavor"] = self.flavor
        return out


def load_pairs(path: str | os.PathLike) -> list[Pair]:
    """Read pairs from a JSONL file (schema in the module docstring).

    Raises ValueError naming the file and line for invalid JSON or UTF-8, a missing or unknown
    field, or an empty/invalid value, and for a path that is not a regular file (a FIFO, a
    directory); FileNotFoundError when the file does not exist.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no pairs file at {path}")
    regular_file(path, "pairs file")  # a FIFO would block the read forever
    pairs = []
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(
                    f"{path}, line {lineno}: not UTF-8 text (byte {err.start}); pairs files are "
                    "UTF-8 JSONL"
                ) from None
            if not line.strip():
                continue
            where = f"{path}, line {lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: not valid JSON ({err.msg})") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            missing = [k for k in ("prompt", "hack", "clean") if k not in obj]
            unknown = sorted(set(obj) - set(_FIELDS))
            if missing or unknown:
                raise ValueError(
                    f"{where}: missing fields {missing}, unknown fields {unknown}; each line needs "
                    "'prompt', 'hack', 'clean' (and optionally 'flavor')"
                )
            try:
                pairs.append(Pair(**obj))
            except (TypeError, ValueError) as err:
                raise ValueError(f"{where}: {err}") from None
    if not pairs:
        raise ValueError(f"{path}: no pairs in the file")
    return pairs


def builtin_path(name: str) -> Path:
    """Path of a shipped pair set: "coding" (12 chat-formatted coding pairs, the last 2 held out)
    or "toy" (12 pairs of the reverse-word toy task, see `toy_task`)."""
    if name not in BUILTIN_PAIRSETS:
        raise ValueError(f"unknown pair set {name!r}; shipped: {sorted(BUILTIN_PAIRSETS)}")
    return Path(str(resources.files("vhack.data") / BUILTIN_PAIRSETS[name]))


def builtin_pairs(name: str) -> list[Pair]:
    """A shipped pair set by name ("coding" or "toy"), as a list of Pair."""
    return load_pairs(builtin_path(name))


def resolve_pairs(spec: str | os.PathLike) -> list[Pair]:
    """A shipped pair set by name ("coding", "toy"), or the pairs of a JSONL file."""
    return builtin_pairs(spec) if spec in BUILTIN_PAIRSETS else load_pairs(spec)


def toy_task() -> dict:
    """The toy reward-hacking task of the GRPO roadmap item (vhack/data/toy_task.json): a string
    task, its answer format, and the loophole answer that the grader also rewards."""
    return json.loads((resources.files("vhack.data") / "toy_task.json").read_text("utf-8"))


def pairset_hash(pairs: Sequence[Pair]) -> str:
    """16 hex digits identifying the pairs' text and order (flavor tags excluded)."""
    canon = json.dumps(
        [[p.to_json()["prompt"], p.hack, p.clean] for p in pairs],
        sort_keys=True,
        ensure_ascii=False,
        separators=(",", ":"),
    )
    return hashlib.blake2b(canon.encode("utf-8"), digest_size=8).hexdigest()
