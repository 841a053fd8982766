"""vhack.files: a write killed at any point leaves the old file or the new one, never a torn one."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vhack.files import TMP_MARKER, atomic_write_text, remove_stale_temps

ROOT = Path(__file__).resolve().parents[1]

# loads vhack/files.py alone (importing the vhack package would start torch: seconds per run)
WRITER = """
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("atomic", sys.argv[2])
atomic = importlib.util.module_from_spec(spec)
spec.loader.exec_module(atomic)
atomic_write_text = atomic.atomic_write_text
path = sys.argv[1]
print("ready", flush=True)
i = 0
while True:
    i += 1
    atomic_write_text(path, json.dumps({"i": i, "pad": "x" * (1 << 20)}))
"""


def test_kill_9_at_any_point_leaves_a_complete_file(tmp_path):
    target = tmp_path / "summary.json"
    atomic_write_text(target, json.dumps({"i": 0, "pad": ""}))
    seen = set()
    for delay in (0.05, 0.13, 0.21, 0.34, 0.55):
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(target), str(ROOT / "vhack" / "files.py")],
            stdout=subprocess.PIPE,
        )
        assert proc.stdout.readline().strip() == b"ready"  # imports done (slow on a busy box)
        time.sleep(delay)  # somewhere inside a write
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        record = json.loads(target.read_text())  # never torn: always parses
        assert record["i"] == 0 or len(record["pad"]) == 1 << 20
        seen.add(record["i"])
        remove_stale_temps(tmp_path)
        assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]
    assert seen != {0}, "the writer never completed a write: the test did not exercise it"


def test_failed_write_leaves_the_old_file_and_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "config.json"
    atomic_write_text(target, "old")

    def boom(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="No space"):
        atomic_write_text(target, "new")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]


def test_mode_follows_the_umask_and_stale_temps_only_ours(tmp_path):
    old = os.umask(0o027)
    try:
        atomic_write_text(tmp_path / "a.json", "{}")
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o640
    ours = tmp_path / f".a.json{TMP_MARKER}123-456"
    theirs = tmp_path / ".hidden.tmp"
    ours.write_text("partial")
    theirs.write_text("a user's file")
    assert remove_stale_temps(tmp_path) == [ours]
    assert theirs.exists() and not ours.exists()


@pytest.fixture
def fifo(tmp_path):
    path = tmp_path / "pipe"
    os.mkfifo(path)
    # Opening a FIFO for reading blocks until a writer appears: fail instead of hanging the suite.
    old = signal.signal(signal.SIGALRM, lambda *a: pytest.fail("blocked on a FIFO"))
    signal.alarm(10)
    yield path
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def test_basis_and_pairs_refuse_a_fifo_without_blocking(fifo):
    import vhack

    with pytest.raises(ValueError, match="FIFO"):
        vhack.HackBasis.load(fifo)
    with pytest.raises(ValueError, match="FIFO"):
        vhack.load_pairs(fifo)


def test_pairs_refuse_a_directory_and_non_utf8(tmp_path):
    import vhack

    with pytest.raises(ValueError, match="directory"):
        vhack.load_pairs(tmp_path)
    bad = tmp_path / "pairs.jsonl"
    bad.write_bytes(b'{"prompt": "a", "hack": "b", "clean": "c"}\n{"prompt": "\xff\xfe"}\n')
    with pytest.raises(ValueError, match=r"line 2: not UTF-8"):
        vhack.load_pairs(bad)
