"""Sandbox stage 2: runs inside fresh namespaces, builds the program's world, then execs it.

Started by `vhack.sandbox.runner` as `[unshare ...] python -I -S _stage2.py JOB.json`; standard
library only (it must not import vhack). As real root (namespaces made by `unshare` without a user
namespace) it finishes by switching to the job's unprivileged uid/gid; as an ordinary user (inside
`unshare --user --map-root-user`) it drops every capability instead. In both cases it sets
no_new_privs and the rlimits just before exec.

JOB.json: {"mode": "namespaces" | "process", "drop": "setuid" | "caps", "uid": int, "gid": int,
"python": path of the interpreter, "binds": [host dirs to show read-only], "hide": [paths to mask],
"files": {name: text}, "argv": [...], "env": {...}, "rlimits": {name: [soft, hard]},
"tmpfs_mb": int, "seccomp": bool (x86_64 only)}. A setup failure exits with status 121 and one line on stderr starting with
"vhack-sandbox-setup:". Under a new pid namespace this script stays as pid 1 and runs the program
as its child (see `_run_as_init`).
"""

import ctypes
import json
import os
import resource
import sys

SETUP_FAILED = 121
EXIT_MARKER = "vhack-sandbox-killed-by-signal:"

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
PR_SET_NO_NEW_PRIVS = 38
PR_CAPBSET_DROP = 24
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4

_libc = ctypes.CDLL(None, use_errno=True)


def _fail(msg: str) -> None:
    sys.stderr.write(f"vhack-sandbox-setup: {msg}\n")
    sys.stderr.flush()
    os._exit(SETUP_FAILED)


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
        _fail(f"mount {src} -> {dst} ({fstype}, flags {flags:#x}) failed: {os.strerror(err)}")


def _remount_ro(path: str) -> None:
    """Make the bind mount at `path` read-only, keeping its locked flags."""
    f = os.statvfs(path).f_flag
    keep = 0
    for st, ms in ST_FLAGS.items():
        if f & st:
            keep |= ms
    _mount(None, path, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV | keep)


def _bind_ro(src: str, dst: str) -> None:
    if os.path.isdir(src):
        os.makedirs(dst, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        open(dst, "a").close()
    _mount(src, dst, None, MS_BIND | MS_REC)
    _remount_ro(dst)


def _build_root(job: dict, root: str) -> None:
    """A minimal tree in a tmpfs at `root`: read-only system dirs, the interpreter, /dev basics, a
    fresh /proc of this pid namespace, and writable size-capped /work and /tmp."""
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    os.makedirs(root, exist_ok=True)
    _mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
    for src in job["binds"]:
        if os.path.islink(src):  # merged-/usr systems: /bin -> usr/bin
            os.symlink(os.readlink(src), root + src)
        elif os.path.exists(src):
            _bind_ro(src, root + src)
    os.makedirs(root + "/dev", exist_ok=True)
    for dev in ("null", "zero", "random", "urandom"):
        _bind_ro("/dev/" + dev, root + "/dev/" + dev)
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


# x86_64 syscalls a graded program has no business making; they fail with EPERM under the filter:
# ptrace, mount family, pivot_root/chroot, unshare/setns, keyrings, bpf, perf, userfaultfd,
# module/kexec/reboot/swap/acct/hostname, handle-based opens, process_vm_*, io_uring. clone3 gets
# ENOSYS instead, so that glibc falls back to clone (threads and fork keep working).
SECCOMP_DENY_X86_64 = (
    101, 155, 161, 163, 165, 166, 167, 168, 169, 170, 171, 175, 176, 246, 248, 249, 250, 272,
    298, 303, 304, 308, 310, 311, 313, 320, 321, 323, 425, 426, 427, 428, 429, 430, 431, 432,
    433, 442,
)  # fmt: skip
CLONE3_X86_64 = 435


def _seccomp_filter() -> None:
    """Install a seccomp-bpf filter: wrong arch -> kill; x32 and denied syscalls -> EPERM;
    clone3 -> ENOSYS; everything else allowed."""
    import struct

    def insn(code: int, jt: int, jf: int, k: int) -> bytes:
        return struct.pack("HBBI", code, jt, jf, k)

    ld_w_abs, jeq_k, jge_k, ret_k = 0x20, 0x15, 0x35, 0x06
    allow, errno_eperm, kill = 0x7FFF0000, 0x00050000 | 1, 0x80000000
    deny = SECCOMP_DENY_X86_64
    prog = [
        insn(ld_w_abs, 0, 0, 4),  # seccomp_data.arch
        insn(jeq_k, 1, 0, 0xC000003E),  # AUDIT_ARCH_X86_64
        insn(ret_k, 0, 0, kill),
        insn(ld_w_abs, 0, 0, 0),  # seccomp_data.nr
        insn(jeq_k, 0, 1, CLONE3_X86_64),
        insn(ret_k, 0, 0, 0x00050000 | 38),  # ENOSYS
        insn(jge_k, len(deny) + 1, 0, 0x40000000),  # x32 ABI -> EPERM
    ]
    for i, nr in enumerate(deny):
        prog.append(insn(jeq_k, len(deny) - i, 0, nr))
    prog.append(insn(ret_k, 0, 0, allow))
    prog.append(insn(ret_k, 0, 0, errno_eperm))
    buf = ctypes.create_string_buffer(b"".join(prog))

    class SockFprog(ctypes.Structure):
        _fields_ = (("len", ctypes.c_ushort), ("filter", ctypes.c_void_p))

    fprog = SockFprog(len(prog), ctypes.addressof(buf))
    if _libc.prctl(22, 2, ctypes.byref(fprog), 0, 0) != 0:  # PR_SET_SECCOMP, SECCOMP_MODE_FILTER
        _fail(f"installing the seccomp filter failed: {os.strerror(ctypes.get_errno())}")


def _drop_caps() -> None:
    with open("/proc/sys/kernel/cap_last_cap") as f:
        last = int(f.read())
    for cap in range(last + 1):
        if _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            _fail(f"cannot drop capability {cap} from the bounding set")
    _libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)

    class Header(ctypes.Structure):
        _fields_ = (("version", ctypes.c_uint32), ("pid", ctypes.c_int))

    class Data(ctypes.Structure):
        _fields_ = (("eff", ctypes.c_uint32), ("perm", ctypes.c_uint32), ("inh", ctypes.c_uint32))

    header, data = Header(0x20080522, 0), (Data * 2)()
    if _libc.capset(ctypes.byref(header), data) != 0:
        _fail("capset to an empty capability set failed")


