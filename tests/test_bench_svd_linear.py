"""bench/bench_svd_linear.py --smoke runs end to end (so the script cannot rot): table, JSON, PNG."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(*args, timeout=300):
    env = {**os.environ, "TRITON_INTERPRET": "0"}  # the CPU bench times the torch backend
    return subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench_svd_linear.py"), *args],
        capture_output=True, text=True, env=env, timeout=timeout, check=False,
    )  # fmt: skip


def test_bench_svd_linear_smoke(tmp_path):
    proc = _run("--smoke", "--device", "cpu", "--out-dir", str(tmp_path),
                "--tokens-per-step", "64", "4096")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "fwd_ratio" in proc.stdout and "targets apply to CUDA" in proc.stdout
    (json_path,) = tmp_path.glob("bench_svd_linear-smoke-*.json")
    assert json_path.with_suffix(".png").stat().st_size > 0
    data = json.loads(json_path.read_text())
    assert data["env"]["device_type"] == "cpu"
    providers = {r["provider"] for r in data["rows"] if r.get("phase") != "summary"}
    assert {"dense_fwd", "dense_train", "svd_fwd", "svd_train", "eager_train", "merge",
            "ds_batch", "ds_segments", "merged", "compiled_fwd", "compiled_train"} <= providers  # fmt: skip
    summary = data["rows"][-1]["summary"]
    for shape in ("48->80", "80->48"):
        assert summary[shape]["fwd_ratio"] > 0 and summary[shape]["segment_ratio"] > 0
        assert summary[shape]["compiled_speedup"] > 0  # torch.compile of the eager path

    # The per-step merge, amortised at the stated tokens per step, beside the cached ratios:
    # recomputed here from the stored per-provider medians.
    assert "amortised at S tokens per step" in proc.stdout
    for shape in ("48->80", "80->48"):
        s = summary[shape]
        ms = {
            r["provider"]: r["median_ms"]
            for r in data["rows"]
            if r.get("shape") == shape and r.get("phase") in ("fwd", "train", "other")
        }
        T = 64
        assert s["merge_over_fwd"] == pytest.approx(ms["merge"] / ms["svd_fwd"], rel=1e-9)
        assert [a["tokens_per_step"] for a in s["amortised"]] == [64, 4096]
        for a in s["amortised"]:
            share = ms["merge"] * T / a["tokens_per_step"]
            assert a["merge_ms_per_call"] == pytest.approx(share, rel=1e-9)
            fwd = (ms["svd_fwd"] + share) / ms["dense_fwd"]
            train = (ms["svd_train"] + share) / ms["dense_train"]
            assert a["fwd_ratio"] == pytest.approx(fwd, rel=1e-9)
            assert a["train_ratio"] == pytest.approx(train, rel=1e-9)
            assert a["eager_speedup"] == pytest.approx(
                ms["eager_train"] / (ms["svd_train"] + share), rel=1e-9
            )
            assert a["eager_fwd_speedup"] == pytest.approx(
                ms["eager_fwd"] / (ms["svd_fwd"] + share), rel=1e-9
            )
            assert a["fwd_ratio"] > s["fwd_ratio"] and a["train_ratio"] > s["train_ratio"]
        # one merge per 64-token call costs at least as much as one per 4096 tokens
        assert s["amortised"][0]["fwd_ratio"] >= s["amortised"][1]["fwd_ratio"]
    assert "amortised" in data["notes"] and "eager = the research code" in data["notes"]


def test_bench_svd_linear_rejects_fewer_tokens_per_step_than_tokens(tmp_path):
    proc = _run("--smoke", "--tokens", "64", "--tokens-per-step", "32", "--out-dir",
                str(tmp_path), timeout=120)  # fmt: skip
    assert proc.returncode == 2
    assert "--tokens-per-step [32] is below --tokens 64" in proc.stderr
    assert not list(tmp_path.iterdir())
