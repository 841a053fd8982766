"""Launch one Python program in a sandbox process and collect what it did (no policy here).

`launch` starts `_stage2.py` (optionally under `unshare`) in a new session, feeds stdin, reads
stdout/stderr up to byte caps, kills the whole process group at the wall-clock deadline or when a
cap is exceeded, and classifies the outcome into a `RunResult`. Which isolation to use is decided
by `vhack.sandbox.Sandbox` from the probe in `vhack.sandbox.probe`.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import selectors
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

__all__ = ["STATUSES", "Limits", "RunResult", "base_python", "launch"]

STAGE2 = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_stage2.py")
SETUP_FAILED = 121  # exit status of _stage2.py when it could not build the sandbox
EXIT_MARKER = "vhack-sandbox-killed-by-signal:"  # _stage2.py's last stderr line on a signal death

STATUSES = (
    "ok",  # exited with status 0
    "error",  # exited with a nonzero status (an uncaught exception, sys.exit(1), ...)
    "timeout",  # still running at the wall-clock deadline: the process group was killed
    "cpu_limit",  # killed by RLIMIT_CPU (SIGXCPU / SIGKILL after the CPU-seconds limit)
    "memory",  # ran out of its address-space limit (MemoryError or killed while allocating)
    "output_limit",  # wrote more than the stdout/stderr byte cap: killed
    "crash",  # killed by another signal (segfault, abort)
    "sandbox_error",  # the sandbox could not be built; the program never ran
)


@dataclass(frozen=True)
class Limits:
    """Resource limits of one run.

    wall_s: wall-clock seconds before the process group is killed. cpu_s: RLIMIT_CPU seconds per
    process. memory_mb: RLIMIT_AS in MiB (address space, per process). fsize_mb: largest file the
    program may write (RLIMIT_FSIZE, MiB). tmpfs_mb: size of each private writable tmpfs (/work,
    /tmp) in the namespace sandbox. nofile: RLIMIT_NOFILE. nproc: RLIMIT_NPROC (processes and
    threads; per sandbox uid). stdout_bytes / stderr_bytes: output kept; writing more kills the run.
    """

    wall_s: float = 5.0
    cpu_s: int = 4
    memory_mb: int = 512
    fsize_mb: int = 8
    tmpfs_mb: int = 16
    nofile: int = 64
    nproc: int = 32
    stdout_bytes: int = 256_000
    stderr_bytes: int = 32_000

    def __post_init__(self) -> None:
        for name in ("wall_s", "cpu_s", "memory_mb", "fsize_mb", "tmpfs_mb", "nofile", "nproc"):
            if not getattr(self, name) > 0:
                raise ValueError(f"Limits.{name} must be > 0, got {getattr(self, name)!r}")
        if self.memory_mb < 64:
            raise ValueError(
                f"Limits.memory_mb={self.memory_mb} is too small for Python; use >= 64"
            )

    def rlimits(self) -> dict[str, tuple[int, int]]:
        """The rlimits `_stage2.py` sets before exec, by resource-module name."""
        mib = 1 << 20
        return {
            "RLIMIT_AS": (self.memory_mb * mib, self.memory_mb * mib),
            "RLIMIT_CPU": (int(self.cpu_s), int(self.cpu_s) + 1),
            "RLIMIT_FSIZE": (self.fsize_mb * mib, self.fsize_mb * mib),
            "RLIMIT_NOFILE": (self.nofile, self.nofile),
            "RLIMIT_NPROC": (self.nproc, self.nproc),
            "RLIMIT_CORE": (0, 0),
        }


@dataclass(frozen=True)
class RunResult:
    """What one sandboxed run did.

    status: one of STATUSES. exit_code: the process's exit status (negative: killed by that
    signal; None when we killed it). stdout / stderr: decoded UTF-8 (invalid bytes replaced),
    at most the Limits' byte caps. wall_s: seconds from start to reap. reason: one line for
    humans ("exited with status 1: ZeroDivisionError: ...", "timeout after 2.0 s").
    """

    status: str
    exit_code: int | None
    stdout: str
    stderr: str
    wall_s: float
    reason: str

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def base_python() -> str:
    """The real interpreter binary (not a venv's symlink): the sandbox needs no site-packages."""
    exe = getattr(sys, "_base_executable", None) or sys.executable
    return os.path.realpath(exe)


def _system_binds(python: str) -> list[str]:
    """Host paths shown read-only inside the namespace sandbox: system dirs and the interpreter."""
    binds = ["/usr", "/lib", "/lib64", "/lib32", "/libx32", "/bin", "/sbin", "/etc/ld.so.cache"]
    extra = [
        os.path.realpath(sys.base_prefix),
        os.path.realpath(sysconfig.get_paths()["stdlib"]),
        os.path.dirname(python),
    ]
    for path in extra:
        covered = any(path == b or path.startswith(b.rstrip("/") + "/") for b in binds)
        if not covered and os.path.exists(path):
            binds.append(path)
    return [b for b in binds if os.path.lexists(b)]


def _last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1][:200] if lines else ""


