"""The examples in examples/ run: the plain loop and the HF Trainer in this process, the data-parallel
one under torchrun (2 CPU processes, DDP), the TRL one under `accelerate launch` (2 CPU processes,
statistics and dS identical on the ranks)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from _dist import free_port

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _launch(cmd: list[str], timeout: float = 300) -> None:
    """Run a launcher in its own process group; on a timeout the whole group (the launcher and
    its ranks) is killed, and what they printed is shown."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(
            f"{' '.join(cmd)} timed out after {timeout} s:\n{out[-3000:]}\n{err[-6000:]}"
        ) from None
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{out[-3000:]}\n{err[-6000:]}"


def test_plain_loop_example():
    history = _load("plain_loop").main(["--steps", "2"])
    assert len(history) == 2
    assert all(h["cin_mean"] > 0.01 and h["norm_after"] < h["norm_before"] for h in history)


def test_hf_trainer_example(tmp_path):
    logs = _load("hf_trainer").main(["--steps", "2", "--output-dir", str(tmp_path)])
    train = [r for r in logs if "loss" in r]
    assert len(train) == 2 and all(r["vhack/cin_mean"] > 0.01 for r in train)


@pytest.mark.slow
def test_data_parallel_example_under_torchrun(tmp_path):
    _launch(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
         "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
         "examples/data_parallel.py", "--setup", "ddp", "--steps", "2", "--stats-out", str(tmp_path)]
    )  # fmt: skip
    ranks = [json.loads((tmp_path / f"rank{i}.json").read_text())["history"] for i in (0, 1)]
    assert len(ranks[0]) == 2 and ranks[0] == ranks[1]
    assert ranks[0][0]["cin_mean"] > 0.01


@pytest.mark.slow
def test_trl_example_under_accelerate_launch_with_two_cpu_processes(tmp_path):
    pytest.importorskip("trl", reason="TRL is not installed (pip install 'vhack-kernels[trl]')")
    # --multi_gpu selects accelerate's torchrun launcher; on a machine without GPUs the
    # processes run on CPU (use_cpu=True) over gloo. (--cpu would launch through mpirun.)
    _launch(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
         "--main_process_port", str(free_port()),
         "examples/trl_grpo.py", "--steps", "2", "--stats-out", str(tmp_path)]
    )  # fmt: skip
    ranks = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in (0, 1)]
    logs = [[r for r in rank["log_history"] if "loss" in r] for rank in ranks]
    assert len(logs[0]) == 2
    for a, b in zip(*logs, strict=True):
        for key in ("vhack/cin_mean", "vhack/fired", "vhack/energy_removed", "kl", "reward"):
            assert a[key] == b[key], (key, a[key], b[key])
    assert any(r["vhack/cin_mean"] > 0 for r in logs[0])
    assert ranks[0]["delta"] == ranks[1]["delta"]  # DDP kept dS identical on the ranks


def test_readme_trainer_snippets_run(tmp_path, monkeypatch):
    """The three snippets of the README's "Use it in your trainer" run, in order, in one namespace."""
    pytest.importorskip("trl", reason="TRL is not installed (pip install 'vhack-kernels[trl]')")
    text = (ROOT / "README.md").read_text()
    section = text.split("## Use it in your trainer", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)\n```", section, flags=re.S)
    assert len(blocks) == 3
    monkeypatch.chdir(tmp_path)  # the snippets write to ./out
    namespace: dict = {}
    for i, block in enumerate(blocks):
        exec(compile(block, f"README trainer snippet {i + 1}", "exec"), namespace)
    logs = namespace["trainer"].state.log_history
    assert any("vhack/cin_mean" in r for r in logs) and any("kl" in r for r in logs), logs