def main() -> None:
    with open(sys.argv[1]) as f:
        job = json.load(f)
    jobdir = os.path.dirname(os.path.abspath(sys.argv[1]))
    files = job["files"]
    if job["mode"] == "namespaces":
        root = os.path.join(jobdir, "root")
        _build_root(job, root)
        for name, text in files.items():
            with open(os.path.join(root, "work", name), "w") as f:
                f.write(text)
        os.chroot(root)
        os.chdir("/work")
    else:
        workdir = os.path.join(jobdir, "work")
        os.makedirs(workdir, exist_ok=True)
        for name, text in files.items():
            with open(os.path.join(workdir, name), "w") as f:
                f.write(text)
        if job["drop"] == "setuid":
            os.chown(workdir, job["uid"], job["gid"])
        os.chdir(workdir)
    if job["drop"] == "setuid":
        os.setgroups([])
        os.setgid(job["gid"])
        os.setuid(job["uid"])
        if os.getuid() == 0 or os.geteuid() == 0:
            _fail("still root after setuid")
    elif job["drop"] == "caps":
        _drop_caps()
    if _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        _fail("prctl(PR_SET_NO_NEW_PRIVS) failed")
    if os.getpid() == 1:
        _run_as_init(job)
    _exec(job)


def _exec(job: dict) -> None:
    for name, (soft, hard) in job["rlimits"].items():
        try:
            resource.setrlimit(getattr(resource, name), (soft, hard))
        except (ValueError, OSError) as e:
            _fail(f"setrlimit {name}={soft},{hard} failed: {e}")
    if job.get("seccomp"):
        _seccomp_filter()
    sys.stdout.flush()
    try:
        os.execve(job["python"], job["argv"], job["env"])
    except OSError as e:
        _fail(f"exec {job['python']} failed: {e}")


def _run_as_init(job: dict) -> None:
    """As pid 1 of the new pid namespace: run the program as a child, reap orphans until it
    exits, then exit (which kills whatever is left in the namespace). A death by signal is
    reported as a marker line on stderr and status 128 + signal (pid 1 cannot re-raise it)."""
    sys.stdout.flush()
    child = os.fork()
    if child == 0:
        _exec(job)
    while True:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            os._exit(SETUP_FAILED)
        if pid == child:
            break
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        sys.stderr.write(f"\n{EXIT_MARKER} {sig}\n")
        sys.stderr.flush()
        os._exit(128 + sig)
    os._exit(os.waitstatus_to_exitcode(status))


if __name__ == "__main__":
    try:
        main()
    except SystemExit:
        raise
    except BaseException as e:  # any setup error is reported as such, never run the program
        _fail(f"{type(e).__name__}: {e}")
