"""A GRPO run's files after crashes (issue 17): a truncated or NaN newest checkpoint falls back
to the previous good one with a warning, a torn last history line is dropped with a warning,
what a killed run left is removed on the next run, and a writer killed with SIGKILL at a random
moment leaves a history, a checkpoint and a summary that read cleanly."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch

import vhack
from vhack.grpo.arms import random_basis
from vhack.grpo.checkpoint import read_history, read_latest
from vhack.grpo.config import GRPOConfig
from vhack.grpo.envs.toy import ToyEnv
from vhack.grpo.trainer import GRPOTrainer
from vhack.grpo.warmstart import toy_model

ROOT = Path(__file__).resolve().parents[1]


def trainer(out: Path, steps: int = 2) -> GRPOTrainer:
    model = toy_model(seed=0)
    tok = vhack.models.byte_tokenizer()
    adapter = vhack.wrap(model, targets="all-linear", use_cache=False, progress=False)
    env = ToyEnv()
    zeros = {n: torch.zeros(2, r) for n, r in zip(adapter.names, adapter.ranks, strict=True)}
    basis = random_basis(zeros, seed=7)  # any orthonormal basis: extraction is not tested here
    cfg = GRPOConfig(
        steps=steps, prompts_per_step=2, num_generations=4, k=2, top_k=2, checkpoint_every=1
    )
    return GRPOTrainer(adapter, tok, env, cfg, hack_basis=basis, out_dir=out)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("trained") / "run"
    trainer(out).train()
    return out


@pytest.fixture
def run_dir(trained, tmp_path):
    """A run directory after 2 steps: checkpoint-0000001, checkpoint-0000002, 2 history lines
    (a copy of one trained once per module)."""
    return Path(shutil.copytree(trained, tmp_path / "run"))


def test_a_truncated_newest_checkpoint_falls_back_to_the_previous(run_dir):
    state = run_dir / "checkpoint-0000002" / "state.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])  # a full disk
    t = trainer(run_dir)
    with pytest.warns(UserWarning, match="skipping checkpoint .*checkpoint-0000002"):
        assert t.load_checkpoint(run_dir) == 1
    assert [r["step"] for r in read_history(run_dir / "history.jsonl")] == [0]


def test_a_checkpoint_whose_ds_is_nan_is_skipped(run_dir):
    path = run_dir / "checkpoint-0000002" / "delta.safetensors"
    delta = safetensors.torch.load_file(str(path))
    name = next(iter(delta))
    delta[name][0] = float("nan")
    safetensors.torch.save_file(delta, str(path))
    t = trainer(run_dir)
    with pytest.warns(UserWarning, match="NaN/inf"):
        assert t.load_checkpoint(run_dir) == 1
    assert bool(t.adapter.delta.isfinite().all())


def test_a_torn_last_history_line_is_dropped_with_a_warning(run_dir):
    log = run_dir / "history.jsonl"
    with open(log, "a") as f:
        f.write('{"step": 2, "rew')  # killed mid-write
    with pytest.warns(UserWarning, match="torn last line"):
        assert [r["step"] for r in read_history(log)] == [0, 1]
    t = trainer(run_dir, steps=3)
    with pytest.warns(UserWarning, match="torn last line"):
        assert t.load_checkpoint(run_dir) == 2
    t.train()
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [0, 1, 2]


def test_what_a_killed_run_left_is_removed_on_the_next_run(run_dir):
    stale_dir = run_dir / ".checkpoint-0000003.tmp4242"
    stale_dir.mkdir()
    (stale_dir / "state.pt").write_bytes(b"half")
    stale_file = run_dir / ".history.jsonl.vhack-tmp-4242-1"
    stale_file.write_text("half")
    t = trainer(run_dir, steps=3)
    t.load_checkpoint(run_dir)
    t.train()
    assert not stale_dir.exists() and not stale_file.exists()
    assert sorted(p.name for p in run_dir.iterdir() if p.name.startswith(".")) == []


WRITER = """
import json, sys, torch
from vhack.files import atomic_write_text
from vhack.grpo.checkpoint import history_writer, write_checkpoint
out = sys.argv[1]
delta = {"a": torch.randn(20000), "b": torch.randn(5000)}
with history_writer(out + "/history.jsonl") as append:
    for step in range(10**6):
        append({"step": step, "pad": "x" * 50000})
        write_checkpoint(out, step, delta, {"step": step, "blob": torch.randn(50000)})
        atomic_write_text(out + "/summary.json", json.dumps({"step": step, "pad": "y" * 200000}))
        if step == 1:
            print("ready", flush=True)
"""


@pytest.mark.parametrize("attempt", [0, 1])
def test_files_read_cleanly_after_a_kill_9_at_a_random_moment(tmp_path, attempt):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(tmp_path)], stdout=subprocess.PIPE, env=env
    )
    try:
        assert proc.stdout.readline().strip() == b"ready"
        time.sleep(random.Random(attempt).uniform(0.05, 0.6))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    records = read_history(tmp_path / "history.jsonl")  # may warn about a torn last line
    steps = [r["step"] for r in records]
    assert steps == list(range(len(steps))) and len(steps) >= 2
    _, delta, state = read_latest(tmp_path)
    assert state["step"] in (steps[-1], steps[-1] - 1) and set(delta) == {"a", "b"}
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["step"] in (steps[-1], steps[-1] - 1)
