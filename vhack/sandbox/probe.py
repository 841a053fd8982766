"""Probe which isolation this machine gives a sandboxed program, by running one and asking it.

Nothing is assumed from the platform: a small program is launched in each mode and reports its own
view (pid, uid, capabilities, namespaces, sockets it may open, System V IPC and memfd, /dev/null,
visible host paths, environment, rlimits, cgroup); a mode counts only if every check of it passes.
The namespace level requires the seccomp filter (x86_64, aarch64): without it the sandbox refuses.
"""

from __future__ import annotations

import functools
import json
import os
import platform
from dataclasses import asdict, dataclass, field

from vhack.sandbox import cgroups
from vhack.sandbox.launch import SECCOMP_ARCHES, Limits, _system_binds, base_python, launch
from vhack.sandbox.uids import lease_uid

__all__ = ["LEVELS", "IsolationReport", "probe"]

# weakest to strongest; a Sandbox refuses to run when the probe found less than it requires
LEVELS = ("none", "process", "namespaces")

_PROBE_PROGRAM = r"""
import ctypes, errno, json, os, resource, socket, sys
facts = {"pid": os.getpid(), "uid": os.getuid(), "euid": os.geteuid(), "env": sorted(os.environ)}
try:
    facts["processes"] = sum(name.isdigit() for name in os.listdir("/proc"))
except OSError:
    facts["processes"] = -1
status = open("/proc/self/status").read()
for line in status.splitlines():
    key, _, value = line.partition(":")
    if key in ("CapEff", "CapBnd", "NoNewPrivs", "Seccomp"):
        facts[key] = value.strip()
facts["netns"] = os.readlink("/proc/self/ns/net")
facts["sockets"] = {}
for name in ("AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK", "AF_PACKET", "AF_VSOCK"):
    try:
        socket.socket(getattr(socket, name), socket.SOCK_DGRAM if name != "AF_PACKET" else socket.SOCK_RAW).close()
        facts["sockets"][name] = "created"
    except OSError as e:
        facts["sockets"][name] = errno.errorcode.get(e.errno, str(e.errno))
libc = ctypes.CDLL(None, use_errno=True)
shm = libc.shmget(0, 4096, 0o1600)
facts["shmget"] = "created" if shm >= 0 else errno.errorcode.get(ctypes.get_errno(), "?")
try:
    os.close(os.memfd_create("probe"))
    facts["memfd"] = "created"
except OSError as e:
    facts["memfd"] = errno.errorcode.get(e.errno, str(e.errno))
try:
    with open("/dev/null", "w") as f:
        f.write("x")
    facts["dev_null"] = open("/dev/null").read() == ""
except OSError:
    facts["dev_null"] = False
facts["cgroup"] = open("/proc/self/cgroup").read()
facts["visible"] = {p: os.path.exists(p) for p in json.loads(sys.stdin.read())}
try:
    open("/usr/vhack-probe", "w").close()
    facts["usr_writable"] = True
except OSError:
    facts["usr_writable"] = False
facts["rlimit_as"] = resource.getrlimit(resource.RLIMIT_AS)[0]
facts["rlimit_nproc"] = resource.getrlimit(resource.RLIMIT_NPROC)[0]
print(json.dumps(facts))
"""


@dataclass(frozen=True)
class IsolationReport:
    """What the probe found.

    level: the strongest mode whose checks all passed (one of LEVELS). checks: name -> passed, for
    every check run ("namespaces.no_network", "process.rlimits", ...). notes: why a mode failed or
    what is weaker, one line each. is_root: probed as uid 0 (programs then run as unprivileged
    uids leased per run). arch: the machine. seccomp_available: the kernel offers seccomp
    filters. seccomp: namespace-sandboxed programs run under this package's seccomp filter
    (required by the "namespaces" level). cgroup: "v2" or "v1" when each program gets its own
    cgroup (memory, pids, CPU for all its processes together), else "none". limits: "per-program
    (cgroup v2)", "per-program (cgroup v1)" or "per-process (rlimits)": how memory, process and
    CPU limits are counted.
    """

    level: str
    checks: dict[str, bool] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    is_root: bool = False
    python: str = ""
    kernel: str = ""
    arch: str = ""
    seccomp_available: bool = False
    seccomp: bool = False
    cgroup: str = "none"
    limits: str = "per-process (rlimits)"

    def to_dict(self) -> dict:
        return asdict(self)


def _seccomp_available() -> bool:
    try:
        with open("/proc/self/status") as f:
            return any(line.startswith("Seccomp:") for line in f)
    except OSError:
        return False


PROBE_LIMITS = Limits(wall_s=10.0, cpu_s=5, memory_mb=256, nproc=16)


