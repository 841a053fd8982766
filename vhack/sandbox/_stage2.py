"""Sandbox stage 2: the supervisor. Builds the program's world, runs it, reports how it ended.

Started by `vhack.sandbox.launch` as `python -I -S _stage2.py JOB_FD RESULT_FD CHANNEL_FD PPID`;
standard library only (it must not import vhack). JOB_FD is a memfd holding the job JSON;
RESULT_FD the write end of the result pipe; CHANNEL_FD the write end of the harness channel;
PPID the grader's pid. Process tree:

    grader -> stage 2 (outer) -> supervisor (pid 1 of the new pid namespace) -> program

- The outer stage sets PR_SET_PDEATHSIG(SIGKILL) and checks that the grader is still its parent,
  then (namespace mode) unshares mount/pid/net/ipc/uts namespaces (plus a user namespace when not
  root) and forks the supervisor, which sets its own PDEATHSIG: a killed grader kills the outer
  stage, which kills the supervisor, and the death of a pid namespace's init kills everything in it.
  In process mode the outer stage is the supervisor. (PDEATHSIG fires when the *thread* that
  forked the outer stage ends: `Sandbox` starts each run from the thread that waits for it.)
- The supervisor stays privileged (it never runs program code), is not dumpable, and holds the
  only copy of RESULT_FD: the program does not inherit it and, running as another uid or without
  capabilities, cannot open /proc/1/fd. When the program exits, the supervisor writes one JSON line
  there: {"exit": status} or {"signal": number}, or {"setup_error": message} when the sandbox
  could not be built. Nothing the program prints can change that line. It ignores SIGINT, the
  one signal Python handles, so a same-uid program (user-namespace mode) cannot interrupt it.
- The program child joins its cgroups (if any), switches to the unprivileged uid (or drops every
  capability), sets PDEATHSIG again (a uid switch clears it), no_new_privs, the rlimits and the
  seccomp filter, and execs the interpreter. CHANNEL_FD becomes its fd 3 (the harness channel:
  a pipe to the grader for a harness's own reports; a harness that runs untrusted code keeps it
  out of that code's reach, as the code environment's driver process does).

JOB: {"mode": "namespaces" | "process", "drop": "setuid" | "caps" | "none", "uid", "gid",
"userns": bool, "python", "binds", "hide", "files": {name: text}, "workdir" (process mode),
"argv", "env", "rlimits": {name: [soft, hard]}, "tmpfs_mb", "seccomp": bool, "cgroups": [dirs]}.
"""

import contextlib
import ctypes
import fcntl
import json
import os
import platform
import resource
import select
import signal
import struct
import sys

SETUP_FAILED = 121

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
ST_FLAGS = {  # statvfs f_flag -> mount flag that must be kept on a bind remount (locked flags)
    0x2: MS_NOSUID,
    0x4: MS_NODEV,
    0x8: MS_NOEXEC,
    0x400: 0x400,  # MS_NOATIME
    0x800: 0x800,  # MS_NODIRATIME
    0x1000: 1 << 21,  # MS_RELATIME
}
CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x20000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
CLONE_NEWCGROUP = 0x02000000
PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_SET_NO_NEW_PRIVS = 38
PR_CAPBSET_DROP = 24
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
CHANNEL_FD = 3  # the program's fd of the harness channel

_libc = ctypes.CDLL(None, use_errno=True)


class SetupError(Exception):
    """The sandbox could not be built; the program never runs."""


def _prctl(option: int, arg: int, what: str) -> None:
    if _libc.prctl(option, ctypes.c_ulong(arg), 0, 0, 0) != 0:
        raise SetupError(f"prctl({what}) failed: {os.strerror(ctypes.get_errno())}")


def _mount(src, dst, fstype, flags, data=None) -> None:
    rc = _libc.mount(
        None if src is None else src.encode(),
        dst.encode(),
        None if fstype is None else fstype.encode(),
        ctypes.c_ulong(flags),
        None if data is None else data.encode(),
    )
    if rc != 0:
        err = ctypes.get_errno()
        raise SetupError(
            f"mount {src} -> {dst} ({fstype}, flags {flags:#x}) failed: {os.strerror(err)}"
        )


def _remount_ro(path: str, extra: int) -> None:
    """Make the bind mount at `path` read-only (plus `extra` flags), keeping its locked flags."""
    f = os.statvfs(path).f_flag
    keep = 0
    for st, ms in ST_FLAGS.items():
        if f & st:
            keep |= ms
    _mount(None, path, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | extra | keep)


