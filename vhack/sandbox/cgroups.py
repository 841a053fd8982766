"""Per-program resource limits with cgroup v1 controllers: memory, process count and CPU.

rlimits count per process (RLIMIT_AS, RLIMIT_CPU) or per uid (RLIMIT_NPROC); a program that forks
multiplies them. A cgroup counts the program and every process it starts together: memory
(including tmpfs and shared memory pages), processes and threads (pids.max) and CPU bandwidth
(cpu.cfs_quota_us). Each run gets its own cgroup, nested under the grader's own cgroup of each
controller (so it also stays inside whatever limits the grader itself runs under), created before
the run and removed after it.

Only cgroup v1 hierarchies are driven here (writable as root); on a cgroup-v2-only machine, or when
the hierarchies are not writable, `support()` says why and runs fall back to per-process rlimits.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
import signal
import time
from dataclasses import dataclass

__all__ = ["CONTROLLERS", "CgroupSupport", "RunCgroup", "support"]

CONTROLLERS = ("memory", "pids", "cpu")
CPU_PERIOD_US = 100_000
_counter = itertools.count()


@dataclass(frozen=True)
class CgroupSupport:
    """version: "v1" when every controller of CONTROLLERS is usable, else "none". parents:
    controller -> directory the runs' cgroups are made in. note: why not, for humans."""

    version: str
    parents: dict[str, str]
    note: str


def _v1_mounts() -> dict[str, str]:
    """controller -> mount point of its cgroup v1 hierarchy (from /proc/self/mountinfo)."""
    mounts: dict[str, str] = {}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields, super_fields = left.split(), right.split()
            if len(super_fields) < 3 or super_fields[0] != "cgroup":
                continue
            for opt in super_fields[2].split(","):
                if opt in CONTROLLERS:
                    mounts.setdefault(opt, fields[4])
    return mounts


def _own_paths() -> dict[str, str]:
    """controller -> this process's cgroup path in that v1 hierarchy (from /proc/self/cgroup)."""
    paths: dict[str, str] = {}
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            for c in controllers.split(","):
                if c in CONTROLLERS:
                    paths[c] = path
    return paths


@functools.lru_cache(maxsize=1)
def support() -> CgroupSupport:
    """Whether this process can give each run its own cgroup (cached; tries once for real)."""
    if os.geteuid() != 0:
        return CgroupSupport("none", {}, "cgroups: not root (no delegated cgroup is used)")
    try:
        mounts, own = _v1_mounts(), _own_paths()
    except OSError as e:
        return CgroupSupport("none", {}, f"cgroups: cannot read /proc: {e}")
    missing = [c for c in CONTROLLERS if c not in mounts or c not in own]
    if missing:
        v2 = os.path.exists("/sys/fs/cgroup/cgroup.controllers")
        why = "a cgroup v2 machine, which this sandbox does not drive yet" if v2 else "not mounted"
        return CgroupSupport("none", {}, f"cgroups: no v1 {'/'.join(missing)} hierarchy ({why})")
    parents = {c: os.path.join(mounts[c], own[c].lstrip("/")) for c in CONTROLLERS}
    _remove_stale(parents)
    try:
        probe = RunCgroup(CgroupSupport("v1", parents, ""), memory_bytes=64 << 20, pids=8, cpus=1)
        probe.remove()
    except OSError as e:
        return CgroupSupport("none", {}, f"cgroups: v1 hierarchies not writable: {e}")
    return CgroupSupport("v1", parents, "cgroups: v1 memory, pids, cpu per program")


def _remove_stale(parents: dict[str, str]) -> None:
    """Remove run cgroups left by graders that were killed before cleaning up (their programs
    died with them; an empty cgroup directory is all that is left)."""
    for parent in parents.values():
        with contextlib.suppress(OSError):
            for name in os.listdir(parent):
                parts = name.split("-")
                ours = name.startswith("vhack-sbx-") and len(parts) == 4 and parts[2].isdigit()
                if ours and not os.path.exists(f"/proc/{parts[2]}"):
                    with contextlib.suppress(OSError):
                        os.rmdir(os.path.join(parent, name))


class RunCgroup:
    """One run's cgroups (one directory per controller), limits written at creation.

    memory_bytes: memory.limit_in_bytes (and memsw, when swap accounting exists). pids:
    pids.max. cpus: CPU bandwidth in cores (cfs quota over a 100 ms period).
    """

    def __init__(self, sup: CgroupSupport, *, memory_bytes: int, pids: int, cpus: float) -> None:
        name = f"vhack-sbx-{os.getpid()}-{next(_counter)}"
        self.dirs = {c: os.path.join(sup.parents[c], name) for c in CONTROLLERS}
        settings = {
            "memory": [("memory.limit_in_bytes", memory_bytes)],
            "pids": [("pids.max", pids)],
            "cpu": [
                ("cpu.cfs_period_us", CPU_PERIOD_US),
                ("cpu.cfs_quota_us", max(1000, int(cpus * CPU_PERIOD_US))),
            ],
        }
        if os.path.exists(os.path.join(sup.parents["memory"], "memory.memsw.limit_in_bytes")):
            settings["memory"].append(("memory.memsw.limit_in_bytes", memory_bytes))
        try:
            for c, d in self.dirs.items():
                os.mkdir(d, 0o700)
                for key, value in settings[c]:
                    with open(os.path.join(d, key), "w") as f:
                        f.write(str(value))
        except OSError:
            self.remove()
            raise

    def oom_killed(self) -> bool:
        """Whether the kernel's OOM killer killed a process of this cgroup."""
        if "memory" not in self.dirs:
            return False
        path = os.path.join(self.dirs["memory"], "memory.oom_control")
        with contextlib.suppress(OSError, ValueError), open(path) as f:
            for line in f:
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value) > 0
        return False

    def kill_all(self) -> None:
        """SIGKILL every process still in the run's cgroups."""
        for d in self.dirs.values():
            with contextlib.suppress(OSError):
                with open(os.path.join(d, "cgroup.procs")) as f:
                    pids = [int(p) for p in f.read().split()]
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)

    def remove(self, timeout_s: float = 2.0) -> None:
        """Kill what is left and remove the directories (retrying while processes exit)."""
        deadline = time.monotonic() + timeout_s
        for d in self.dirs.values():
            while os.path.isdir(d):
                try:
                    os.rmdir(d)
                except OSError:
                    if time.monotonic() > deadline:
                        break
                    self.kill_all()
                    time.sleep(0.005)
