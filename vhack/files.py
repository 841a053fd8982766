"""Files vhack reads and writes.

Reads: `regular_file` refuses what is not a regular file (a FIFO would block the reader forever,
a directory or device gives a confusing error) before anything opens it.

Writes are atomic: a reader (or a run after a kill -9) sees the old file or the new one, never a
torn one.

Every file vhack writes goes through `atomic_write`: the content goes to a temporary file beside
the target (same directory, so the rename cannot cross file systems), which is flushed and
fsync'ed, then renamed over the target, and the directory is fsync'ed so the rename itself
survives a power cut. Files get the mode a plain `open(path, "w")` would give (0666 less the
umask), not mkstemp's 0600. Temporary names start with `.` and contain `.vhack-tmp-`, so
`remove_stale_temps` can clear the leftovers of a killed writer without touching anything else.
"""

from __future__ import annotations

import contextlib
import os
import stat
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

__all__ = [
    "TMP_MARKER",
    "atomic_path",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_text",
    "fsync_dir",
    "regular_file",
    "remove_stale_temps",
]

TMP_MARKER = ".vhack-tmp-"


def regular_file(path: str | os.PathLike, what: str) -> Path:
    """`path` as a Path when it names an existing regular file (after symlinks); else ValueError
    naming `what` (e.g. "--basis") and the problem. Never opens the file."""
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ValueError(f"{what}: {path} does not exist") from None
    except OSError as err:
        raise ValueError(f"{what}: cannot read {path}: {err.strerror or err}") from None
    if not stat.S_ISREG(st.st_mode):
        kind = (
            "a directory"
            if stat.S_ISDIR(st.st_mode)
            else "a FIFO (named pipe)"
            if stat.S_ISFIFO(st.st_mode)
            else "a socket"
            if stat.S_ISSOCK(st.st_mode)
            else "a device"
            if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)
            else "not a regular file"
        )
        raise ValueError(f"{what}: {path} is {kind}, not a regular file")
    return path


def _umask_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def fsync_dir(directory: str | os.PathLike) -> None:
    """fsync a directory (makes a rename in it durable); a no-op where directories cannot be
    opened (Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}{TMP_MARKER}{os.getpid()}-{threading.get_ident()}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path beside `path` for a writer that needs a file name (safetensors,
    matplotlib, torch.save); on normal exit the file is fsync'ed, given the umask's mode and
    renamed over `path`. On an exception the temporary file is removed and `path` is untouched."""
    path = Path(path)
    tmp = _temp_name(path)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> None:
    """`write(tmp_path)` writes the whole file; it then replaces `path` atomically."""
    with atomic_path(path) as tmp:
        write(tmp)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Replace `path` with `data`, atomically and durably."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Replace `path` with `text` (UTF-8), atomically and durably."""
    atomic_write_bytes(path, text.encode("utf-8"))


def remove_stale_temps(directory: str | os.PathLike) -> list[Path]:
    """Remove the temporary files a killed writer left in `directory` (not recursive); returns
    them. Only names made by this module are touched. A temp of a live writer in another process
    could be removed too: call this where a run owns the directory (at its start)."""
    directory = Path(directory)
    removed = []
    if not directory.is_dir():
        return removed
    for entry in directory.iterdir():
        if entry.name.startswith(".") and TMP_MARKER in entry.name and entry.is_file():
            with contextlib.suppress(OSError):
                entry.unlink()
                removed.append(entry)
    return removed
