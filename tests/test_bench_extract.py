"""bench/bench_extract.py runs (--smoke), so the script cannot rot."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_extract_smoke(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "bench_extract.py"),
            "--smoke",
            "--threads",
            "1",
            "--out-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "toy: best " in result.stdout and "auto (shared)" in result.stdout
    (path,) = tmp_path.glob("bench_extract-smoke-*.json")
    data = json.loads(path.read_text())
    assert {r["method"] for r in data["rows"]} == {"loop", "batched", "shared", "auto"}
    assert all(r["diff_rel_vs_loop"] < 1e-4 for r in data["rows"])
    assert data["env"]["device_type"] == "cpu"
    assert path.with_suffix(".png").stat().st_size > 0
