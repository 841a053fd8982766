"""bench/bench_project.py --smoke runs end to end (so the script cannot rot) and reports what it
measured: every provider's result checked against the reference, a verdict line, JSON and PNG."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_project_smoke(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench_project.py"), "--smoke", "--device", "cpu",
         "--out-dir", str(tmp_path)],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    (path,) = tmp_path.glob("project-smoke-*.json")
    assert path.with_suffix(".png").stat().st_size > 0
    data = json.loads(path.read_text())
    assert data["env"]["device_type"] == "cpu" and "torch" in data["env"]
    providers = {row["provider"] for row in data["rows"]}
    expected = {
        "eager loop",
        "compiled loop",
        "foreach loop",
        "torch (vectorised)",
        "Projector(dict)",
    }
    assert expected <= providers
    for row in data["rows"]:
        assert "error" not in row, row
        assert row["max_abs_err"] < 1e-4, row  # float32 against the float64 reference
        assert row["net_ms"] > 0 and row["floor_bytes"] > 0
        # timed after a cache flush (smoke: 8 MB), with the warm time beside it
        assert row["flush_mb"] == 8 and row["warm_ms"] > 0
        assert row["cold_over_warm"] == pytest.approx(row["net_ms"] / row["warm_ms"])
        assert row["net_ms"] == pytest.approx(row["median_ms"])
    assert "cache flush: 8 MB" in result.stdout and "cache flush: 8 MB" in data["notes"]
    assert any(line.startswith(("PASS", "MISS", "INFO")) for line in result.stdout.splitlines())