def _classify(rc: int | None, killed: str | None, stderr: str, limits: Limits) -> tuple[str, str]:
    if killed == "timeout":
        return "timeout", f"timeout: still running after {limits.wall_s:g} s wall clock"
    if killed == "output":
        return "output_limit", (
            f"output limit: wrote more than {limits.stdout_bytes} stdout / "
            f"{limits.stderr_bytes} stderr bytes"
        )
    assert rc is not None
    if rc == SETUP_FAILED and "vhack-sandbox-setup:" in stderr:
        return "sandbox_error", _last_line(stderr)
    if rc < 0:
        sig = -rc
        if sig == signal.SIGXCPU:
            return "cpu_limit", f"cpu limit: killed by SIGXCPU after {limits.cpu_s} s of CPU"
        name = signal.Signals(sig).name if sig in signal.valid_signals() else str(sig)
        return "crash", f"killed by signal {name}"
    if rc == 0:
        return "ok", "exited with status 0"
    if "MemoryError" in stderr or "Cannot allocate memory" in stderr:
        return "memory", f"memory limit ({limits.memory_mb} MiB): {_last_line(stderr)}"
    return "error", f"exited with status {rc}: {_last_line(stderr)}"


def launch(
    program: str,
    *,
    mode: str,
    stdin: bytes = b"",
    files: Mapping[str, str] | None = None,
    limits: Limits | None = None,
    uid: int | None = None,
    hide: Sequence[str] = (),
    unshare: str | None = None,
    seccomp: bool = False,
) -> RunResult:
    """Run `program` (Python source, saved as main.py in a fresh working directory) once.

    mode: "namespaces" (mount/pid/net/ipc/uts namespaces, a minimal read-only root; plus a user
    namespace when not root) or "process" (a plain child process with rlimits). uid: when running
    as root, the unprivileged uid (and gid) the program runs as; ignored otherwise. files: extra
    files written next to main.py. hide: host paths masked inside the namespace sandbox.
    seccomp: install a seccomp filter denying namespace, mount, ptrace, bpf, keyring, module and
    similar syscalls (x86_64 only; ValueError elsewhere).
    """
    if seccomp and platform.machine() != "x86_64":
        raise ValueError("the seccomp filter is written for x86_64 only")
    limits = limits or Limits()
    files = dict(files or {})
    if "main.py" in files:
        raise ValueError("files may not contain main.py; it holds the program")
    for name in files:
        if "/" in name or name in ("", ".", ".."):
            raise ValueError(f"file names must be plain names in the working dir, got {name!r}")
    files["main.py"] = program
    is_root = os.geteuid() == 0
    if is_root and uid is None:
        raise ValueError("running as root: pass the unprivileged uid the program runs as")
    python = base_python()
    job = {
        "mode": mode,
        "drop": "setuid" if is_root else ("caps" if mode == "namespaces" else "none"),
        "uid": uid if is_root else os.getuid(),
        "gid": uid if is_root else os.getgid(),
        "python": python,
        "binds": _system_binds(python) if mode == "namespaces" else [],
        "hide": [os.path.realpath(h) for h in hide],
        "files": files,
        "argv": [python, "-I", "-S", "main.py"],
        "env": {
            "PATH": "/usr/bin:/bin",
            "HOME": "/work" if mode == "namespaces" else ".",
            "LANG": "C.UTF-8",
            "PYTHONHASHSEED": "0",
        },
        "rlimits": limits.rlimits(),
        "tmpfs_mb": limits.tmpfs_mb,
        "seccomp": bool(seccomp),
    }
    jobdir = tempfile.mkdtemp(prefix="vhack-sbx-")
    try:
        job_path = os.path.join(jobdir, "job.json")
        with open(job_path, "w") as f:
            json.dump(job, f)
        cmd = [python, "-I", "-S", STAGE2, job_path]
        if mode == "namespaces":
            ns = ["--mount", "--net", "--pid", "--ipc", "--uts", "--fork", "--kill-child"]
            if not is_root:
                ns = ["--user", "--map-root-user", *ns]
            cmd = [unshare or shutil.which("unshare") or "/usr/bin/unshare", *ns, *cmd]
        elif mode != "process":
            raise ValueError(f"mode must be 'namespaces' or 'process', got {mode!r}")
        return _run(
            cmd, stdin, limits, cleanup_uid=uid if (is_root and mode == "process") else None
        )
    finally:
        shutil.rmtree(jobdir, ignore_errors=True)