def _bind_ro(src: str, dst: str, device: bool = False) -> None:
    if os.path.isdir(src):
        os.makedirs(dst, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        open(dst, "a").close()
    _mount(src, dst, None, MS_BIND | MS_REC)
    # device nodes (/dev/null, ...) need a mount without nodev to be opened; writes to them are
    # allowed on a read-only mount
    _remount_ro(dst, MS_NOEXEC if device else MS_NODEV)


def _root_mount_point(binds: list) -> str:
    """An existing directory, not holding any bind source, to mount the new root's tmpfs on (in
    this private mount namespace only: nothing is created on the host)."""
    for cand in ("/tmp", "/mnt", "/var/tmp", "/media", "/srv", "/opt"):
        holds_bind = any(b == cand or b.startswith(cand + "/") for b in binds)
        if os.path.isdir(cand) and not os.path.islink(cand) and not holds_bind:
            return cand
    raise SetupError("no directory to build the sandbox root on (tried /tmp, /mnt, ...)")


def _build_root(job: dict) -> str:
    """A minimal tree in a tmpfs: read-only system dirs, the interpreter, /dev basics, a fresh
    /proc of this pid namespace, and writable size-capped /work and /tmp. Returns its path."""
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    root = _root_mount_point(job["binds"])
    _mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
    for src in job["binds"]:
        if os.path.islink(src):  # merged-/usr systems: /bin -> usr/bin
            os.symlink(os.readlink(src), root + src)
        elif os.path.exists(src):
            _bind_ro(src, root + src)
    os.makedirs(root + "/dev", exist_ok=True)
    for dev in ("null", "zero", "random", "urandom"):
        _bind_ro("/dev/" + dev, root + "/dev/" + dev, device=True)
    os.makedirs(root + "/proc", exist_ok=True)
    _mount("proc", root + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    size = f"size={int(job['tmpfs_mb'])}m"
    for d in ("/work", "/tmp"):
        os.makedirs(root + d, exist_ok=True)
        _mount("tmpfs", root + d, "tmpfs", MS_NOSUID | MS_NODEV, size + ",mode=0777")
    for hidden in job["hide"]:
        target = root + hidden
        if os.path.isdir(target) and not os.path.islink(target):
            _mount("tmpfs", target, "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV, "size=4k,mode=0555")
        elif os.path.isfile(target):
            _mount("/dev/null", target, None, MS_BIND)
    _mount(None, root, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
    return root


# -------------------------------------------------------------------------------------------
# seccomp

AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
# syscalls a graded program has no business making (EPERM): ptrace, the mount family,
# pivot_root/chroot, unshare/setns, keyrings, bpf, perf, userfaultfd, module/kexec/reboot/swap/
# acct/hostname, handle-based opens, process_vm_*, pidfd_getfd (another process's fds),
# io_uring, System V IPC (shared memory, semaphores, message queues: memory charged to no
# process) and memfd_create/memfd_secret.
DENIED_NAMES = (
    "ptrace", "pivot_root", "chroot", "acct", "mount", "umount2", "swapon", "swapoff", "reboot",
    "sethostname", "setdomainname", "init_module", "delete_module", "finit_module", "kexec_load",
    "kexec_file_load", "add_key", "request_key", "keyctl", "unshare", "setns", "perf_event_open",
    "name_to_handle_at", "open_by_handle_at", "process_vm_readv", "process_vm_writev", "bpf",
    "userfaultfd", "io_uring_setup", "io_uring_enter", "io_uring_register", "open_tree",
    "move_mount", "fsopen", "fsconfig", "fsmount", "fspick", "mount_setattr", "shmget", "shmat",
    "shmctl", "shmdt", "semget", "semop", "semctl", "semtimedop", "msgget", "msgsnd", "msgrcv",
    "msgctl", "memfd_create", "memfd_secret", "pidfd_getfd",
)  # fmt: skip
SYSCALLS = {
    "x86_64": {
        "ptrace": 101, "pivot_root": 155, "chroot": 161, "acct": 163, "mount": 165,
        "umount2": 166, "swapon": 167, "swapoff": 168, "reboot": 169, "sethostname": 170,
        "setdomainname": 171, "init_module": 175, "delete_module": 176, "finit_module": 313,
        "kexec_load": 246, "kexec_file_load": 320, "add_key": 248, "request_key": 249,
        "keyctl": 250, "unshare": 272, "setns": 308, "perf_event_open": 298,
        "name_to_handle_at": 303, "open_by_handle_at": 304, "process_vm_readv": 310,
        "process_vm_writev": 311, "bpf": 321, "userfaultfd": 323, "io_uring_setup": 425,
        "io_uring_enter": 426, "io_uring_register": 427, "open_tree": 428, "move_mount": 429,
        "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433, "mount_setattr": 442,
        "shmget": 29, "shmat": 30, "shmctl": 31, "shmdt": 67, "semget": 64, "semop": 65,
        "semctl": 66, "semtimedop": 220, "msgget": 68, "msgsnd": 69, "msgrcv": 70, "msgctl": 71,
        "memfd_create": 319, "memfd_secret": 447, "pidfd_getfd": 438,
        "socket": 41, "socketpair": 53, "clone": 56, "clone3": 435,
    },
    "aarch64": {  # asm-generic numbering
        "ptrace": 117, "pivot_root": 41, "chroot": 51, "acct": 89, "mount": 40, "umount2": 39,
        "swapon": 224, "swapoff": 225, "reboot": 142, "sethostname": 161, "setdomainname": 162,
        "init_module": 105, "delete_module": 106, "finit_module": 273, "kexec_load": 104,
        "kexec_file_load": 294, "add_key": 217, "request_key": 218, "keyctl": 219,
        "unshare": 97, "setns": 268, "perf_event_open": 241, "name_to_handle_at": 264,
        "open_by_handle_at": 265, "process_vm_readv": 270, "process_vm_writev": 271, "bpf": 280,
        "userfaultfd": 282, "io_uring_setup": 425, "io_uring_enter": 426,
        "io_uring_register": 427, "open_tree": 428, "move_mount": 429, "fsopen": 430,
        "fsconfig": 431, "fsmount": 432, "fspick": 433, "mount_setattr": 442, "shmget": 194,
        "shmat": 196, "shmctl": 195, "shmdt": 197, "semget": 190, "semop": 193, "semctl": 191,
        "semtimedop": 192, "msgget": 186, "msgsnd": 189, "msgrcv": 188, "msgctl": 187,
        "memfd_create": 279, "memfd_secret": 447, "pidfd_getfd": 438,
        "socket": 198, "socketpair": 199, "clone": 220, "clone3": 435,
    },
}  # fmt: skip
AF_UNIX = 1
CLONE_NEW_FLAGS = (
    CLONE_NEWNS | CLONE_NEWCGROUP | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWUSER | CLONE_NEWPID
) | CLONE_NEWNET
SECCOMP_RET_KILL_PROCESS = 0x80000000
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_ERRNO = 0x00050000
EPERM, ENOSYS, EAFNOSUPPORT = 1, 38, 97


def seccomp_program(arch: str) -> list:
    """The classic-BPF filter for `arch` ("x86_64" or "aarch64"), as (code, jt, jf, k) tuples.

    Another architecture's calling convention (i386, x32, arm32) -> kill the process; socket and
    socketpair only with AF_UNIX (else EAFNOSUPPORT); clone with any CLONE_NEW* flag -> EPERM;
    clone3 -> ENOSYS (glibc then falls back to clone, so threads and fork keep working; clone3's
    flags live in memory a filter cannot read); DENIED_NAMES -> EPERM; everything else allowed.
    """
    if arch not in SYSCALLS:
        raise SetupError(f"no seccomp filter for architecture {arch!r} (have x86_64, aarch64)")
    nr = SYSCALLS[arch]
    ld_w_abs, jeq_k, jge_k, jset_k, ret_k = 0x20, 0x15, 0x35, 0x45, 0x06
    allow = ("ret", SECCOMP_RET_ALLOW)
    # symbolic program: ("op", k, true_label, false_label) / ("ret", value) / ("ld", offset)
    prog: list = [("ld", 4), ("jeq", AUDIT_ARCH[arch], None, "kill"), ("ld", 0)]
    if arch == "x86_64":
        prog.append(("jge", 0x40000000, "kill", None))  # the x32 ABI
    prog += [
        ("jeq", nr["clone3"], "enosys", None),
        ("jeq", nr["socket"], "family", None),
        ("jeq", nr["socketpair"], "family", None),
        ("jeq", nr["clone"], "clone", None),
    ]
    prog += [("jeq", nr[name], "eperm", None) for name in DENIED_NAMES]
    prog.append(allow)
    labels = {}
    blocks = {
        "family": [("ld", 16), ("jeq", AF_UNIX, "allow", "eafnosupport")],
        "clone": [("ld", 16), ("jset", CLONE_NEW_FLAGS, "eperm", "allow")],
        "allow": [allow],
        "eperm": [("ret", SECCOMP_RET_ERRNO | EPERM)],
        "enosys": [("ret", SECCOMP_RET_ERRNO | ENOSYS)],
        "eafnosupport": [("ret", SECCOMP_RET_ERRNO | EAFNOSUPPORT)],
        "kill": [("ret", SECCOMP_RET_KILL_PROCESS)],
    }
    for name, block in blocks.items():
        labels[name] = len(prog)
        prog += block
    out = []
    for i, ins in enumerate(prog):
        if ins[0] == "ld":
            out.append((ld_w_abs, 0, 0, ins[1]))
        elif ins[0] == "ret":
            out.append((ret_k, 0, 0, ins[1]))
        else:
            op, k, t, f = ins
            jt = 0 if t is None else labels[t] - i - 1
            jf = 0 if f is None else labels[f] - i - 1
            if not (0 <= jt < 256 and 0 <= jf < 256):
                raise SetupError("seccomp filter too long for 8-bit jumps")
            code = {"jeq": jeq_k, "jge": jge_k, "jset": jset_k}[op]
            out.append((code, jt, jf, k))
    return out


def _seccomp_filter() -> None:
    """Install `seccomp_program` for this machine's architecture (no_new_privs must be set)."""
    prog = seccomp_program(platform.machine())
    buf = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *ins) for ins in prog))

    class SockFprog(ctypes.Structure):
        _fields_ = (("len", ctypes.c_ushort), ("filter", ctypes.c_void_p))

    fprog = SockFprog(len(prog), ctypes.addressof(buf))
    if _libc.prctl(22, 2, ctypes.byref(fprog), 0, 0) != 0:  # PR_SET_SECCOMP, SECCOMP_MODE_FILTER
        raise SetupError(f"installing the seccomp filter failed: {os.strerror(ctypes.get_errno())}")


# -------------------------------------------------------------------------------------------
# privileges


def _drop_caps() -> None:
    with open("/proc/sys/kernel/cap_last_cap") as f:
        last = int(f.read())
    for cap in range(last + 1):
        if _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise SetupError(f"cannot drop capability {cap} from the bounding set")
    _libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)

    class Header(ctypes.Structure):
        _fields_ = (("version", ctypes.c_uint32), ("pid", ctypes.c_int))

    class Data(ctypes.Structure):
        _fields_ = (("eff", ctypes.c_uint32), ("perm", ctypes.c_uint32), ("inh", ctypes.c_uint32))

    header, data = Header(0x20080522, 0), (Data * 2)()
    if _libc.capset(ctypes.byref(header), data) != 0:
        raise SetupError("capset to an empty capability set failed")


