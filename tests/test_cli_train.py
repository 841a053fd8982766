"""`vhack train` under bad input and reruns (issue 17): every user error is one line, exit 2,
before any model load; a resume refuses other settings and names them; --overwrite removes the
old run's checkpoints before the new run writes."""

from __future__ import annotations

import json
import os

import pytest
from helpers import assert_one_line_error

import vhack
from vhack import cli
from vhack.grpo import warmstart

SMALL = ["--model", "tiny", "--steps", "3", "--prompts-per-step", "2", "--group-size", "2"]
SMALL += ["--max-new-tokens", "4", "--top-k", "2", "--k", "2", "--quiet", "--device", "cpu"]


def run_cli(argv, capsys) -> tuple[int, str]:
    try:
        rc = cli.main([str(a) for a in argv])
    except SystemExit as exc:
        rc = exc.code
    return rc, capsys.readouterr().err


@pytest.fixture
def no_model_load(monkeypatch):
    def load(*args, **kwargs):
        pytest.fail("vhack train loaded a model before checking its arguments")

    monkeypatch.setattr(vhack.models, "load", load)
    monkeypatch.setattr(warmstart, "warm_model", load)


@pytest.fixture
def files(tmp_path, scaled_basis):
    plain = tmp_path / "plain"
    plain.write_text("x\n")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes(b'{"prompt": "caf\xe9", "hack": "a", "clean": "b"}\n')
    return {
        "tmp": tmp_path,
        "plain": plain,
        "fifo": fifo,
        "latin1": latin1,
        "scaled": scaled_basis,
    }


@pytest.fixture(scope="module")
def scaled_basis(tmp_path_factory):
    """A tiny-model basis file whose orthonormal rows are scaled x1.5 (a Projector refuses it)."""
    model, tok = vhack.models.load("tiny")
    adapter = vhack.wrap(model, use_cache=False, progress=False)
    basis = vhack.extract(adapter, tok, vhack.builtin_pairs("toy"), top_k=2, progress=False)
    scaled = vhack.HackBasis(
        {n: 1.5 * basis.V(n) for n in basis.names},
        {n: basis.sv(n) for n in basis.names},
        basis.metadata,
    )
    path = tmp_path_factory.mktemp("scaled") / "scaled.safetensors"
    scaled.save(path)
    return path


ERRORS = [
    (["--out", "{plain}"], ["--out", "not a directory"]),
    (["--out", "{plain}/run"], ["--out", "is a file, not a directory"]),
    (["--device", "bogus"], ["--device bogus"]),
    (["--targets", "q_proj,,v_proj"], ["--targets", "comma-separated module names"]),
    (["--pairs", "{tmp}/missing.jsonl"], ["--pairs", "missing.jsonl"]),
    (["--pairs", "{latin1}"], ["--pairs", "not UTF-8"]),
    (["--pairs", "{fifo}"], ["--pairs"]),
    (["--basis", "{fifo}"], ["--basis", "FIFO"]),
    (["--basis", "{scaled}", "--k", "2", "--top-k", "2"], ["--basis", "orthonormal"]),
    (["--basis", "{scaled}"], ["--basis", "stores 2 axes", "--k <= 2"]),
    (["--k", "20", "--top-k", "20"], ["--top-k 20", "12 pairs", "at most 12 axes"]),
    (["--lr", "inf"], ["--lr", "finite"]),
    (["--temperature", "inf"], ["--temperature", "finite"]),
    (["--marker-reward", "nan"], ["--marker-reward", "finite"]),
    (["--lr", "-1"], ["lr (--lr)", "> 0"]),
    (["--model", "toy", "--dtype", "bfloat16"], ["--dtype bfloat16", "float32"]),
    (["--dtype", "float64"], ["--dtype", "invalid choice"]),
    (["--resume", "--overwrite"], ["--resume", "--overwrite"]),
]


