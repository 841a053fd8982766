"""Per-program resource limits with cgroups (v2, or v1 controllers): memory, processes and CPU.

rlimits count per process (RLIMIT_AS, RLIMIT_CPU) or per uid (RLIMIT_NPROC); a program that forks
multiplies them. A cgroup counts the program and every process it starts together: memory
(including tmpfs and shared memory pages), processes and threads (pids.max) and CPU bandwidth
(cpu.max on v2, cpu.cfs_quota_us on v1). Each run gets its own cgroup, nested under the grader's
own cgroup (so it also stays inside whatever limits the grader itself runs under), created before
the run and removed after it.

Which hierarchy (`support()`, as root only): cgroup v2 when the grader's v2 cgroup offers memory,
pids and cpu (its `cgroup.controllers`); else cgroup v1 when each of them has a v1 hierarchy (one
run directory per controller); else none: `support()` says what is missing where, and runs fall
back to per-process rlimits.

cgroup v2 moves the grader. v2 lets a cgroup enable controllers for its children
(`cgroup.subtree_control`) only while it holds no processes. When the grader's cgroup P refuses
(EBUSY) and the grader is P's only process, the first `support()` call moves THIS PROCESS (all its
threads) into a new leaf P/vhack-grader-<pid>, then enables memory, pids and cpu on P (what nsjail
does); processes the grader starts later start in that leaf, and graders it starts use P too. If P
holds other processes, nothing is moved and `support()` reports "none" with what to do: run the
grader in a cgroup of its own (`systemd-run --scope -p Delegate=yes ...`).

Tested: v1 for real (limits enforced, tests/test_sandbox_hardening.py); v2 on a simulated
cgroupfs (tests/test_sandbox_cgroups.py) and, for joining a run cgroup, cgroup.kill and removal,
on a real v2 hierarchy; v2's limits have not yet run on a kernel whose v2 offers the controllers.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import itertools
import os
import signal
import time
from dataclasses import dataclass

__all__ = ["CONTROLLERS", "CgroupSupport", "RunCgroup", "detect", "support"]

CONTROLLERS = ("memory", "pids", "cpu")
V2 = "unified"  # the key of the one directory in a v2 run's `dirs` (and in v2 `parents`)
CPU_PERIOD_US = 100_000
PROC_SELF = "/proc/self"
RUN_PREFIX = "vhack-sbx-"  # run cgroups: vhack-sbx-<grader pid>-<n>
GRADER_PREFIX = "vhack-grader-"  # v2 leaf a grader moved itself into: vhack-grader-<pid>
SYSTEMD_HINT = "e.g. `systemd-run --scope -p Delegate=yes <grader command>`"
_counter = itertools.count()


@dataclass(frozen=True)
class CgroupSupport:
    """version: "v2" or "v1" when every controller of CONTROLLERS is usable there, else "none".
    parents: where the runs' cgroups are made: v1, controller -> directory; v2, {"unified":
    directory}. note: what is used, or why nothing is, for humans."""

    version: str
    parents: dict[str, str]
    note: str


# cgroupfs access, one place (tests swap these for a simulated kernel)
def _mkdir(path: str) -> None:
    os.mkdir(path, 0o700)


def _rmdir(path: str) -> None:
    os.rmdir(path)


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _mountinfo(proc_self: str) -> list[tuple[list[str], list[str]]]:
    """(fields before " - ", fields after it) of each line of mountinfo: [4] of the first is
    the mount point, [3] the mount's root; the second starts with the filesystem type."""
    with open(os.path.join(proc_self, "mountinfo")) as f:
        return [
            (left.split(), right.split()) for left, _, right in (ln.partition(" - ") for ln in f)
        ]


def _cgroup_lines(proc_self: str) -> list[tuple[str, str, str]]:
    """(hierarchy id, controllers, path) of each line of /proc/self/cgroup."""
    with open(os.path.join(proc_self, "cgroup")) as f:
        return [tuple(line.rstrip("\n").split(":", 2)) for line in f]


