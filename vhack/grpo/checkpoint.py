"""A GRPO run's files on disk: checkpoints and history.jsonl, written so that a kill -9 at any
point leaves something a rerun can read.

A checkpoint is a directory `checkpoint-<step:07d>` holding delta.safetensors (dS by module name)
and state.pt (optimizer, RNG states, step, config, basis). It is written into a temporary
directory `.checkpoint-<step>.tmp<pid>` (every file fsync'ed), renamed into place and the run
directory fsync'ed: a checkpoint is complete or absent. `read_latest` still checks what it
reads: a newest checkpoint that cannot be read (truncated by a full disk, damaged) or whose dS
is not finite is skipped with a warning, and the previous good one is used.

history.jsonl is append-only, one JSON record per line, each line flushed and fsync'ed. A kill
during a write can leave a torn last line: `read_history` drops it with a warning, and
`repair_history` cuts it off before a run appends to the file again.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path

import safetensors.torch
import torch

from vhack.files import atomic_write_text, fsync_dir, remove_stale_temps

__all__ = [
    "CHECKPOINT_PREFIX",
    "CheckpointError",
    "checkpoint_dirs",
    "history_writer",
    "latest_checkpoint",
    "read_checkpoint",
    "read_history",
    "read_latest",
    "remove_run_files",
    "remove_stale",
    "repair_history",
    "truncate_history",
    "write_checkpoint",
]

CHECKPOINT_PREFIX = "checkpoint-"
HISTORY = "history.jsonl"


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be used: missing or unreadable files, non-finite dS."""


def _step_of(path: Path) -> int | None:
    rest = path.name[len(CHECKPOINT_PREFIX) :]
    return int(rest) if path.name.startswith(CHECKPOINT_PREFIX) and rest.isdigit() else None


def checkpoint_dirs(directory: str | os.PathLike) -> list[Path]:
    """The checkpoint directories under `directory`, newest (highest step) first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if p.is_dir() and _step_of(p) is not None]
    return sorted(found, key=_step_of, reverse=True)


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The highest-step checkpoint directory under `directory` (None if there is none); not
    read: `read_latest` falls back past one that cannot be read."""
    found = checkpoint_dirs(directory)
    return found[0] if found else None


def remove_stale(directory: str | os.PathLike) -> list[Path]:
    """Remove what a killed writer left in a run directory: temporary checkpoint directories
    (`.checkpoint-*.tmp*`) and vhack.files temporaries. Returns what was removed."""
    directory = Path(directory)
    removed = remove_stale_temps(directory)
    if directory.is_dir():
        for entry in directory.iterdir():
            if entry.name.startswith("." + CHECKPOINT_PREFIX) and ".tmp" in entry.name:
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry)
    return removed


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_checkpoint(
    root: str | os.PathLike, step: int, delta: dict[str, torch.Tensor], state: dict, keep: int = 2
) -> Path:
    """Write checkpoint-<step> under root atomically and durably (see the module docstring);
    checkpoints beyond the newest `keep` are then removed. Returns its directory."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{CHECKPOINT_PREFIX}{step:07d}"
    tmp = root / f".{final.name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        safetensors.torch.save_file(
            {n: t.detach().cpu().contiguous() for n, t in delta.items()},
            str(tmp / "delta.safetensors"),
        )
        torch.save(state, tmp / "state.pt")
        for name in ("delta.safetensors", "state.pt"):
            _fsync_file(tmp / name)
        fsync_dir(tmp)
        if final.exists():  # a rerun of the same step: replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(root)
    for old in checkpoint_dirs(root)[keep:] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """(dS by module name, state) of one checkpoint directory; CheckpointError when a file is
    missing or unreadable or dS is not finite."""
    path = Path(path)
    try:
        delta = safetensors.torch.load_file(str(path / "delta.safetensors"))
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
    except Exception as err:  # truncated/corrupt files raise anything from OSError to pickle's
        raise CheckpointError(
            f"{path} cannot be read ({type(err).__name__}: {str(err).strip()[:120]})"
        ) from None
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointError(f"{path}/state.pt is not a vhack checkpoint state")
    bad = [n for n, t in delta.items() if not bool(torch.isfinite(t).all())]
    if bad:
        raise CheckpointError(f"{path}: dS holds NaN/inf values ({bad[:3]}); a diverged run")
    return delta, state


def read_latest(directory: str | os.PathLike) -> tuple[Path, dict[str, torch.Tensor], dict]:
    """(path, dS, state) of the newest checkpoint under `directory` that reads cleanly; every
    newer one that does not is skipped with a warning. CheckpointError when none does."""
    problems = []
    for path in checkpoint_dirs(directory):
        try:
            delta, state = read_checkpoint(path)
        except CheckpointError as err:
            problems.append(str(err))
            warnings.warn(f"skipping checkpoint {err}; trying the previous one", stacklevel=2)
            continue
        return path, delta, state
    if problems:
        raise CheckpointError(f"no readable checkpoint in {directory}: {'; '.join(problems)}")
    raise CheckpointError(f"no checkpoint in {directory}")


# ---- history ------------------------------------------------------------------------------------


def read_history(path: str | os.PathLike) -> list[dict]:
    """The records of a history.jsonl; a torn last line (a write cut short) is dropped with a
    warning. A bad line before the last is damage, not a torn write: ValueError naming it."""
    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8", errors="replace").split("\n")
    records = []
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i == last:
                warnings.warn(
                    f"{path}: dropping a torn last line (a write cut short): {line[:60]!r}",
                    stacklevel=2,
                )
                break
            raise ValueError(f"{path}, line {i + 1}: not a JSON record: {line[:60]!r}") from None
    return records


def repair_history(path: str | os.PathLike) -> None:
    """Cut a torn last line off history.jsonl (with a warning), so appended records start on a
    line of their own. The file is rewritten only when it needs it (atomically)."""
    path = Path(path)
    if not path.exists():
        return
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return  # every line is complete: records are written whole, newline last
    records = read_history(path)  # warns about the torn line it drops
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))


def truncate_history(path: str | os.PathLike, step: int) -> None:
    """Keep only the records of steps before `step` (a resumed run logs each step once)."""
    path = Path(path)
    if path.exists():
        kept = [r for r in read_history(path) if r["step"] < step]
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))


@contextlib.contextmanager
def history_writer(path: str | os.PathLike) -> Iterator:
    """An append function for history.jsonl: each record one line, flushed and fsync'ed."""
    path = Path(path)
    repair_history(path)
    with open(path, "a", encoding="utf-8") as f:

        def append(record: dict) -> None:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

        yield append


# ---- a run directory ----------------------------------------------------------------------------

RUN_FILES = (
    HISTORY,
    "config.json",
    "run.json",
    "delta.safetensors",
    "hack_basis.safetensors",
)


def remove_run_files(directory: str | os.PathLike) -> None:
    """Remove the files a `vhack train` run writes (checkpoints, history, config, run record,
    final dS, extracted basis) from `directory`; nothing else in it is touched."""
    directory = Path(directory)
    for path in checkpoint_dirs(directory):
        shutil.rmtree(path)
    for name in RUN_FILES:
        (directory / name).unlink(missing_ok=True)
    remove_stale(directory)