def _run_mode(mode: str, secret_paths: list[str], seccomp: bool, use_cgroups: bool):
    def run(uid):
        return launch(
            _PROBE_PROGRAM,
            mode=mode,
            stdin=json.dumps(secret_paths).encode(),
            limits=PROBE_LIMITS,
            uid=uid,
            hide=secret_paths,
            seccomp=seccomp,
            use_cgroups=use_cgroups,
        )

    if os.geteuid() == 0:
        with lease_uid() as uid:
            return run(uid)
    return run(None)


def _check(mode: str, facts: dict, is_root: bool, seccomp: bool, cgroup: bool) -> dict[str, bool]:
    limits = PROBE_LIMITS
    checks = {
        f"{mode}.rlimits": facts["rlimit_as"] == limits.memory_mb << 20
        and facts["rlimit_nproc"] == limits.nproc,
        f"{mode}.clean_env": set(facts["env"]) <= {"PATH", "HOME", "LANG", "PYTHONHASHSEED"},
        f"{mode}.no_new_privs": facts.get("NoNewPrivs") == "1",
    }
    if is_root:
        checks[f"{mode}.unprivileged_uid"] = facts["uid"] != 0 and facts["euid"] != 0
    if cgroup:
        checks[f"{mode}.cgroup"] = "vhack-sbx-" in facts["cgroup"]
    if mode == "namespaces":
        # pid 1 is the sandbox's supervisor (_stage2.py), the program its only child
        checks["namespaces.pid_namespace"] = facts["pid"] == 2 and 0 < facts["processes"] <= 2
        sockets = facts["sockets"]
        checks["namespaces.no_network"] = facts["netns"] != os.readlink("/proc/self/ns/net")
        checks["namespaces.no_capabilities"] = int(facts.get("CapEff", "1"), 16) == 0
        checks["namespaces.host_files_hidden"] = not any(facts["visible"].values())
        checks["namespaces.read_only_system"] = not facts["usr_writable"]
        checks["namespaces.dev_null"] = facts["dev_null"] is True
        checks["namespaces.seccomp_filter"] = seccomp and facts.get("Seccomp") == "2"
        checks["namespaces.sockets_unix_only"] = sockets.get("AF_UNIX") == "created" and all(
            v != "created" for k, v in sockets.items() if k != "AF_UNIX"
        )
        checks["namespaces.no_sysv_ipc_memfd"] = facts["shmget"] != "created" and (
            facts["memfd"] != "created"
        )
    return checks


@functools.lru_cache(maxsize=1)
def _probe_cached() -> IsolationReport:
    is_root = os.geteuid() == 0
    import vhack

    secret_paths = [os.path.dirname(os.path.realpath(vhack.__file__))]
    cwd = os.path.realpath(os.getcwd())
    sandbox_own = ("/", "/tmp", "/work", "/proc", "/dev")  # exist inside the sandbox too
    system = _system_binds(base_python())
    if cwd not in sandbox_own and not any(cwd == b or cwd.startswith(b + "/") for b in system):
        secret_paths.append(cwd)
    checks: dict[str, bool] = {}
    notes: list[str] = []
    level = "none"
    arch = platform.machine()
    seccomp = _seccomp_available() and arch in SECCOMP_ARCHES
    if not seccomp:
        notes.append(
            f"namespaces: no seccomp filter here (arch {arch}, have {', '.join(SECCOMP_ARCHES)}; "
            f"kernel seccomp: {_seccomp_available()}): the namespace sandbox refuses to run"
        )
    cg = cgroups.support()
    if cg.version == "none":
        notes.append(cg.note + "; memory, process and CPU limits are per process (rlimits)")
    for mode in ("process", "namespaces"):
        use_seccomp = seccomp and mode == "namespaces"
        result = _run_mode(mode, secret_paths, use_seccomp, cg.version != "none")
        checks[f"{mode}.started"] = result.ok
        if not result.ok:
            notes.append(f"{mode}: the probe program did not run: {result.reason}")
            continue
        try:
            facts = json.loads(result.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            notes.append(f"{mode}: unreadable probe output {result.stdout[:200]!r}")
            continue
        mode_checks = _check(mode, facts, is_root, use_seccomp, cg.version != "none")
        checks.update(mode_checks)
        failed = [name for name, passed in mode_checks.items() if not passed]
        if failed:
            notes.append(f"{mode}: failed checks {', '.join(failed)}")
        else:
            level = mode
    per_process = "per-process (rlimits)"
    return IsolationReport(
        level=level,
        checks=checks,
        notes=notes,
        is_root=is_root,
        python=base_python(),
        kernel=platform.release(),
        arch=arch,
        seccomp_available=_seccomp_available(),
        seccomp=seccomp and level == "namespaces",
        cgroup=cg.version,
        limits=f"per-program (cgroup {cg.version})" if cg.version != "none" else per_process,
    )


def probe(refresh: bool = False) -> IsolationReport:
    """The isolation this machine offers (cached for the process; refresh=True probes again).
    Takes about a second: it launches one probe program per mode."""
    if refresh:
        _probe_cached.cache_clear()
        cgroups.support.cache_clear()
    return _probe_cached()
