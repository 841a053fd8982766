"""The sandbox: probe, refusal, limits and statuses, and what a program can and cannot reach."""

from __future__ import annotations

import json
import os
import time

import pytest

from vhack.errors import UsageError
from vhack.sandbox import (
    LEVELS,
    STATUSES,
    IsolationReport,
    IsolationUnavailable,
    Job,
    Limits,
    Sandbox,
    probe,
)
from vhack.sandbox.uids import UID_BASE, UID_COUNT

REPORT = probe()
needs_ns = pytest.mark.skipif(
    REPORT.level != "namespaces",
    reason="needs the namespace sandbox (probe: " + "; ".join(REPORT.notes) + ")",
)


@pytest.fixture(scope="module")
def box():
    with Sandbox(limits=Limits(wall_s=3.0, cpu_s=2, memory_mb=192, nproc=16), workers=2) as b:
        yield b


def _sandbox_procs(wait_s: float = 5.0) -> list[int]:
    """Pids of processes still alive as a sandbox uid after waiting up to wait_s seconds for a
    killed namespace to be torn down (zombies waiting to be reaped do not count)."""
    deadline = time.monotonic() + wait_s
    while True:
        pids = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/status") as f:
                        lines = f.read().splitlines()
                except OSError:
                    continue
                fields = dict(ln.split(":", 1) for ln in lines if ":" in ln)
                uid = int(fields.get("Uid", "0").split()[0])
                zombie = fields.get("State", "").strip().startswith("Z")
                if UID_BASE <= uid < UID_BASE + UID_COUNT and not zombie:
                    pids.append(int(entry))
        if not pids or time.monotonic() > deadline:
            return pids
        time.sleep(0.05)


def test_probe_report_is_structured():
    assert REPORT.level in LEVELS
    d = REPORT.to_dict()
    assert set(d) >= {"level", "checks", "notes", "is_root", "python", "kernel", "cgroup", "limits"}
    assert all(isinstance(v, bool) for v in d["checks"].values())
    json.dumps(d)  # `vhack info` prints it
    if REPORT.level == "namespaces":
        assert all(v for k, v in REPORT.checks.items() if k.startswith("namespaces."))


def test_refuses_less_isolation_than_required():
    weak = IsolationReport(level="process", notes=["namespaces: unshare missing"])
    with pytest.raises(IsolationUnavailable, match="needs 'namespaces' isolation"):
        Sandbox(required="namespaces", report=weak)
    assert issubclass(IsolationUnavailable, UsageError)
    with pytest.raises(IsolationUnavailable):
        Sandbox(required="process", report=IsolationReport(level="none"))
    with pytest.raises(UsageError, match="choose one of"):
        Sandbox(required="chroot", report=weak)


def test_limits_validate():
    with pytest.raises(ValueError, match="wall_s"):
        Limits(wall_s=0)
    with pytest.raises(ValueError, match="memory_mb"):
        Limits(memory_mb=16)


@needs_ns
def test_isolation_from_inside(box, tmp_path, monkeypatch):
    """Seen from inside: the only child of init in its own pid namespace, no network, no parent env, read-only system,
    private /tmp and working dir, host paths invisible, stdin delivered."""
    monkeypatch.setenv("VHACK_FAKE_SECRET", "hunter2")
    host_file = tmp_path / "host.txt"
    host_file.write_text("host")
    unique = f"/tmp/vhack-sandbox-test-{os.getpid()}-{time.monotonic_ns()}"
    program = f"""
import json, os, socket, sys
facts = {{"pid": os.getpid(), "uid": os.getuid(), "env": dict(os.environ), "stdin": sys.stdin.read(),
         "cwd": os.getcwd(), "host_visible": os.path.exists({str(host_file)!r})}}
try:
    socket.create_connection(("127.0.0.1", 9), timeout=1)
    facts["net"] = "connected"
except OSError as e:
    facts["net"] = str(e)
for path in ("/usr/x", "/etc/x", "/work/x", {unique!r}):
    try:
        open(path, "w").write("x")
        facts[path] = "written"
    except OSError as e:
        facts[path] = e.strerror
print(json.dumps(facts))
"""
    r = box.run(program, stdin=b"the input")
    assert r.status == "ok", r
    facts = json.loads(r.stdout)
    assert facts["pid"] == 2 and facts["stdin"] == "the input" and facts["cwd"] == "/work"
    assert "VHACK_FAKE_SECRET" not in facts["env"] and set(facts["env"]) <= {
        "PATH",
        "HOME",
        "LANG",
        "PYTHONHASHSEED",
    }
    # no socket but AF_UNIX (seccomp); on the host: refused (nothing on port 9) or connected
    assert "Address family not supported" in facts["net"]
    assert not facts["host_visible"]
    assert facts["/usr/x"] == facts["/etc/x"] == "Read-only file system"
    assert facts["/work/x"] == facts[unique] == "written"
    assert not os.path.exists(unique)  # the program's /tmp was its own
    if REPORT.is_root:
        assert facts["uid"] >= UID_BASE