def _v1_mounts(proc_self: str = PROC_SELF) -> dict[str, str]:
    """controller -> mount point of its cgroup v1 hierarchy (from mountinfo)."""
    mounts: dict[str, str] = {}
    for fields, super_fields in _mountinfo(proc_self):
        if len(super_fields) < 3 or super_fields[0] != "cgroup":
            continue
        for opt in super_fields[2].split(","):
            if opt in CONTROLLERS:
                mounts.setdefault(opt, fields[4])
    return mounts


def _own_paths(proc_self: str = PROC_SELF) -> dict[str, str]:
    """controller -> this process's cgroup path in that v1 hierarchy (from /proc/self/cgroup)."""
    paths: dict[str, str] = {}
    for _, controllers, path in _cgroup_lines(proc_self):
        for c in controllers.split(","):
            if c in CONTROLLERS:
                paths[c] = path
    return paths


def _v2_mount(proc_self: str = PROC_SELF) -> tuple[str, str] | None:
    """(mount point, root of the mount inside the hierarchy) of the first cgroup2 mount."""
    for fields, super_fields in _mountinfo(proc_self):
        if super_fields and super_fields[0] == "cgroup2" and len(fields) >= 5:
            return fields[4], fields[3]
    return None


def _own_v2_path(proc_self: str = PROC_SELF) -> str | None:
    """This process's cgroup v2 path: the "0::/path" line of /proc/self/cgroup."""
    for hierarchy, controllers, path in _cgroup_lines(proc_self):
        if hierarchy == "0" and controllers == "":
            return path
    return None


def _is_grader_leaf(name: str) -> bool:
    parts = name.split("-")
    return name.startswith(GRADER_PREFIX) and len(parts) == 3 and parts[2].isdigit()


def _v2_parent(proc_self: str) -> tuple[str, list[str]] | None:
    """(P, the controllers P can enable for its children) on cgroup v2, or None without v2. P is
    the grader's v2 cgroup, or the parent of the vhack-grader-<pid> leaf it (or the grader that
    started it) was moved into."""
    mount, own = _v2_mount(proc_self), _own_v2_path(proc_self)
    if mount is None or own is None:
        return None
    point, root = mount
    if root != "/" and (own == root or own.startswith(root + "/")):
        own = own[len(root) :]
    parent = os.path.normpath(os.path.join(point, own.lstrip("/")))
    if _is_grader_leaf(os.path.basename(parent)):
        parent = os.path.dirname(parent)
    try:
        offered = _read(os.path.join(parent, "cgroup.controllers")).split()
    except OSError:
        offered = []
    return parent, offered


@functools.lru_cache(maxsize=1)
def support() -> CgroupSupport:
    """Whether this process can give each run its own cgroup (cached; tries once for real).
    On cgroup v2 the first call may move this process into a leaf cgroup (module docstring)."""
    if os.geteuid() != 0:
        return CgroupSupport("none", {}, "cgroups: not root (no delegated cgroup is used)")
    return detect()


def detect(proc_self: str = PROC_SELF) -> CgroupSupport:
    """`support()` without the root check and the cache. proc_self: the /proc/self directory
    whose mountinfo and cgroup files say where the hierarchies are and where this process is."""
    try:
        v2 = _v2_parent(proc_self)
        v1_mounts, v1_own = _v1_mounts(proc_self), _own_paths(proc_self)
    except OSError as e:
        return CgroupSupport("none", {}, f"cgroups: cannot read /proc: {e}")
    if v2 is not None and all(c in v2[1] for c in CONTROLLERS):
        return _support_v2(v2[0])
    missing = [c for c in CONTROLLERS if c not in v1_mounts or c not in v1_own]
    if not missing:
        return _support_v1(v1_mounts, v1_own)
    if v2 is None:
        on_v2 = "no cgroup v2 hierarchy"
    else:
        lacks = ", ".join(c for c in CONTROLLERS if c not in v2[1])
        on_v2 = f"cgroup v2 at {v2[0]} offers {' '.join(v2[1]) or 'no controllers'} (no {lacks})"
    why = f"{on_v2}; no cgroup v1 {'/'.join(missing)} hierarchy"
    return CgroupSupport("none", {}, f"cgroups: no hierarchy with memory, pids and cpu: {why}")


