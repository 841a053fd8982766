"""cgroups.py: which hierarchy `detect()` picks, cgroup v2's no-internal-process rule, and what a
run's cgroup writes, on fake trees (a tmp dir laid out like cgroupfs, a fake /proc/self and a
small simulated kernel for the writes cgroupfs treats specially); plus joining, cgroup.kill and
removal on this machine's real cgroup v2 hierarchy where one is writable."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import time

import pytest

from vhack.sandbox import cgroups
from vhack.sandbox.cgroups import CgroupSupport, RunCgroup, detect

V2_FILES = {  # interface files a new v2 cgroup gets per controller enabled by its parent
    "memory": {"memory.max": "max\n", "memory.swap.max": "max\n", "memory.events": ""},
    "pids": {"pids.max": "max\n"},
    "cpu": {"cpu.max": "max 100000\n"},
}
MEMORY_EVENTS = "low 0\nhigh 0\nmax 0\noom 0\noom_kill {}\noom_group_kill 0\n"


class FakeKernel:
    """cgroupfs semantics on plain directories, for the paths cgroups.py writes through: under
    `v2_mount`, mkdir creates the interface files (for the controllers the parent enables),
    writing a file that does not exist fails, cgroup.subtree_control enforces v2's
    no-internal-process rule (EBUSY outside the root), cgroup.procs moves a pid, cgroup.kill
    is recorded; rmdir refuses a populated cgroup and removes the interface files."""

    def __init__(self, v2_mount: str, *, swap: bool = True, cgroup_kill: bool = True) -> None:
        self.v2_mount, self.swap, self.cgroup_kill = v2_mount, swap, cgroup_kill
        self.killed: list[str] = []

    def install(self, monkeypatch) -> FakeKernel:
        monkeypatch.setattr(cgroups, "_mkdir", self.mkdir)
        monkeypatch.setattr(cgroups, "_rmdir", self.rmdir)
        monkeypatch.setattr(cgroups, "_write", self.write)
        return self

    def mkdir(self, path: str) -> None:
        os.mkdir(path)
        if not path.startswith(self.v2_mount + "/"):
            return
        enabled = _read(os.path.join(os.path.dirname(path), "cgroup.subtree_control")).split()
        files = {
            "cgroup.procs": "",
            "cgroup.controllers": " ".join(enabled),
            "cgroup.subtree_control": "",
            "cgroup.events": "populated 0\nfrozen 0\n",
        }
        if self.cgroup_kill:
            files["cgroup.kill"] = ""
        for c in enabled:
            files.update(V2_FILES.get(c, {}))
        if not self.swap:
            files.pop("memory.swap.max", None)
        if "memory.events" in files:
            files["memory.events"] = MEMORY_EVENTS.format(0)
        for name, text in files.items():
            _put(os.path.join(path, name), text)

    def rmdir(self, path: str) -> None:
        procs = os.path.join(path, "cgroup.procs")
        if os.path.exists(procs) and _read(procs).split():
            raise OSError(errno.EBUSY, "populated", path)
        for name in os.listdir(path):
            os.unlink(os.path.join(path, name))
        os.rmdir(path)

    def write(self, path: str, text: str) -> None:
        d, name = os.path.split(path)
        if not d.startswith(self.v2_mount):
            _put(path, text)
            return
        if not os.path.exists(path):
            raise OSError(errno.EACCES, "cgroupfs: no such interface file", path)
        if name == "cgroup.subtree_control":
            if d != self.v2_mount and _read(os.path.join(d, "cgroup.procs")).split():
                raise OSError(errno.EBUSY, "Device or resource busy", path)
            offered = _read(os.path.join(d, "cgroup.controllers")).split()
            enabled = set(_read(path).split())
            for token in text.split():
                if token[1:] not in offered:
                    raise OSError(errno.ENOENT, f"controller {token[1:]} not offered", path)
                enabled.add(token[1:])
            _put(path, " ".join(sorted(enabled)))
        elif name == "cgroup.procs":
            if _read(os.path.join(d, "cgroup.subtree_control")).split() and d != self.v2_mount:
                raise OSError(errno.EBUSY, "cgroup has controllers for its children", path)
            for root, _, names in os.walk(self.v2_mount):
                if "cgroup.procs" in names:
                    procs = os.path.join(root, "cgroup.procs")
                    _put(procs, " ".join(p for p in _read(procs).split() if p != text))
            _put(path, " ".join([*_read(path).split(), text]))
        elif name == "cgroup.kill":
            self.killed.append(d)
        else:
            _put(path, text)


def _read(path) -> str:
    with open(path) as f:
        return f.read()


def _put(path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _fake_proc(tmp_path, mounts: list[tuple[str, str, str]], cgroup_lines: list[str]) -> str:
    """A fake /proc/self: mountinfo lines for (mount point, fstype, super options), and the
    /proc/self/cgroup text."""
    proc = tmp_path / "proc"
    proc.mkdir()
    lines = [
        f"{30 + i} 23 0:{30 + i} / {point} rw,relatime - {fstype} {fstype} {opts}"
        for i, (point, fstype, opts) in enumerate(mounts)
    ]
    (proc / "mountinfo").write_text("\n".join(lines) + "\n")
    (proc / "cgroup").write_text("\n".join(cgroup_lines) + "\n")
    return str(proc)


def _v2_tree(tmp_path, grader_path: str, procs: list[int], offered="cpuset cpu io memory pids"):
    """A v2 mount at tmp_path/cg2 whose root offers `offered`, enabled down to the grader's
    cgroup `grader_path`, which holds `procs`. Returns (mount, grader dir)."""
    mount = tmp_path / "cg2"
    mount.mkdir()
    (mount / "cgroup.controllers").write_text(offered)
    (mount / "cgroup.procs").write_text("1")
    d = mount
    for part in grader_path.strip("/").split("/"):
        (d / "cgroup.subtree_control").write_text(offered)
        d = d / part
        d.mkdir()
        (d / "cgroup.controllers").write_text(offered)
        (d / "cgroup.subtree_control").write_text("")
        (d / "cgroup.procs").write_text("")
    (d / "cgroup.procs").write_text(" ".join(map(str, procs)))
    return str(mount), str(d)


def test_v2_chosen_when_memory_pids_cpu_are_on_v2(tmp_path, monkeypatch):
    mount, grader = _v2_tree(tmp_path, "/grader.scope", [])  # no process: enabling just works
    FakeKernel(mount).install(monkeypatch)
    proc = _fake_proc(tmp_path, [(mount, "cgroup2", "rw")], ["0::/grader.scope"])
    sup = detect(proc)
    assert sup == CgroupSupport(
        "v2", {"unified": grader}, "cgroups: v2 memory, pids, cpu per program"
    )
    assert _read(os.path.join(grader, "cgroup.subtree_control")).split() == [
        "cpu",
        "memory",
        "pids",
    ]
    assert not [n for n in os.listdir(grader) if n.startswith("vhack-")]  # the try run is gone


def test_v1_chosen_as_before_on_a_v1_layout(tmp_path, monkeypatch):
    v1 = tmp_path / "v1"
    mounts, own = [], ["0::/"]
    for i, c in enumerate(("memory", "pids", "cpu")):
        (v1 / c / "grader").mkdir(parents=True)
        mounts.append((str(v1 / c), "cgroup", f"rw,{c}"))
        own.append(f"{i + 2}:{c}:/grader")
    mount = tmp_path / "cg2"  # a hybrid machine: the unified hierarchy holds no controllers
    mount.mkdir()
    (mount / "cgroup.controllers").write_text("hugetlb")
    FakeKernel(str(mount)).install(monkeypatch)
    made = []
    real_mkdir = cgroups._mkdir
    monkeypatch.setattr(cgroups, "_mkdir", lambda p: (made.append(p), real_mkdir(p)))
    proc = _fake_proc(tmp_path, [*mounts, (str(mount), "cgroup2", "rw")], own)
    sup = detect(proc)
    parents = {c: str(v1 / c / "grader") for c in ("memory", "pids", "cpu")}
    assert sup == CgroupSupport("v1", parents, "cgroups: v1 memory, pids, cpu per program")
    assert sorted(os.path.dirname(p) for p in made) == sorted(parents.values())  # tried for real
    assert all(os.listdir(p) == [] for p in parents.values())


def test_hybrid_without_v2_controllers_says_what_is_missing_where(tmp_path, monkeypatch):
    mount = tmp_path / "cg2"
    mount.mkdir()
    (mount / "cgroup.controllers").write_text("hugetlb")
    (tmp_path / "v1cpu").mkdir()
    FakeKernel(str(mount)).install(monkeypatch)
    proc = _fake_proc(
        tmp_path,
        [(str(tmp_path / "v1cpu"), "cgroup", "rw,cpu"), (str(mount), "cgroup2", "rw")],
        ["2:cpu:/", "0::/"],
    )
    sup = detect(proc)
    assert sup.version == "none" and sup.parents == {}
    assert f"cgroup v2 at {mount} offers hugetlb (no memory, pids, cpu)" in sup.note, sup.note
    assert "no cgroup v1 memory/pids hierarchy" in sup.note, sup.note


def test_v2_moves_the_grader_into_a_leaf_when_its_cgroup_refuses(tmp_path, monkeypatch):
    """EBUSY from subtree_control (v2: no controllers for children of a cgroup with processes),
    and the grader is its cgroup's only process: it moves into P/vhack-grader-<pid>, then the
    controllers are enabled on P and runs are made in P."""
    me = os.getpid()
    mount, grader = _v2_tree(tmp_path, "/user.slice/grader.scope", [me])
    kernel = FakeKernel(mount).install(monkeypatch)
    writes = []
    monkeypatch.setattr(cgroups, "_write", lambda p, t: (writes.append(p), kernel.write(p, t)))
    proc = _fake_proc(tmp_path, [(mount, "cgroup2", "rw")], ["0::/user.slice/grader.scope"])
    sup = detect(proc)
    assert sup.version == "v2" and sup.parents == {"unified": grader}, sup
    leaf = os.path.join(grader, f"vhack-grader-{me}")
    assert _read(os.path.join(leaf, "cgroup.procs")).split() == [str(me)]
    assert _read(os.path.join(grader, "cgroup.procs")).split() == []
    assert _read(os.path.join(grader, "cgroup.subtree_control")).split() == [
        "cpu",
        "memory",
        "pids",
    ]
    control = os.path.join(grader, "cgroup.subtree_control")
    assert writes[:3] == [control, os.path.join(leaf, "cgroup.procs"), control]  # EBUSY, move, ok
    assert sorted(os.listdir(grader)) == sorted(
        ["cgroup.controllers", "cgroup.subtree_control", "cgroup.procs", f"vhack-grader-{me}"]
    )
    # a second look (another support() in this process, or a grader it starts) uses P again
    (tmp_path / "proc" / "cgroup").write_text(f"0::/user.slice/grader.scope/vhack-grader-{me}\n")
    assert detect(proc).parents == {"unified": grader}


def test_v2_refuses_to_move_when_its_cgroup_holds_other_processes(tmp_path, monkeypatch):
    me = os.getpid()
    mount, grader = _v2_tree(tmp_path, "/session.scope", [1234, me])
    FakeKernel(mount).install(monkeypatch)
    proc = _fake_proc(tmp_path, [(mount, "cgroup2", "rw")], ["0::/session.scope"])
    sup = detect(proc)
    assert sup.version == "none", sup
    assert "holds other processes too (pids 1234)" in sup.note, sup.note
    assert "systemd-run --scope -p Delegate=yes" in sup.note, sup.note
    assert _read(os.path.join(grader, "cgroup.procs")).split() == ["1234", str(me)]  # unmoved
    assert not [n for n in os.listdir(grader) if n.startswith("vhack-")]
    assert _read(os.path.join(grader, "cgroup.subtree_control")) == ""


def test_stale_v2_grader_leaves_and_run_cgroups_are_removed(tmp_path, monkeypatch):
    mount, grader = _v2_tree(tmp_path, "/grader.scope", [])
    kernel = FakeKernel(mount).install(monkeypatch)
    _put(os.path.join(grader, "cgroup.subtree_control"), "cpu memory pids")
    dead = 2**22 + 7  # above pid_max's ceiling: no such process
    for name in (f"vhack-grader-{dead}", f"vhack-sbx-{dead}-3", "vhack-grader-1", "other"):
        kernel.mkdir(os.path.join(grader, name))
    _put(os.path.join(grader, "vhack-grader-1", "cgroup.procs"), "1")
    busy = f"vhack-grader-{dead + 1}"  # dead grader, but its leaf still holds a process
    kernel.mkdir(os.path.join(grader, busy))
    _put(os.path.join(grader, busy, "cgroup.procs"), "1")
    proc = _fake_proc(tmp_path, [(mount, "cgroup2", "rw")], ["0::/grader.scope"])
    assert detect(proc).version == "v2"
    left = sorted(n for n in os.listdir(grader) if os.path.isdir(os.path.join(grader, n)))
    assert left == sorted(["other", "vhack-grader-1", busy])


@pytest.mark.parametrize("swap", [True, False])
def test_v2_run_cgroup_writes_the_limits(tmp_path, monkeypatch, swap):
    mount, grader = _v2_tree(tmp_path, "/grader.scope", [])
    FakeKernel(mount, swap=swap).install(monkeypatch)
    _put(os.path.join(grader, "cgroup.subtree_control"), "cpu memory pids")
    sup = CgroupSupport("v2", {"unified": grader}, "")
    cg = RunCgroup(sup, memory_bytes=256 << 20, pids=16, cpus=0.5)
    (d,) = cg.dirs.values()
    assert os.path.dirname(d) == grader
    assert os.path.basename(d).startswith(f"vhack-sbx-{os.getpid()}-")
    assert _read(os.path.join(d, "memory.max")) == str(256 << 20)
    assert _read(os.path.join(d, "pids.max")) == "16"
    assert _read(os.path.join(d, "cpu.max")) == "50000 100000"
    if swap:
        assert _read(os.path.join(d, "memory.swap.max")) == "0"
    else:
        assert not os.path.exists(os.path.join(d, "memory.swap.max"))
    cg.remove()
    assert not os.path.exists(d)
    tiny = RunCgroup(sup, memory_bytes=1 << 20, pids=1, cpus=0.001)  # the quota's 1 ms floor
    assert _read(os.path.join(tiny.dirs["unified"], "cpu.max")) == "1000 100000"
    tiny.remove()


def test_v2_run_cgroup_reports_oom_kills_from_memory_events(tmp_path, monkeypatch):
    mount, grader = _v2_tree(tmp_path, "/grader.scope", [])
    FakeKernel(mount).install(monkeypatch)
    _put(os.path.join(grader, "cgroup.subtree_control"), "cpu memory pids")
    cg = RunCgroup(
        CgroupSupport("v2", {"unified": grader}, ""), memory_bytes=1 << 20, pids=4, cpus=1
    )
    assert cg.oom_killed() is False
    _put(os.path.join(cg.dirs["unified"], "memory.events"), MEMORY_EVENTS.format(2))
    assert cg.oom_killed() is True


@pytest.mark.parametrize("cgroup_kill", [True, False])
def test_v2_kill_all_prefers_cgroup_kill(tmp_path, monkeypatch, cgroup_kill):
    """With cgroup.kill (kernel >= 5.14) one write kills the whole cgroup (here the fake kernel
    only records it, so the listed process must survive: no pid-by-pid kill); without it, each
    pid of cgroup.procs gets SIGKILL."""
    mount, grader = _v2_tree(tmp_path, "/grader.scope", [])
    kernel = FakeKernel(mount, cgroup_kill=cgroup_kill).install(monkeypatch)
    _put(os.path.join(grader, "cgroup.subtree_control"), "cpu memory pids")
    cg = RunCgroup(
        CgroupSupport("v2", {"unified": grader}, ""), memory_bytes=1 << 20, pids=4, cpus=1
    )
    child = subprocess.Popen(["sleep", "30"])
    try:
        _put(os.path.join(cg.dirs["unified"], "cgroup.procs"), str(child.pid))
        cg.kill_all()
        if cgroup_kill:
            assert kernel.killed == [cg.dirs["unified"]]
            assert child.poll() is None
        else:
            assert kernel.killed == []
            assert child.wait(timeout=5) == -signal.SIGKILL
    finally:
        child.kill()
        child.wait()
    _put(os.path.join(cg.dirs["unified"], "cgroup.procs"), "")
    cg.remove()


def _real_v2_parent() -> str:
    """This process's cgroup on the machine's real cgroup v2 hierarchy, found the way
    `detect()` finds it; skips the test when there is none or it is not writable."""
    mount = cgroups._v2_mount()
    if mount is None or cgroups._own_v2_path() is None:
        pytest.skip("no cgroup v2 hierarchy on this machine")
    parent = cgroups._v2_parent(cgroups.PROC_SELF)[0]
    if os.geteuid() != 0 or not os.access(parent, os.W_OK):
        pytest.skip(f"cgroup v2 {parent} is not writable here (needs root)")
    return parent


def test_real_v2_cgroup_join_kill_and_remove(monkeypatch):
    """On the real kernel: a child joins a run cgroup the way the sandbox's program does
    (writing "0" to its cgroup.procs), kill_all kills it through cgroup.kill, the cgroup is
    empty (cgroup.events: populated 0) and remove() deletes it. Limits are not written: on a
    hybrid machine the v2 hierarchy may offer no memory, pids or cpu controllers."""
    parent = _real_v2_parent()
    path = os.path.join(parent, f"vhack-sbx-{os.getpid()}-test")
    try:
        cgroups._mkdir(path)
    except OSError as e:
        pytest.skip(f"cannot create a cgroup in {parent}: {e}")
    cg = RunCgroup.attach("v2", {"unified": path})
    child = None
    try:
        if not os.path.exists(os.path.join(path, "cgroup.kill")):
            pytest.skip("kernel without cgroup.kill (< 5.14)")
        script = f'echo 0 > "{path}/cgroup.procs" && exec sleep 60'
        child = subprocess.Popen(["sh", "-c", script])
        deadline = time.monotonic() + 5
        while _read(os.path.join(path, "cgroup.procs")).split() != [str(child.pid)]:
            assert child.poll() is None and time.monotonic() < deadline, "the child never joined"
            time.sleep(0.01)
        assert "populated 1" in _read(os.path.join(path, "cgroup.events"))
        written, real_write = [], cgroups._write
        monkeypatch.setattr(cgroups, "_write", lambda p, t: (real_write(p, t), written.append(p)))
        cg.kill_all()
        assert written == [os.path.join(path, "cgroup.kill")]  # one write, no pid-by-pid kills
        assert child.wait(timeout=5) == -signal.SIGKILL
        deadline = time.monotonic() + 5
        while "populated 0" not in _read(os.path.join(path, "cgroup.events")):
            assert time.monotonic() < deadline, _read(os.path.join(path, "cgroup.events"))
            time.sleep(0.01)
        cg.remove()
        assert not os.path.exists(path)
    finally:
        if child is not None and child.poll() is None:
            child.kill()
            child.wait()
        cg.remove()


def test_stale_run_cgroup_still_holding_an_exiting_program_is_removed():
    """A grader killed mid-run leaves its run cgroup with the program still exiting in it: the
    next grader's cleanup kills what is left and removes the cgroup (a single rmdir failed with
    EBUSY and left it behind)."""
    sup = cgroups.support()
    if sup.version == "none":
        pytest.skip(f"no per-program cgroups here ({sup.note})")
    key, parent = next(iter(sup.parents.items()))
    dead = next(p for p in range(4_000_000, 4_100_000) if not os.path.exists(f"/proc/{p}"))
    path = os.path.join(parent, f"vhack-sbx-{dead}-0")
    cgroups._mkdir(path)
    child = subprocess.Popen(["sh", "-c", f'echo 0 > "{path}/cgroup.procs" && exec sleep 60'])
    try:
        deadline = time.monotonic() + 5
        while _read(os.path.join(path, "cgroup.procs")).split() != [str(child.pid)]:
            assert child.poll() is None and time.monotonic() < deadline, "the child never joined"
            time.sleep(0.01)
        cgroups._remove_stale({key: parent})
        assert not os.path.exists(path)
        assert child.wait(timeout=5) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        cgroups.RunCgroup.attach(sup.version, {key: path}).remove()
