"""bench/gpu_check.sh, checked on a CPU machine so the few minutes of a lent GPU are not spent on a
typo: the script parses (bash -n), its test selection collects under VHACK_TEST_CUDA=1 without a
GPU, every benchmark flag it passes exists, and without CUDA it stops early with exit status 2
and says why."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.sh"


def _script_array(name: str) -> list[str]:
    """The words of the bash array NAME=(...) in the script."""
    match = re.search(rf"^{name}=\((.*?)\)", SCRIPT.read_text(), re.S | re.M)
    assert match, f"{name}=(...) not found in {SCRIPT}"
    return shlex.split(match[1])


def test_script_parses():
    proc = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "set -euo pipefail" in SCRIPT.read_text()


def test_test_selection_collects_with_the_cuda_switch_on_a_cpu_machine():
    selection = _script_array("REAL_SHAPE_TESTS") + _script_array("KERNEL_TESTS")
    assert "tests/test_gpu_shapes.py" in selection
    for path in selection:
        assert (ROOT / path).is_file(), f"gpu_check.sh names {path}, which does not exist"
    env = {**os.environ, "VHACK_TEST_CUDA": "1"}
    env.pop("TRITON_INTERPRET", None)  # as on the GPU machine
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
         *selection],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    collected = re.search(r"(\d+) tests? collected", proc.stdout)
    assert collected and int(collected[1]) > 100, proc.stdout[-2000:]
    assert "test_gpu_shapes.py::test_projection_of_a_qwen3_4b_adapter" in proc.stdout


@pytest.mark.parametrize("bench", ["project", "svd_linear", "extract"])
def test_benchmark_flags_exist(bench):
    """Each benchmark runs through `vhack bench --only NAME`, with flags `vhack bench` has."""
    text = SCRIPT.read_text().replace("\\\n", " ")
    call = re.search(rf"-m vhack\.cli bench --only {bench}\b([^\n]*)", text)
    assert call, f"gpu_check.sh does not run vhack bench --only {bench}"
    flags = set(re.findall(r"(--[a-z][a-z-]*)", call[1]))
    assert "--out-dir" in flags and "--device" in flags
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run(
        [sys.executable, "-m", "vhack.cli", "bench", "--help"],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    missing = {f for f in flags if f not in proc.stdout}
    assert not missing, f"vhack bench has no {sorted(missing)}"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU exit path")
def test_without_cuda_the_script_stops_with_status_2_and_says_why(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    proc = subprocess.run(
        ["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    (run,) = tmp_path.glob("gpu_check-*")
    summary = (run / "summary.txt").read_text()
    assert "torch sees no CUDA device" in summary