def _support_v1(mounts: dict[str, str], own: dict[str, str]) -> CgroupSupport:
    parents = {c: os.path.join(mounts[c], own[c].lstrip("/")) for c in CONTROLLERS}
    _remove_stale(parents)
    return _tried(CgroupSupport("v1", parents, "cgroups: v1 memory, pids, cpu per program"))


def _support_v2(parent: str) -> CgroupSupport:
    parents = {V2: parent}
    _remove_stale(parents)
    try:
        refusal = _enable_v2_controllers(parent)
    except OSError as e:
        return CgroupSupport(
            "none",
            {},
            f"cgroups: cannot enable memory, pids, cpu for the children of {parent}: {e}",
        )
    if refusal:
        return CgroupSupport("none", {}, refusal)
    return _tried(CgroupSupport("v2", parents, "cgroups: v2 memory, pids, cpu per program"))


def _tried(sup: CgroupSupport) -> CgroupSupport:
    """`sup` once a run cgroup was really made and removed under its parents, else "none"."""
    try:
        RunCgroup(sup, memory_bytes=64 << 20, pids=8, cpus=1).remove()
    except OSError as e:
        where = ", ".join(sorted(set(sup.parents.values())))
        return CgroupSupport("none", {}, f"cgroups: {sup.version} {where} not writable: {e}")
    return sup


def _enable_v2_controllers(parent: str) -> str | None:
    """Enable CONTROLLERS for the children of `parent` (cgroup.subtree_control); None when done,
    else why not (a note for humans). Moves this process into parent/vhack-grader-<pid> when it
    is the only process in `parent` (v2 enables controllers only in cgroups without processes)."""
    control = os.path.join(parent, "cgroup.subtree_control")
    if set(CONTROLLERS) <= set(_read(control).split()):
        return None
    request = " ".join("+" + c for c in CONTROLLERS)
    try:
        _write(control, request)
        return None
    except OSError as e:
        if e.errno != errno.EBUSY:
            raise
    me = os.getpid()
    others = [int(p) for p in _read(os.path.join(parent, "cgroup.procs")).split() if int(p) != me]
    if others:
        shown = " ".join(map(str, others[:5])) + (" ..." if len(others) > 5 else "")
        return (
            f"cgroups: the grader's cgroup v2 {parent} holds other processes too (pids {shown}), "
            "and v2 enables memory, pids, cpu for child cgroups only in a cgroup without "
            f"processes; run the grader in a cgroup of its own, {SYSTEMD_HINT}"
        )
    leaf = os.path.join(parent, f"{GRADER_PREFIX}{me}")
    with contextlib.suppress(FileExistsError):  # a dead grader's, with our pid: empty, reuse it
        _mkdir(leaf)
    _write(os.path.join(leaf, "cgroup.procs"), str(me))
    try:
        _write(control, request)
    except OSError:
        with contextlib.suppress(OSError):  # undo: back where this process was
            _write(os.path.join(parent, "cgroup.procs"), str(me))
            _rmdir(leaf)
        raise
    return None


def _remove_stale(parents: dict[str, str]) -> None:
    """Remove run cgroups (and v2 grader leaves) left by graders that were killed before
    cleaning up. Their programs die with them, but may still be exiting: a run cgroup is removed
    like any run's (`RunCgroup.remove`: kill what is left, retry for up to 1 s). A grader leaf
    that still holds processes (started by that grader, not ours to kill) is kept."""
    version = "v2" if V2 in parents else "v1"
    for parent in parents.values():
        with contextlib.suppress(OSError):
            for name in os.listdir(parent):
                parts = name.split("-")
                run = name.startswith(RUN_PREFIX) and len(parts) == 4 and parts[2].isdigit()
                if not (run or _is_grader_leaf(name)) or os.path.exists(f"/proc/{parts[2]}"):
                    continue
                path = os.path.join(parent, name)
                if run:
                    RunCgroup.attach(version, {name: path}).remove(timeout_s=1.0)
                else:
                    with contextlib.suppress(OSError):
                        _rmdir(path)