@pytest.mark.parametrize(("argv", "fragments"), ERRORS, ids=lambda v: " ".join(v))
def test_train_user_errors_are_one_line_before_any_model_load(
    argv, fragments, files, no_model_load, capsys
):
    argv = [a.format(**files) for a in argv]
    if "--out" not in argv:
        argv += ["--out", str(files["tmp"] / "run")]
    rc, err = run_cli(["train", "--model", "tiny", *argv], capsys)
    assert_one_line_error(rc, err, "train", *fragments)


def test_unknown_targets_are_one_line_before_extraction(tmp_path, monkeypatch, capsys):
    def extract(*args, **kwargs):
        pytest.fail("vhack train extracted a basis before checking --targets")

    monkeypatch.setattr(vhack, "extract", extract)
    rc, err = run_cli(["train", *SMALL, "--targets", "nope", "--out", tmp_path / "r"], capsys)
    assert_one_line_error(rc, err, "train", "--targets nope", "matched no module")


def history_steps(out) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "history.jsonl").read_text().splitlines()]


def test_resume_refuses_other_settings_and_names_them(tmp_path, capsys):
    out = tmp_path / "run"
    rc, err = run_cli(["train", *SMALL, "--checkpoint-every", "1", "--out", out], capsys)
    assert rc == 0, err
    changes = [
        (["--env", "code"], "--env: 'toy' -> 'code'"),
        (["--marker-reward", "2.0"], "--marker-reward: 1.2 -> 2.0"),
        (["--targets", "q_proj"], "--targets: 'all-linear' -> 'q_proj'"),
        (["--lr", "0.5"], "lr: 0.01 -> 0.5"),
        (["--arm", "vanilla"], "arm: 'projected' -> 'vanilla'"),
    ]
    for extra, fragment in changes:
        argv = ["train", *SMALL, "--checkpoint-every", "1", "--out", out, "--resume", *extra]
        rc, err = run_cli(argv, capsys)
        assert_one_line_error(rc, err, "train", "--resume", fragment)
    assert history_steps(out) == [0, 1, 2]
    # the run's own settings (a longer --steps is allowed) continue it
    argv = ["train", *SMALL, "--checkpoint-every", "1", "--out", out, "--resume", "--steps", "4"]
    rc, err = run_cli(argv, capsys)
    assert rc == 0, err
    assert history_steps(out) == [0, 1, 2, 3]


def test_overwrite_removes_the_old_runs_checkpoints(tmp_path, capsys):
    out = tmp_path / "run"
    (out / "notes").mkdir(parents=True)  # not the run's: left alone
    argv = ["train", *SMALL, "--checkpoint-every", "1", "--out", out]
    assert run_cli([*argv, "--steps", "5"], capsys)[0] == 0  # checkpoints 4 and 5
    rc, err = run_cli([*argv, "--steps", "1", "--overwrite"], capsys)
    assert rc == 0, err
    names = sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint-"))
    assert names == ["checkpoint-0000001"]
    assert history_steps(out) == [0]
    rc, err = run_cli([*argv, "--steps", "2", "--resume"], capsys)
    assert rc == 0, err
    assert history_steps(out) == [0, 1]  # the new run continued, not the old one
    assert (out / "notes").is_dir()


def test_a_train_run_killed_mid_run_resumes(tmp_path, capsys):
    """kill -9 of a real `vhack train` once it has checkpointed, at a random point of a later
    step; `--resume` continues from the newest readable checkpoint, every step logged once."""
    import random
    import signal
    import subprocess
    import sys
    import time
    import warnings
    from pathlib import Path

    from vhack.grpo.checkpoint import read_history

    out = tmp_path / "run"
    argv = [*SMALL, "--checkpoint-every", "1", "--out", str(out)]
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "vhack", "train", *argv, "--steps", "400"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while not (out / "checkpoint-0000002").exists() and proc.poll() is None:
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.05)
        time.sleep(random.uniform(0.0, 0.5))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a torn last line is dropped with a warning
        done = len(read_history(out / "history.jsonl"))
    assert done >= 2
    rc, err = run_cli(["train", *argv, "--resume", "--steps", str(done + 2)], capsys)
    assert rc == 0, err
    assert history_steps(out) == list(range(done + 2))
    assert not [p for p in out.iterdir() if ".tmp" in p.name]
