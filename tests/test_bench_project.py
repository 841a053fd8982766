"""bench/bench_project.py --smoke runs end to end (so the script cannot rot) and reports what it
measured: every provider's result checked against the reference, a verdict line, JSON and PNG."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

import vhack

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
    # the floor is measured in the same run (a streaming pass over the same bytes), and so is the
    # load the machine was under
    assert all(row["stream_floor_ms"] > 0 and row["floor_bw_ms"] > 0 for row in data["rows"])
    assert len(data["load"]["start"]) == 3 and len(data["load"]["end"]) == 3
    if vhack.ops.backends()["cpp"]:
        # headline ratios: eager loop, cpp and floor timed in interleaved rounds, per k
        assert sorted(r["k"] for r in data["ratios"]) == [5, 12]
        for rat in data["ratios"]:
            assert rat["provider"] == "cpp" and len(rat["rounds"]) == 2
            for rnd in rat["rounds"]:
                assert rnd["x_eager"] == pytest.approx(rnd["eager loop"] / rnd["cpp"])
                floors = [v for name, v in rnd.items() if name.startswith("floor (")]
                assert "floor (all threads)" in rnd and rnd["floor_ms"] == min(floors)
                assert rnd["x_floor"] == pytest.approx(rnd["cpp"] / rnd["floor_ms"])
                assert len(rnd["load_before"]) == 3
            lo, mid, hi = (rat["x_eager"][key] for key in ("min", "median", "max"))
            assert lo <= mid <= hi
        verdict_lines = [line for line in result.stdout.splitlines() if "the eager loop" in line]
        assert len(verdict_lines) == 2 and all("rounds" in line for line in verdict_lines)
        assert sum("streaming floor" in line for line in result.stdout.splitlines()) == 2
    assert any(line.startswith(("PASS", "MISS", "INFO")) for line in result.stdout.splitlines())