def _unshare(job: dict) -> None:
    flags = CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS
    uid, gid = os.getuid(), os.getgid()
    if job["userns"]:
        flags |= CLONE_NEWUSER
    if _libc.unshare(ctypes.c_int(flags)) != 0:
        raise SetupError(f"unshare(namespaces) failed: {os.strerror(ctypes.get_errno())}")
    if job["userns"]:  # become root of the new user namespace, mapped to our own uid
        for name, text in (
            ("setgroups", "deny"),
            ("uid_map", f"0 {uid} 1"),
            ("gid_map", f"0 {gid} 1"),
        ):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)


def _die_with_parent(alive_fd: int | None = None) -> None:
    """SIGKILL when the parent exits; exit now if it already has (its end of `alive_fd` closed,
    or, without one, we were reparented)."""
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL, "PR_SET_PDEATHSIG")
    if alive_fd is not None and select.select([alive_fd], [], [], 0)[0]:
        os._exit(SETUP_FAILED)


# -------------------------------------------------------------------------------------------
# the processes


def _report(result_fd: int, obj: dict) -> None:
    data = (json.dumps(obj) + "\n").encode()
    with contextlib.suppress(OSError):
        os.write(result_fd, data)


def _program(job: dict, fds: dict, cgroup_fds: list, parent: int) -> None:
    """The program child: confine itself, then exec the interpreter. Never returns. A failure
    before exec is written to fds["exec"] (close-on-exec: it reads EOF once exec succeeded)."""
    try:
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # ignored dispositions survive exec
        high = {k: fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 100) for k, fd in fds.items()}
        for fd in fds.values():
            os.close(fd)
        for fd in cgroup_fds:  # join the run's cgroups while still root
            os.write(fd, b"0")
            os.close(fd)
        os.dup2(high["channel"], CHANNEL_FD)  # inheritable
        os.dup2(high["exec"], CHANNEL_FD + 1, inheritable=False)
        os.closerange(CHANNEL_FD + 2, 65536)  # the result fd among them
        if job["drop"] == "setuid":
            os.setgroups([])
            os.setgid(job["gid"])
            os.setuid(job["uid"])
            if os.getuid() == 0 or os.geteuid() == 0:
                raise SetupError("still root after setuid")
        elif job["drop"] == "caps":
            _drop_caps()
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL, "PR_SET_PDEATHSIG")  # cleared by the uid switch
        if os.getppid() != parent:
            os._exit(SETUP_FAILED)
        _prctl(PR_SET_NO_NEW_PRIVS, 1, "PR_SET_NO_NEW_PRIVS")
        for name, (soft, hard) in job["rlimits"].items():
            resource.setrlimit(getattr(resource, name), (soft, hard))
        if job.get("seccomp"):
            _seccomp_filter()
        os.execve(job["python"], job["argv"], job["env"])
    except BaseException as e:
        msg = f"{type(e).__name__}: {e}"[:500].encode(errors="replace")
        with contextlib.suppress(OSError):
            os.write(CHANNEL_FD + 1, msg or b"?")
    os._exit(SETUP_FAILED)


