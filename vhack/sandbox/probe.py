"""Probe which isolation this machine gives a sandboxed program, by running one and asking it.

Nothing is assumed from the platform: a small program is launched in each mode and reports its own
view (pid, uid, capabilities, network interfaces, visible host paths, environment, rlimits); a
mode counts only if every check of it passes.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import shutil
from dataclasses import asdict, dataclass, field

from vhack.sandbox.launch import Limits, base_python, launch

__all__ = ["LEVELS", "IsolationReport", "probe"]

# weakest to strongest; a Sandbox refuses to run when the probe found less than it requires
LEVELS = ("none", "process", "namespaces")

PROBE_UID = 1_989_999_999  # uid the probe program runs as when the probe runs as root

_PROBE_PROGRAM = r"""
import json, os, resource, socket, sys
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
try:
    facts["interfaces"] = [name for _, name in socket.if_nameindex()]
except OSError as e:
    facts["interfaces"] = [str(e)]
try:
    # loopback only (this workplace never sends traffic elsewhere): in a fresh network namespace
    # even 127.0.0.1 is unreachable (lo is down); on the host it is refused or connects
    socket.create_connection(("127.0.0.1", 9), timeout=0.5).close()
    facts["connect"] = "connected"
except OSError as e:
    facts["connect"] = type(e).__name__ + ": " + str(e)
facts["host_path_visible"] = os.path.exists(sys.argv[-1]) if len(sys.argv) > 1 else None
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
    every check run ("namespaces.no_network", "process.rlimits", ...). notes: why a mode failed,
    one line each. is_root: probed as uid 0 (programs then run as an unprivileged uid).
    seccomp_available: the kernel offers seccomp filters. seccomp: namespace-sandboxed programs
    run under this package's seccomp filter (x86_64 only; see `_stage2.py`).
    """

    level: str
    checks: dict[str, bool] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    is_root: bool = False
    unshare: str | None = None
    python: str = ""
    kernel: str = ""
    seccomp_available: bool = False
    seccomp: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


def _seccomp_available() -> bool:
    try:
        with open("/proc/self/status") as f:
            return any(line.startswith("Seccomp:") for line in f)
    except OSError:
        return False


def _run_mode(mode: str, unshare: str | None, secret_paths: list[str], seccomp: bool):
    limits = Limits(wall_s=10.0, cpu_s=5, memory_mb=256, nproc=16)
    return launch(
        _PROBE_PROGRAM,
        mode=mode,
        stdin=json.dumps(secret_paths).encode(),
        limits=limits,
        uid=PROBE_UID,
        hide=secret_paths,
        unshare=unshare,
        seccomp=seccomp,
    )


def _check(mode: str, facts: dict, is_root: bool, limits: Limits, seccomp: bool) -> dict[str, bool]:
    checks = {
        f"{mode}.rlimits": facts["rlimit_as"] == limits.memory_mb << 20
        and facts["rlimit_nproc"] == limits.nproc,
        f"{mode}.clean_env": set(facts["env"]) <= {"PATH", "HOME", "LANG", "PYTHONHASHSEED"},
        f"{mode}.no_new_privs": facts.get("NoNewPrivs") == "1",
    }
    if is_root:
        checks[f"{mode}.unprivileged_uid"] = facts["uid"] != 0 and facts["euid"] != 0
    if mode == "namespaces":
        # pid 1 is the sandbox's init (_stage2.py), the program its only child
        checks["namespaces.pid_namespace"] = facts["pid"] == 2 and 0 < facts["processes"] <= 2
        checks["namespaces.no_network"] = "unreachable" in facts["connect"] and set(
            facts["interfaces"]
        ) <= {"lo"}
        checks["namespaces.no_capabilities"] = int(facts.get("CapEff", "1"), 16) == 0
        checks["namespaces.host_files_hidden"] = not any(facts["visible"].values())
        checks["namespaces.read_only_system"] = not facts["usr_writable"]
        if seccomp:
            checks["namespaces.seccomp_filter"] = facts.get("Seccomp") == "2"
    return checks


@functools.lru_cache(maxsize=1)
def _probe_cached() -> IsolationReport:
    is_root = os.geteuid() == 0
    unshare = shutil.which("unshare") or (
        "/usr/bin/unshare" if os.path.exists("/usr/bin/unshare") else None
    )
    import vhack

    secret_paths = [os.path.dirname(os.path.realpath(vhack.__file__)), os.getcwd()]
    if os.path.realpath(os.getcwd()) == "/":
        secret_paths.pop()
    checks: dict[str, bool] = {}
    notes: list[str] = []
    level = "none"
    limits = Limits(wall_s=10.0, cpu_s=5, memory_mb=256, nproc=16)
    seccomp = _seccomp_available() and platform.machine() == "x86_64"
    for mode in ("process", "namespaces"):
        if mode == "namespaces" and unshare is None:
            notes.append("namespaces: util-linux `unshare` is not on PATH")
            checks["namespaces.started"] = False
            continue
        result = _run_mode(mode, unshare, secret_paths, seccomp and mode == "namespaces")
        checks[f"{mode}.started"] = result.ok
        if not result.ok:
            notes.append(f"{mode}: the probe program did not run: {result.reason}")
            continue
        try:
            facts = json.loads(result.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            notes.append(f"{mode}: unreadable probe output {result.stdout[:200]!r}")
            continue
        mode_checks = _check(mode, facts, is_root, limits, seccomp and mode == "namespaces")
        checks.update(mode_checks)
        failed = [name for name, passed in mode_checks.items() if not passed]
        if failed:
            notes.append(f"{mode}: failed checks {', '.join(failed)}")
        else:
            level = mode
    return IsolationReport(
        level=level,
        checks=checks,
        notes=notes,
        is_root=is_root,
        unshare=unshare,
        python=base_python(),
        kernel=platform.release(),
        seccomp_available=_seccomp_available(),
        seccomp=seccomp and level == "namespaces",
    )


def probe(refresh: bool = False) -> IsolationReport:
    """The isolation this machine offers (cached for the process; refresh=True probes again).
    Takes about a second: it launches one probe program per mode."""
    if refresh:
        _probe_cached.cache_clear()
    return _probe_cached()
