"""bench/bench_grader.py --smoke runs end to end and stores positive throughputs."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from vhack.sandbox import probe

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.skipif(probe().level != "namespaces", reason="needs the namespace sandbox")
def test_bench_grader_smoke(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench_grader.py"), "--smoke", "--workers", "2",
         "--out-dir", str(tmp_path)],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    (path,) = tmp_path.glob("bench_grader-smoke-*.json")
    data = json.loads(path.read_text())
    assert data["env"]["sandbox_level"] == "namespaces"
    kinds = {(row["what"], row["workers"]) for row in data["rows"]}
    assert kinds == {("sandbox run", 1), ("sandbox run", 2), ("code completion", 1),
                     ("code completion", 2)}  # fmt: skip
    assert all(row["per_second"] > 0 for row in data["rows"])