def _supervise(job: dict, result_fd: int, chan_fd: int) -> None:
    """Build the program's world, run it as a child, report its real exit status. Never returns."""
    files = job["files"]
    if job["mode"] == "namespaces":
        root = _build_root(job)
        for name, text in files.items():
            with open(os.path.join(root, "work", name), "w") as f:
                f.write(text)
    else:
        workdir = job["workdir"]
        for name, text in files.items():
            with open(os.path.join(workdir, name), "w") as f:
                f.write(text)
        if job["drop"] == "setuid":
            os.chown(workdir, job["uid"], job["gid"])
    cgroup_fds = [os.open(os.path.join(d, "cgroup.procs"), os.O_WRONLY) for d in job["cgroups"]]
    if job["mode"] == "namespaces":
        os.chroot(root)
        os.chdir("/work")
    else:
        os.chdir(workdir)
    _prctl(PR_SET_DUMPABLE, 0, "PR_SET_DUMPABLE")  # no /proc/<pid>/fd access for the program
    me = os.getpid()
    # Python's only handler: a program allowed to signal the supervisor (same uid in a user
    # namespace; pid 1 gets only signals it handles) must not be able to interrupt it
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    exec_r, exec_w = os.pipe2(os.O_CLOEXEC)
    child = os.fork()
    if child == 0:
        _program(job, {"channel": chan_fd, "exec": exec_w, "result": result_fd}, cgroup_fds, me)
    for fd in (chan_fd, exec_w, *cgroup_fds, 0, 1, 2):  # stdio: the program's alone
        os.close(fd)
    failure = os.read(exec_r, 1024)
    os.close(exec_r)
    while True:  # as pid 1, also reap the orphans the program leaves
        try:
            pid, status = os.wait()
        except ChildProcessError:
            _report(result_fd, {"setup_error": "lost the program process"})
            os._exit(SETUP_FAILED)
        if pid == child:
            break
    if failure:
        _report(result_fd, {"setup_error": failure.decode(errors="replace")})
    elif os.WIFSIGNALED(status):
        _report(result_fd, {"signal": os.WTERMSIG(status)})
    else:
        _report(result_fd, {"exit": os.waitstatus_to_exitcode(status)})
    os._exit(0)  # as pid 1: the kernel kills whatever is left in the namespace


def main() -> None:
    job_fd, result_fd, chan_fd, grader = (int(a) for a in sys.argv[1:5])
    _die_with_parent()
    if os.getppid() != grader:
        os._exit(SETUP_FAILED)
    try:
        chunks = []
        while chunk := os.pread(job_fd, 1 << 20, sum(len(c) for c in chunks)):
            chunks.append(chunk)
        os.close(job_fd)
        job = json.loads(b"".join(chunks))
        if job["mode"] == "namespaces":
            alive_r, alive_w = os.pipe()
            _unshare(job)
            pid = os.fork()  # the first child is pid 1 of the new pid namespace
            if pid:
                for fd in (alive_r, chan_fd, result_fd, 0, 1, 2):
                    os.close(fd)
                _, status = os.waitpid(pid, 0)
                os._exit(os.waitstatus_to_exitcode(status) & 0xFF)
            os.close(alive_w)
            _die_with_parent(alive_r)
            os.close(alive_r)
        _supervise(job, result_fd, chan_fd)
    except BaseException as e:  # any setup error is reported as such; the program never ran
        _report(result_fd, {"setup_error": f"{type(e).__name__}: {e}"[:500]})
        os._exit(SETUP_FAILED)


if __name__ == "__main__":
    main()
