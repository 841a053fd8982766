"""How many CPU threads torch should use for a job: one for small models, and never more threads
in total than the cores this process may run on. Torch-free: the CLI decides before torch loads.

Why: torch starts one thread per core and its OpenMP threads spin-wait between operations. A
small model's matmuls are too short to split, so extra threads only synchronise; on a shared
machine, where another process holds a core, every synchronisation stalls. `vhack train --steps 8
--model tiny` took 29-43 s with torch's default threads and 1.6-1.8 s with one thread on a loaded
2-core machine (issue 20).

The order: an explicit request (the CLI's --threads) wins; else OMP_NUM_THREADS or
MKL_NUM_THREADS, when set to a positive integer, is left to torch, as PyTorch users expect; else
the automatic choice: 1 thread for a model under SMALL_MODEL_PARAMS parameters, otherwise the
available cores divided among the worker processes (at least 1).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass

__all__ = [
    "SMALL_MODEL_PARAMS",
    "THREAD_ENV_VARS",
    "ThreadChoice",
    "available_cores",
    "choose_threads",
    "env_threads",
    "is_small_model",
]

# Below this many parameters a model gets one thread: its matmuls (hidden size up to ~256-384)
# are too small to split across threads. The embedded tiny model has about 0.1 M.
SMALL_MODEL_PARAMS = 10_000_000
# Environment variables through which a user sets torch's CPU threads; torch reads them at start.
THREAD_ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


@dataclass(frozen=True)
class ThreadChoice:
    """threads: torch CPU threads per process; source: "--threads", the environment variable's
    name, or "auto"; reason: one line saying why."""

    threads: int
    source: str
    reason: str

    def to_dict(self) -> dict:
        return asdict(self)


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity, e.g. under taskset or a container's
    cpuset), else os.cpu_count(); at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def env_threads(environ: Mapping[str, str] | None = None) -> tuple[str, int] | None:
    """(variable, threads) of the first of THREAD_ENV_VARS set to a positive integer, else None
    (unset, empty or not a positive integer: torch ignores those too)."""
    environ = os.environ if environ is None else environ
    for name in THREAD_ENV_VARS:
        text = environ.get(name, "").strip()
        if text.isdigit() and int(text) > 0:
            return name, int(text)
    return None


def is_small_model(n_params: int) -> bool:
    """True for a model with fewer than SMALL_MODEL_PARAMS parameters (one thread)."""
    return n_params < SMALL_MODEL_PARAMS


def choose_threads(
    small_model: bool,
    workers: int = 1,
    *,
    requested: int | None = None,
    cores: int | None = None,
    environ: Mapping[str, str] | None = None,
) -> ThreadChoice:
    """Torch CPU threads for each of `workers` processes running a model (module docstring).

    small_model: see `is_small_model`; requested: an explicit count (--threads), which wins;
    cores: the cores to share (default: `available_cores()`); environ: default os.environ.
    """
    if workers < 1:
        raise ValueError(f"workers={workers}: pass the number of worker processes, at least 1")
    if requested is not None:
        if requested < 1:
            raise ValueError(f"threads={requested}: pass a positive number of threads")
        return ThreadChoice(requested, "--threads", f"{requested} requested")
    from_env = env_threads(environ)
    if from_env is not None:
        name, n = from_env
        return ThreadChoice(n, name, f"{name}={n} is set: torch's setting is kept")
    cores = available_cores() if cores is None else cores
    if small_model:
        return ThreadChoice(
            1, "auto", f"a model under {SMALL_MODEL_PARAMS // 10**6} M parameters: 1 thread"
        )
    per_worker = max(1, cores // workers)
    return ThreadChoice(
        per_worker,
        "auto",
        f"{cores} cores / {workers} worker process{'es' if workers > 1 else ''}",
    )
