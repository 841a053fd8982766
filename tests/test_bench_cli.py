"""`vhack bench`: runs the three benchmarks (--quick), writes a summary JSON with device, versions,
date, load and ratios, and PNGs; reads the stored results' layouts and compares like with like;
says how to get bench/ when the installation has none."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import vhack
from vhack import cli

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"

_spec = importlib.util.spec_from_file_location("vhack_bench_suite", ROOT / "bench" / "suite.py")
suite = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = suite
_spec.loader.exec_module(suite)


def test_quick_run_writes_the_summary_and_plots(tmp_path):
    # The installed console script, run from the clone's root (it finds ./bench there): the same
    # vhack as this test process, compiled extension included (`python -m` would put the
    # checkout first on sys.path, and a checkout after a plain install has no vhack._C).
    exe = shutil.which("vhack")
    assert exe, "the vhack console script is not on PATH: install the package (see README)"
    proc = subprocess.run(
        [exe, "bench", "--quick", "--device", "cpu", "--out-dir", str(tmp_path)],
        capture_output=True, text=True, cwd=ROOT, timeout=400,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (path,) = tmp_path.glob("bench-quick-*.json")
    assert path.with_suffix(".png").stat().st_size > 0
    summary = json.loads(path.read_text())
    env = summary["env"]
    assert env["device_type"] == "cpu" and "(1 threads)" in env["device"]  # --quick: 1 thread
    assert {"torch", "vhack", "date", "python"} <= set(env) and env["omp_num_threads"] == "1"
    assert env["load"]["cores"] >= 1 and env["load"]["before"] is not None
    assert summary["quick"] is True
    benchmarks = summary["benchmarks"]
    assert set(benchmarks) == {"project", "svd_linear", "extract"}
    for name, record in benchmarks.items():
        assert record["rc"] == 0 and "error" not in record, (name, record)
        result = tmp_path / record["file"]  # relative to the summary
        assert result.is_file() and result.with_suffix(".png").stat().st_size > 0
        assert record["load_before"] is not None and record["wall_s"] > 0
        assert all(v > 0 for v in record["ratios"].values()), (name, record["ratios"])
        assert "--smoke" in record["command"]
        assert summary["comparison"][name] is None or "file" in summary["comparison"][name]
    project = benchmarks["project"]["ratios"]
    assert project["k=5/eager loop/vs_eager"] == 1.0 and "k=12/cpp/x_bytes_floor" in project
    assert not any("compiled" in key for key in project)  # --quick: no torch.compile
    svd = benchmarks["svd_linear"]["ratios"]
    assert {"48->80/fwd_ratio", "48->80/train_ratio", "48->80/eager_speedup",
            "48->80/4096 tokens per step/train_ratio", "48->80/train_flop_floor"} <= set(svd)  # fmt: skip
    assert benchmarks["extract"]["ratios"]["toy/loop/vs_loop"] == 1.0
    assert "wrote " in proc.stdout
    for name in benchmarks:  # each compared with a stored quick result of this CPU, or says none
        assert f"{name}: no stored result of this device" in proc.stdout or (
            f"{name}: now against" in proc.stdout
        )


def test_ratios_read_the_stored_result_files():
    """The layouts in bench/results (what a run is compared with) are read as written."""
    project = json.loads((RESULTS / "project-amd-epyc-2-threads-2026-12-02.json").read_text())
    ratios = suite.project_ratios(project)
    cpp = next(r for r in project["rows"] if r["k"] == 5 and r["provider"] == "cpp")
    assert ratios["k=5/cpp/vs_eager"] == cpp["speedup_vs_eager"]
    assert ratios["k=5/cpp/x_bytes_floor"] == cpp["x_floor"]
    new = json.loads(
        (RESULTS / "project-intel-r-xeon-r-processor-2-threads-2026-12-03.json").read_text()
    )
    cpp_new = next(r for r in new["rows"] if r["k"] == 5 and r["provider"] == "cpp")
    assert suite.project_ratios(new)["k=5/cpp/x_bytes_floor"] == cpp_new["x_stream_floor"]
    compiled = min(
        r["net_ms"] for r in project["rows"] if r["k"] == 5 and r["provider"].startswith("compiled")
    )
    assert ratios["k=5/cpp/vs_compiled"] == pytest.approx(compiled / cpp["net_ms"])
    svd = json.loads((RESULTS / "bench_svd_linear-amd-epyc-2-threads-2026-12-02.json").read_text())
    shape = suite.svd_linear_ratios(svd)
    summary = svd["rows"][-1]["summary"]["2560->4096"]
    assert shape["2560->4096/train_ratio"] == summary["train_ratio"]
    assert shape["2560->4096/train_flop_floor"] == pytest.approx(
        (2 + summary["ds_floor_vs_dw"]) / 3
    )
    extract = json.loads((RESULTS / "bench_extract-amd-epyc-2-threads-2026-11-24.json").read_text())
    assert suite.extract_ratios(extract)["toy/loop/vs_loop"] == 1.0


def _result(device: str, date: str, speedup: float) -> dict:
    rows = [{"pairset": "toy", "setting": "loop", "speedup_vs_loop": 1.0},
            {"pairset": "toy", "setting": "auto (shared)", "speedup_vs_loop": speedup}]  # fmt: skip
    return {"env": {"device": device, "device_type": "cpu", "date": date}, "rows": rows}


def test_compare_takes_the_newest_stored_result_of_the_same_device():
    stored = [
        (Path("old.json"), _result("cpu A (2 threads)", "2026-11-01T00:00:00+00:00", 4.0)),
        (Path("new.json"), _result("cpu A (2 threads)", "2026-12-01T00:00:00+00:00", 5.0)),
        (Path("other.json"), _result("cpu B (2 threads)", "2026-12-02T00:00:00+00:00", 9.0)),
    ]
    now = _result("cpu A (2 threads)", "2026-12-03T00:00:00+00:00", 6.0)
    got = suite.compare("extract", now, stored)
    assert got["file"] == "new.json"
    assert got["ratios"]["toy/auto (shared)/vs_loop"] == {
        "now": 6.0,
        "stored": 5.0,
        "now_over_stored": pytest.approx(1.2),
    }
    assert suite.compare("extract", _result("cpu C", "2026-12-03", 6.0), stored) is None


def test_stored_results_keep_quick_and_full_runs_apart(tmp_path):
    for name in ("bench_extract-cpu-2026-12-01", "bench_extract-smoke-cpu-2026-12-01"):
        (tmp_path / f"{name}.json").write_text(json.dumps(_result("cpu", "2026-12-01", 5.0)))
    (tmp_path / "bench_extract-broken-2026-12-01.json").write_text("{")
    full = [p.name for p, _ in suite.stored_results(tmp_path, "extract", quick=False)]
    quick = [p.name for p, _ in suite.stored_results(tmp_path, "extract", quick=True)]
    assert full == ["bench_extract-cpu-2026-12-01.json"]
    assert quick == ["bench_extract-smoke-cpu-2026-12-01.json"]


def test_quick_mode_passes_smoke_sizes_and_no_compile(tmp_path):
    opts = suite.SuiteOptions("cpu", True, ("project",), tmp_path, (5,), None, 1, True, False)
    assert suite.script_args("project", opts) == [
        "--device", "cpu", "--out-dir", str(tmp_path), "--smoke", "--ks", "5", "--no-compile"
    ]  # fmt: skip
    env = suite.script_env(2)
    assert env["OMP_NUM_THREADS"] == "2" and "TRITON_INTERPRET" not in env
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(Path(vhack.__file__).parents[1])


def test_without_bench_dir_it_says_how_to_get_one(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(vhack, "__file__", str(tmp_path / "site" / "vhack" / "__init__.py"))
    monkeypatch.chdir(tmp_path)
    assert cli.main(["bench", "--quick"]) == 2
    err = capsys.readouterr().err
    assert "vhack bench: error: the benchmarks live in the repository's bench/" in err
    assert "--bench-dir" in err
    assert cli.main(["bench", "--bench-dir", str(tmp_path)]) == 2
    assert f"--bench-dir {tmp_path}: holds no suite.py" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--only", "project,nope"], "--only project,nope: choose from project,svd_linear,extract"),
        (["--ks", "0"], "--ks 0: pass positive numbers of rows"),
    ],
)
def test_bad_options_are_refused_before_any_work(argv, message, capsys):
    assert cli.main(["bench", *argv]) == 2
    assert message in capsys.readouterr().err