@needs_ns
@pytest.mark.parametrize(
    ("program", "status", "limits"),
    [
        ("print('hi')", "ok", None),
        ("import sys\nsys.exit(4)", "error", None),
        ("import os\nos._exit(0)", "ok", None),
        ("def f(:\n", "error", None),
        ("while True:\n    pass", "timeout", Limits(wall_s=1.5, cpu_s=10)),
        ("while True:\n    pass", "cpu_limit", Limits(wall_s=20, cpu_s=1)),
        ("x = []\nwhile True:\n    x.append(bytearray(1 << 24))", "memory", None),
        ("while True:\n    print('y' * 4096)", "output_limit", None),
        ("import ctypes\nctypes.string_at(0)", "crash", None),
        ("open('big', 'wb').write(b'x' * (64 << 20))", "error", Limits(fsize_mb=1)),
    ],
)
def test_statuses(box, program, status, limits):
    assert status in STATUSES
    r = box.run(program, limits=limits)
    assert r.status == status, r
    assert r.reason
    if status == "error" and "sys.exit" in program:
        assert r.exit_code == 4


@needs_ns
def test_fork_bomb_is_contained_and_cleaned_up(box):
    t0 = time.monotonic()
    bomb = (
        "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    )
    r = box.run(bomb, limits=Limits(wall_s=1.5, nproc=16))
    assert r.status == "timeout", r
    assert time.monotonic() - t0 < 10
    assert _sandbox_procs() == []
    after = box.run("print(6 * 7)")
    assert after.ok and after.stdout.strip() == "42"


@needs_ns
def test_background_children_die_with_the_program(box):
    """A daemonized child (new session, double fork) cannot outlive the run."""
    program = (
        "import os, time\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        "        time.sleep(60)\n"
        "    os._exit(0)\n"
        "print('parent done')\n"
    )
    r = box.run(program)
    assert r.ok, r
    assert _sandbox_procs() == []


@needs_ns
def test_run_many_is_parallel_and_ordered(box):
    jobs = [Job(f"import time\ntime.sleep(0.3)\nprint({i})") for i in range(4)]
    results = box.run_many(jobs)
    assert [r.stdout.strip() for r in results] == ["0", "1", "2", "3"]
    assert all(r.ok for r in results)


def test_files_are_checked(box):
    with pytest.raises(ValueError, match="main.py"):
        box.run("pass", files={"main.py": "x"})
    with pytest.raises(ValueError, match="plain names"):
        box.run("pass", files={"../escape.py": "x"})


def test_vhack_info_reports_the_probe(capsys):
    from vhack import cli

    assert cli.main(["info"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["sandbox"]["level"] == REPORT.level
    assert info["sandbox"]["checks"] == REPORT.checks
    # how memory / process / CPU limits are counted, and why when weaker (issue 18)
    assert info["sandbox"]["cgroup"] == REPORT.cgroup and info["sandbox"]["limits"]


@needs_ns
@pytest.mark.skipif(not REPORT.seccomp, reason="the seccomp filter is not applied here")
def test_seccomp_filter_denies_kernel_surface_but_not_threads(box):
    program = r"""
import ctypes, errno, json, os, subprocess, threading
libc = ctypes.CDLL(None, use_errno=True)
def denied(rc):
    return rc == -1 and ctypes.get_errno() == errno.EPERM
out = {
    "unshare": denied(libc.unshare(0x10000000)),
    "mount": denied(libc.mount(b"none", b"/tmp", b"tmpfs", 0, None)),
    "ptrace": denied(libc.ptrace(16, 1, 0, 0)),
}
t = threading.Thread(target=out.__setitem__, args=("thread", True))
t.start()
t.join()
pid = os.fork()
if pid == 0:
    os._exit(7)
out["fork"] = os.waitpid(pid, 0)[1] >> 8 == 7
out["subprocess"] = subprocess.run(["/bin/echo", "x"], capture_output=True).stdout == b"x\n"
print(json.dumps(out))
"""
    r = box.run(program)
    assert r.ok, r
    assert json.loads(r.stdout) == {
        "unshare": True,
        "mount": True,
        "ptrace": True,
        "thread": True,
        "fork": True,
        "subprocess": True,
    }


def _world_executable(path: str, bit: int = 0o001) -> bool:
    """Whether others can reach `path` (x on every directory) and have `bit` on it."""
    path = os.path.realpath(path)
    parts = path.split("/")
    for i in range(2, len(parts)):
        if not os.stat("/".join(parts[:i])).st_mode & 0o001:
            return False
    return os.path.isfile(path) and bool(os.stat(path).st_mode & bit)


def _system_python() -> str | None:
    import shutil

    from vhack.sandbox.launch import base_python

    for candidate in (base_python(), shutil.which("python3"), "/usr/bin/python3"):
        if candidate and os.path.exists(candidate) and _world_executable(candidate):
            return candidate
    return None


@needs_ns
@pytest.mark.skipif(os.geteuid() != 0, reason="switches to an unprivileged user to test that path")
def test_unprivileged_user_path():
    """Run by an ordinary user, the sandbox uses a user namespace and drops every capability:
    the program is root inside but cannot write the system, remount, or reach the network."""
    import shutil
    import subprocess

    python, setpriv = _system_python(), shutil.which("setpriv")
    launch_py = os.path.join(os.path.dirname(__file__), "..", "vhack", "sandbox", "launch.py")
    readable = _world_executable(os.path.realpath(launch_py), 0o004)
    if python is None or setpriv is None or not readable:
        pytest.skip("needs setpriv and a Python and checkout readable by an unprivileged user")
    import tempfile

    workdir = tempfile.mkdtemp(prefix="vhack-unpriv-")  # pytest's tmp_path is private to root
    os.chmod(workdir, 0o755)
    driver = os.path.join(workdir, "driver.py")
    with open(driver, "w") as f:
        f.write(
            "import importlib.util, json, sys\n"
            f"spec = importlib.util.spec_from_file_location('l', {os.path.realpath(launch_py)!r})\n"
            "m = importlib.util.module_from_spec(spec); sys.modules['l'] = m\n"
            "spec.loader.exec_module(m)\n"
            "program = sys.stdin.read()\n"
            "r = m.launch(program, mode='namespaces')\n"
            "print(json.dumps([r.status, r.stdout, r.reason]))\n"
        )
    os.chmod(driver, 0o644)
    program = r"""
import ctypes, json, os, socket
libc = ctypes.CDLL(None, use_errno=True)
st = dict(ln.split(":", 1) for ln in open("/proc/self/status").read().splitlines() if ":" in ln)
out = {"uid": os.getuid(), "caps": int(st["CapEff"], 16), "bnd": int(st["CapBnd"], 16)}
try:
    socket.create_connection(("127.0.0.1", 9), timeout=1)
    out["net"] = True
except OSError as e:
    out["net"] = "unreachable" not in str(e)
try:
    open("/usr/x", "w")
    out["usr"] = True
except OSError:
    out["usr"] = False
out["remount"] = libc.mount(None, b"/usr", None, 0x20 | 0x1000, None) == 0
import signal, time
os.kill(1, signal.SIGINT)  # same uid as the supervisor here: it must not be interruptible
time.sleep(0.2)
print(json.dumps(out))
"""
    r = subprocess.run(
        [setpriv, "--reuid", "65534", "--regid", "65534", "--clear-groups", python, "-I",
         str(driver)],
        input=program, capture_output=True, text=True, timeout=60,
        env={"PATH": "/usr/bin:/bin", "HOME": "/tmp"},
    )  # fmt: skip
    shutil.rmtree(workdir, ignore_errors=True)
    assert r.returncode == 0, r.stderr
    status, stdout, reason = json.loads(r.stdout)
    assert status == "ok", reason
    facts = json.loads(stdout)
    assert facts == {"uid": 0, "caps": 0, "bnd": 0, "net": False, "usr": False, "remount": False}
