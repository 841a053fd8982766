"""The sandbox policy: refuse weak isolation, hand out unprivileged uids, run programs in parallel."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from vhack.errors import UsageError
from vhack.sandbox.launch import Limits, RunResult, launch
from vhack.sandbox.probe import LEVELS, IsolationReport, probe
from vhack.sandbox.uids import UID_BASE, UID_COUNT, lease_uid

__all__ = ["UID_BASE", "UID_COUNT", "IsolationUnavailable", "Job", "Sandbox"]


class IsolationUnavailable(UsageError):
    """This machine cannot isolate untrusted programs as strongly as the sandbox was told to."""


@dataclass(frozen=True)
class Job:
    """One program to run: Python source (main.py), its stdin, extra files, optional limits."""

    program: str
    stdin: bytes = b""
    files: Mapping[str, str] = field(default_factory=dict)
    limits: Limits | None = None


class Sandbox:
    """Runs untrusted Python programs, each in its own sandbox, up to `workers` at a time.

    required: the weakest isolation level accepted ("namespaces" by default; "process" accepts
    rlimits and a separate process only, for code you trust). The strongest level the probe found
    is used. Raises IsolationUnavailable at construction when the probe found less than required.
    limits: default Limits of each run. workers: concurrent runs (default: CPU count).
    hide: host paths masked inside the sandbox (e.g. files holding hidden tests).
    As root, each running program gets its own unprivileged uid, leased host-wide (see
    `vhack.sandbox.uids`), so graders on one machine never share a uid's process limit.
    """

    def __init__(
        self,
        required: str = "namespaces",
        limits: Limits | None = None,
        workers: int | None = None,
        hide: Sequence[str] = (),
        report: IsolationReport | None = None,
    ) -> None:
        if required not in LEVELS[1:]:
            raise UsageError(f"required={required!r}; choose one of {', '.join(LEVELS[1:])}")
        self.report = report or probe()
        if LEVELS.index(self.report.level) < LEVELS.index(required):
            raise IsolationUnavailable(
                f"sandbox needs {required!r} isolation but this machine gives "
                f"{self.report.level!r} ({'; '.join(self.report.notes) or 'no details'}); "
                "enable unprivileged user namespaces (or run as root) on x86_64 or aarch64 with "
                "seccomp, or pass required='process' only for code you trust"
            )
        self.required = required
        self.mode = self.report.level
        self.limits = limits or Limits()
        self.workers = int(workers or os.cpu_count() or 1)
        if self.workers < 1:
            raise UsageError(f"workers must be >= 1, got {workers}")
        self.hide = [os.path.realpath(h) for h in hide]
        self._slots = threading.BoundedSemaphore(self.workers)
        self._pool: ThreadPoolExecutor | None = None

    def run(
        self,
        program: str,
        stdin: bytes = b"",
        files: Mapping[str, str] | None = None,
        limits: Limits | None = None,
    ) -> RunResult:
        """Run one program; blocks while `workers` others are running."""
        uids = lease_uid() if os.geteuid() == 0 else contextlib.nullcontext()
        with self._slots, uids as uid:
            return launch(
                program,
                mode=self.mode,
                stdin=stdin,
                files=files,
                limits=limits or self.limits,
                uid=uid,
                hide=self.hide,
                seccomp=self.mode == "namespaces",
                use_cgroups=self.report.cgroup != "none",
            )

    def run_many(self, jobs: Sequence[Job]) -> list[RunResult]:
        """Run jobs in parallel (up to `workers` at once); results in the order of `jobs`."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="vhack-sandbox")
        futures = [self._pool.submit(self.run, j.program, j.stdin, j.files, j.limits) for j in jobs]
        return [f.result() for f in futures]

    def close(self) -> None:
        """Stop the worker threads (running programs finish first)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
