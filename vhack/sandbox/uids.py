"""Unprivileged uids for sandboxed programs, one per running program on the whole host.

RLIMIT_NPROC counts processes per uid, so two programs sharing a uid share that limit: a fork
bomb in one grader would starve an honest program in another. Each run therefore leases its own
uid from [UID_BASE, UID_BASE + UID_COUNT) by holding an exclusive flock on a lock file named after
it (in LOCK_DIR, private to root); the kernel drops the lock when the holder exits, even if it is
killed, so no uid leaks.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator

__all__ = ["LOCK_DIR", "UID_BASE", "UID_COUNT", "lease_uid"]

UID_BASE = 1_990_000_000
UID_COUNT = 4096
LOCK_DIR = "/run/vhack-sandbox/uids"


@contextlib.contextmanager
def lease_uid(lock_dir: str = LOCK_DIR) -> Iterator[int]:
    """Hold the lowest free sandbox uid for the duration of the `with` block (as root only)."""
    os.makedirs(lock_dir, mode=0o700, exist_ok=True)
    for slot in range(UID_COUNT):
        uid = UID_BASE + slot
        fd = os.open(os.path.join(lock_dir, str(uid)), os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        try:
            yield uid
        finally:
            os.close(fd)
        return
    raise RuntimeError(f"all {UID_COUNT} sandbox uids from {UID_BASE} are in use")
