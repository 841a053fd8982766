"""Launch one Python program in a sandbox process and collect what it did (no policy here).

`launch` starts `_stage2.py` (the supervisor, see its docstring) in a new session, gives it the
job in a memfd, feeds stdin, reads stdout/stderr and the harness channel up to byte caps, kills
the whole process group at the wall-clock deadline or when a cap is exceeded, reads the program's
real exit status from the supervisor's result pipe, and classifies the outcome into a
`RunResult`. Which isolation to use is decided by `vhack.sandbox.Sandbox` from the probe in
`vhack.sandbox.probe`; per-program cgroups come from `vhack.sandbox.cgroups`.
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
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vhack.sandbox.cgroups import RunCgroup

__all__ = ["SECCOMP_ARCHES", "STATUSES", "Limits", "RunResult", "base_python", "launch"]

STAGE2 = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_stage2.py")
SECCOMP_ARCHES = ("x86_64", "aarch64")  # architectures `_stage2.py` has a seccomp filter for
RESULT_BYTES = 4096  # the supervisor's one result line

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
    process. memory_mb: MiB of memory; with cgroups, for the whole program (all its processes,
    tmpfs files included), and always RLIMIT_AS per process. cpus: CPU cores the whole program
    may use at once (cgroups only). nproc: processes and threads (pids.max of the program's
    cgroup, and RLIMIT_NPROC of its uid). fsize_mb: largest file the program may write
    (RLIMIT_FSIZE, MiB). tmpfs_mb: size of each private writable tmpfs (/work, /tmp) in the
    namespace sandbox. nofile: RLIMIT_NOFILE. stdout_bytes / stderr_bytes / channel_bytes: output
    kept on stdout, stderr and the harness channel (fd 3); writing more kills the run.
    """

    wall_s: float = 5.0
    cpu_s: int = 4
    memory_mb: int = 512
    cpus: float = 1.0
    fsize_mb: int = 8
    tmpfs_mb: int = 16
    nofile: int = 64
    nproc: int = 32
    stdout_bytes: int = 256_000
    stderr_bytes: int = 32_000
    channel_bytes: int = 256_000

    def __post_init__(self) -> None:
        for name in ("wall_s", "cpu_s", "memory_mb", "cpus", "fsize_mb", "tmpfs_mb", "nofile"):
            if not getattr(self, name) > 0:
                raise ValueError(f"Limits.{name} must be > 0, got {getattr(self, name)!r}")
        if self.nproc < 1:
            raise ValueError(f"Limits.nproc must be > 0, got {self.nproc!r}")
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

    status: one of STATUSES. exit_code: the program's real exit status, as reported by the
    sandbox's supervisor (negative: killed by that signal; None when we killed it or it never
    ran). stdout / stderr: decoded UTF-8 (invalid bytes replaced), at most the Limits' byte caps.
    wall_s: seconds from start to reap. reason: one line for humans ("exited with status 1:
    ZeroDivisionError: ...", "timeout after 2.0 s"). channel: what was written on fd 3, the
    harness channel (decoded like stdout); text the program prints never lands there.
    """

    status: str
    exit_code: int | None
    stdout: str
    stderr: str
    wall_s: float
    reason: str
    channel: str = ""

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
    tail = text[-4000:]
    lines = [ln for ln in tail.strip().splitlines() if ln.strip()]
    return lines[-1][:200] if lines else ""


def _parse_result(data: bytes) -> dict:
    """The supervisor's result line: {"exit": n} | {"signal": n} | {"setup_error": msg}, or {}."""
    try:
        obj = json.loads(data.split(b"\n", 1)[0])
    except ValueError:
        return {}
    if not isinstance(obj, dict):
        return {}
    if type(obj.get("exit")) is int or type(obj.get("signal")) is int:
        return obj
    if isinstance(obj.get("setup_error"), str):
        return obj
    return {}


def _classify(
    result: dict, killed: str | None, stderr: str, limits: Limits, oom: bool
) -> tuple[str, int | None, str]:
    """(status, exit_code, reason) of a run."""
    if killed == "timeout":
        return "timeout", None, f"timeout: still running after {limits.wall_s:g} s wall clock"
    if killed == "output":
        return (
            "output_limit",
            None,
            (
                f"output limit: wrote more than {limits.stdout_bytes} stdout / "
                f"{limits.stderr_bytes} stderr / {limits.channel_bytes} channel bytes"
            ),
        )
    if "setup_error" in result:
        return "sandbox_error", None, "sandbox setup failed: " + result["setup_error"][:300]
    if not result:
        return "sandbox_error", None, "the sandbox supervisor exited without reporting a result"
    memory = f"memory limit ({limits.memory_mb} MiB)"
    if "signal" in result:
        sig = result["signal"]
        if sig == signal.SIGXCPU:
            return "cpu_limit", -sig, f"cpu limit: killed by SIGXCPU after {limits.cpu_s} s of CPU"
        if oom:
            return "memory", -sig, f"{memory}: killed by the out-of-memory killer"
        name = signal.Signals(sig).name if sig in signal.valid_signals() else str(sig)
        return "crash", -sig, f"killed by signal {name}"
    rc = result["exit"]
    if rc == 0:
        return "ok", 0, "exited with status 0"
    if oom or "MemoryError" in stderr or "Cannot allocate memory" in stderr:
        return "memory", rc, f"{memory}: {_last_line(stderr)}"
    return "error", rc, f"exited with status {rc}: {_last_line(stderr)}"


def launch(
    program: str,
    *,
    mode: str,
    stdin: bytes = b"",
    files: Mapping[str, str] | None = None,
    limits: Limits | None = None,
    uid: int | None = None,
    hide: Sequence[str] = (),
    seccomp: bool = False,
    use_cgroups: bool = True,
) -> RunResult:
    """Run `program` (Python source, saved as main.py in a fresh working directory) once.

    mode: "namespaces" (mount/pid/net/ipc/uts namespaces, a minimal read-only root; plus a user
    namespace when not root) or "process" (a plain child process with rlimits). uid: when running
    as root, the unprivileged uid (and gid) the program runs as; ignored otherwise. files: extra
    files written next to main.py. hide: host paths masked inside the namespace sandbox.
    seccomp: install the seccomp filter of `_stage2.py` (x86_64 and aarch64; ValueError
    elsewhere). use_cgroups: give the run its own cgroups when `cgroups.support()` allows.
    """
    if seccomp and platform.machine() not in SECCOMP_ARCHES:
        raise ValueError(
            f"no seccomp filter for {platform.machine()!r} (have {', '.join(SECCOMP_ARCHES)})"
        )
    if mode not in ("namespaces", "process"):
        raise ValueError(f"mode must be 'namespaces' or 'process', got {mode!r}")
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
    sup = None
    if use_cgroups and is_root:  # imported here: launch.py also runs standalone, unprivileged
        from vhack.sandbox import cgroups

        sup = cgroups.support()
    job = {
        "mode": mode,
        "drop": "setuid" if is_root else ("caps" if mode == "namespaces" else "none"),
        "userns": mode == "namespaces" and not is_root,
        "uid": uid if is_root else os.getuid(),
        "gid": uid if is_root else os.getgid(),
        "python": python,
        "binds": _system_binds(python) if mode == "namespaces" else [],
        "hide": [os.path.realpath(h) for h in hide],
        "files": files,
        "workdir": None,
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
        "cgroups": [],
    }
    t0 = time.monotonic()
    try:
        return _launch_job(job, stdin, limits, sup, cleanup_uid=uid if is_root else None)
    except OSError as e:  # the host could not start this run (no pids, fds, memory): its failure
        reason = f"sandbox setup failed on the host: {type(e).__name__}: {e}"[:300]
        return RunResult("sandbox_error", None, "", "", time.monotonic() - t0, reason)


def _launch_job(job: dict, stdin: bytes, limits: Limits, sup, cleanup_uid: int | None) -> RunResult:
    with contextlib.ExitStack() as cleanup:
        if job["mode"] == "process":  # namespace runs need no host directory at all
            _remove_stale_workdirs()
            job["workdir"] = tempfile.mkdtemp(prefix=f"vhack-sbx-{os.getpid()}-")
            cleanup.callback(shutil.rmtree, job["workdir"], ignore_errors=True)
        cg = None
        if sup is not None and sup.version != "none":
            from vhack.sandbox import cgroups

            cg = cgroups.RunCgroup(
                sup, memory_bytes=limits.memory_mb << 20, pids=limits.nproc, cpus=limits.cpus
            )
            cleanup.callback(cg.remove)
            job["cgroups"] = list(cg.dirs.values())
        job_fd = os.memfd_create("vhack-sandbox-job", os.MFD_CLOEXEC)
        cleanup.callback(os.close, job_fd)
        os.write(job_fd, json.dumps(job).encode())
        if job["mode"] != "process":
            cleanup_uid = None
        return _run(job_fd, stdin, limits, cg, cleanup_uid)


def _remove_stale_workdirs() -> None:
    """Remove process-mode working dirs of graders that died before cleaning up."""
    tmp = tempfile.gettempdir()
    with contextlib.suppress(OSError):
        for name in os.listdir(tmp):
            parts = name.split("-")
            ours = name.startswith("vhack-sbx-") and len(parts) >= 4 and parts[2].isdigit()
            if ours and not os.path.exists(f"/proc/{parts[2]}"):
                shutil.rmtree(os.path.join(tmp, name), ignore_errors=True)


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


def _kill_leftovers(cg: RunCgroup | None, uid: int | None) -> None:
    """Kill what the program left running outside its process group (its cgroup; as root in
    process mode, its uid)."""
    if cg is not None:
        cg.kill_all()
    if uid is not None:
        _kill_uid(uid)


def _run(
    job_fd: int,
    stdin: bytes,
    limits: Limits,
    cg: RunCgroup | None,
    cleanup_uid: int | None,
) -> RunResult:
    python = base_python()
    t0 = time.monotonic()
    deadline = t0 + limits.wall_s
    result_r, result_w = os.pipe2(os.O_CLOEXEC)
    chan_r, chan_w = os.pipe2(os.O_CLOEXEC)
    try:
        proc = subprocess.Popen(
            [python, "-I", "-S", STAGE2, str(job_fd), str(result_w), str(chan_w), str(os.getpid())],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            close_fds=True,
            pass_fds=(job_fd, result_w, chan_w),
            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"},
            cwd="/",
        )
    except BaseException:
        os.close(result_r)
        os.close(chan_r)
        raise
    finally:
        os.close(result_w)
        os.close(chan_w)
    res_pipe = os.fdopen(result_r, "rb", buffering=0)
    chan_pipe = os.fdopen(chan_r, "rb", buffering=0)
    caps = {
        proc.stdout: limits.stdout_bytes,
        proc.stderr: limits.stderr_bytes,
        chan_pipe: limits.channel_bytes,
        res_pipe: RESULT_BYTES,
    }
    out: dict = {pipe: bytearray() for pipe in caps}
    killed = None
    sel = selectors.DefaultSelector()
    for pipe in caps:
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
                    if pipe is res_pipe:  # the supervisor is gone: so is the program
                        _kill_leftovers(cg, cleanup_uid)  # (namespaces: died with pid 1)
                    continue
                if pipe is res_pipe:  # trusted, but bounded all the same
                    out[pipe] += chunk[: RESULT_BYTES - len(out[pipe])]
                    continue
                out[pipe] += chunk
                if len(out[pipe]) > caps[pipe]:
                    killed = "output"
                    break
            if killed:
                break
        if killed:
            _kill_group(proc)
            proc.wait()
        else:
            try:
                proc.wait(timeout=max(deadline - time.monotonic(), 0.05))
            except subprocess.TimeoutExpired:
                killed = "timeout"
                _kill_group(proc)
                proc.wait()
            _kill_group(proc)  # anything the program left behind in its group
        oom = cg.oom_killed() if cg is not None else False
    finally:
        sel.close()
        for pipe in (proc.stdin, proc.stdout, proc.stderr, res_pipe, chan_pipe):
            if pipe and not pipe.closed:
                pipe.close()
        if proc.poll() is None:
            _kill_group(proc)
            proc.wait()
        _kill_leftovers(cg, cleanup_uid)
    wall = time.monotonic() - t0

    def text(pipe, cap: int) -> str:
        return bytes(out[pipe][:cap]).decode("utf-8", "replace")

    stdout = text(proc.stdout, limits.stdout_bytes)
    stderr = text(proc.stderr, limits.stderr_bytes)
    channel = text(chan_pipe, limits.channel_bytes)
    result = {} if killed else _parse_result(bytes(out[res_pipe]))
    status, rc, reason = _classify(result, killed, stderr, limits, oom)
    return RunResult(status, rc, stdout, stderr, wall, reason, channel)