class RunCgroup:
    """One run's cgroups, limits written at creation: one directory on v2, one per controller
    on v1 (`dirs`: "unified" or controller -> directory).

    memory_bytes: memory.max (v2; memory.swap.max = 0 where swap is accounted, so swap cannot
    stretch the limit) or memory.limit_in_bytes (v1; and memsw, when swap accounting exists).
    pids: pids.max. cpus: CPU bandwidth in cores (a quota over a 100 ms period, at least 1 ms).
    """

    def __init__(self, sup: CgroupSupport, *, memory_bytes: int, pids: int, cpus: float) -> None:
        if sup.version not in ("v1", "v2"):
            raise ValueError(f"no cgroups to use here ({sup.note or sup.version})")
        name = f"{RUN_PREFIX}{os.getpid()}-{next(_counter)}"
        self.version = sup.version
        if sup.version == "v2":
            self.dirs = {V2: os.path.join(sup.parents[V2], name)}
        else:
            self.dirs = {c: os.path.join(sup.parents[c], name) for c in CONTROLLERS}
        quota_us = max(1000, int(cpus * CPU_PERIOD_US))
        try:
            if sup.version == "v2":
                self._create_v2(memory_bytes, pids, quota_us)
            else:
                self._create_v1(sup, memory_bytes, pids, quota_us)
        except OSError:
            self.remove()
            raise

    @classmethod
    def attach(cls, version: str, dirs: dict[str, str]) -> RunCgroup:
        """A handle on run cgroups that exist already (nothing created, no limits written)."""
        self = cls.__new__(cls)
        self.version, self.dirs = version, dict(dirs)
        return self

    def _create_v2(self, memory_bytes: int, pids: int, quota_us: int) -> None:
        d = self.dirs[V2]
        _mkdir(d)
        settings = [("memory.max", memory_bytes)]
        if os.path.exists(os.path.join(d, "memory.swap.max")):
            settings.append(("memory.swap.max", 0))
        settings += [("pids.max", pids), ("cpu.max", f"{quota_us} {CPU_PERIOD_US}")]
        for key, value in settings:
            _write(os.path.join(d, key), str(value))

    def _create_v1(self, sup: CgroupSupport, memory_bytes: int, pids: int, quota_us: int) -> None:
        settings = {
            "memory": [("memory.limit_in_bytes", memory_bytes)],
            "pids": [("pids.max", pids)],
            "cpu": [("cpu.cfs_period_us", CPU_PERIOD_US), ("cpu.cfs_quota_us", quota_us)],
        }
        if os.path.exists(os.path.join(sup.parents["memory"], "memory.memsw.limit_in_bytes")):
            settings["memory"].append(("memory.memsw.limit_in_bytes", memory_bytes))
        for c, d in self.dirs.items():
            _mkdir(d)
            for key, value in settings[c]:
                _write(os.path.join(d, key), str(value))

    def oom_killed(self) -> bool:
        """Whether the kernel's OOM killer killed a process of this cgroup (the "oom_kill N"
        line of memory.events on v2, of memory.oom_control on v1)."""
        if self.version == "v2":
            path = os.path.join(self.dirs[V2], "memory.events")
        elif "memory" in self.dirs:
            path = os.path.join(self.dirs["memory"], "memory.oom_control")
        else:
            return False
        with contextlib.suppress(OSError, ValueError), open(path) as f:
            for line in f:
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value) > 0
        return False

    def kill_all(self) -> None:
        """SIGKILL every process still in the run's cgroups: at once through cgroup.kill (v2,
        kernel >= 5.14), else pid by pid from cgroup.procs."""
        for d in self.dirs.values():
            kill = os.path.join(d, "cgroup.kill")
            if self.version == "v2" and os.path.exists(kill):
                try:
                    _write(kill, "1")
                    continue
                except OSError:
                    pass
            with contextlib.suppress(OSError):
                pids = [int(p) for p in _read(os.path.join(d, "cgroup.procs")).split()]
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)

    def remove(self, timeout_s: float = 2.0) -> None:
        """Kill what is left and remove the directories (retrying while processes exit)."""
        deadline = time.monotonic() + timeout_s
        for d in self.dirs.values():
            while os.path.isdir(d):
                try:
                    _rmdir(d)
                except OSError:
                    if time.monotonic() > deadline:
                        break
                    self.kill_all()
                    time.sleep(0.005)