def _kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def _kill_uid(uid: int) -> None:
    """Kill every process left running as `uid` (process mode as root: escapees of the group)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as f:
                for line in f:
                    if line.startswith("Uid:"):
                        if int(line.split()[1]) == uid:
                            os.kill(int(entry), signal.SIGKILL)
                        break
        except (OSError, ValueError):
            continue


def _run(cmd: list[str], stdin: bytes, limits: Limits, cleanup_uid: int | None) -> RunResult:
    t0 = time.monotonic()
    deadline = t0 + limits.wall_s
    proc = subprocess.Popen(
        cmd,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        close_fds=True,
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"},
        cwd="/",
    )
    caps = {proc.stdout: limits.stdout_bytes, proc.stderr: limits.stderr_bytes}
    out: dict = {proc.stdout: bytearray(), proc.stderr: bytearray()}
    killed = None
    sel = selectors.DefaultSelector()
    for pipe in (proc.stdout, proc.stderr):
        os.set_blocking(pipe.fileno(), False)
        sel.register(pipe, selectors.EVENT_READ)
    pending = memoryview(stdin)
    if pending:
        os.set_blocking(proc.stdin.fileno(), False)
        sel.register(proc.stdin, selectors.EVENT_WRITE)
    else:
        proc.stdin.close()
    try:
        while sel.get_map():
            left = deadline - time.monotonic()
            if left <= 0:
                killed = "timeout"
                break
            for key, _ in sel.select(timeout=min(left, 0.5)):
                pipe = key.fileobj
                if pipe is proc.stdin:
                    try:
                        n = os.write(pipe.fileno(), pending[:65536])
                        pending = pending[n:]
                    except (BrokenPipeError, BlockingIOError) as e:
                        if isinstance(e, BlockingIOError):
                            continue
                        pending = pending[:0]
                    if not pending:
                        sel.unregister(pipe)
                        pipe.close()
                    continue
                chunk = os.read(pipe.fileno(), 65536)
                if not chunk:
                    sel.unregister(pipe)
                    continue
                out[pipe] += chunk
                if len(out[pipe]) > caps[pipe]:
                    killed = "output"
                    break
            if killed:
                break
        if killed:
            _kill_group(proc)
            rc = None
            proc.wait()
        else:
            try:
                rc = proc.wait(timeout=max(deadline - time.monotonic(), 0.05))
            except subprocess.TimeoutExpired:
                killed = "timeout"
                _kill_group(proc)
                proc.wait()
                rc = None
            _kill_group(proc)  # anything the program left behind in its group
    finally:
        sel.close()
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            if pipe and not pipe.closed:
                pipe.close()
        if proc.poll() is None:
            _kill_group(proc)
            proc.wait()
        if cleanup_uid is not None:
            _kill_uid(cleanup_uid)
    wall = time.monotonic() - t0
    stdout = bytes(out[proc.stdout][: limits.stdout_bytes]).decode("utf-8", "replace")
    stderr = bytes(out[proc.stderr][: limits.stderr_bytes]).decode("utf-8", "replace")
    if rc is not None and rc > 128:
        head, sep, tail = stderr.rstrip("\n").rpartition("\n")
        if tail.startswith(EXIT_MARKER) and tail.split()[-1] == str(rc - 128):
            rc, stderr = -(rc - 128), head + sep
    status, reason = _classify(rc, killed, stderr, limits)
    return RunResult(status, rc, stdout, stderr, wall, reason)
