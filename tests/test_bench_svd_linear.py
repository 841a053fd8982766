"""bench/bench_svd_linear.py --smoke runs end to end (so the script cannot rot): table, JSON, PNG."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_svd_linear_smoke(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "0"}  # the CPU bench times the torch backend
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench_svd_linear.py"), "--smoke", "--device",
         "cpu", "--out-dir", str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "fwd_ratio" in proc.stdout and "targets apply to CUDA" in proc.stdout
    (json_path,) = tmp_path.glob("bench_svd_linear-smoke-*.json")
    assert json_path.with_suffix(".png").stat().st_size > 0
    data = json.loads(json_path.read_text())
    assert data["env"]["device_type"] == "cpu"
    providers = {r["provider"] for r in data["rows"] if r.get("phase") != "summary"}
    assert {"dense_fwd", "dense_train", "svd_fwd", "svd_train", "eager_train", "merge",
            "ds_batch", "ds_segments", "merged"} <= providers  # fmt: skip
    summary = data["rows"][-1]["summary"]
    for shape in ("48->80", "80->48"):
        assert summary[shape]["fwd_ratio"] > 0 and summary[shape]["segment_ratio"] > 0
