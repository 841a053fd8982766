"""vhack.threads: one torch thread for small models, the cores shared among workers otherwise,
--threads first and OMP_NUM_THREADS respected; the CLI commands apply it and `vhack info` shows it."""

from __future__ import annotations

import json
import os

import pytest
import torch

from vhack import cli
from vhack.cli.train import load_policy
from vhack.threads import (
    SMALL_MODEL_PARAMS,
    available_cores,
    choose_threads,
    env_threads,
    is_small_model,
)

NO_ENV: dict[str, str] = {}


def test_small_models_get_one_thread_larger_ones_the_cores_shared_by_workers():
    assert is_small_model(100_000) and not is_small_model(SMALL_MODEL_PARAMS)
    assert choose_threads(True, cores=16, environ=NO_ENV).threads == 1
    assert choose_threads(False, cores=16, environ=NO_ENV).threads == 16
    assert choose_threads(False, 3, cores=8, environ=NO_ENV).threads == 2  # 6 threads <= 8 cores
    assert choose_threads(False, 4, cores=2, environ=NO_ENV).threads == 1  # never 0
    assert choose_threads(False, environ=NO_ENV).threads == available_cores()


def test_threads_option_wins_then_the_environment():
    env = {"OMP_NUM_THREADS": "3"}
    assert choose_threads(True, requested=4, environ=env).to_dict()["source"] == "--threads"
    choice = choose_threads(True, environ=env)
    assert (choice.threads, choice.source) == (3, "OMP_NUM_THREADS")
    assert env_threads({"MKL_NUM_THREADS": "2"}) == ("MKL_NUM_THREADS", 2)
    for ignored in ("", "0", "-1", "two"):  # as torch ignores them
        assert env_threads({"OMP_NUM_THREADS": ignored}) is None
    with pytest.raises(ValueError, match="workers=0"):
        choose_threads(True, 0)
    with pytest.raises(ValueError, match="threads=0"):
        choose_threads(True, requested=0)


def test_available_cores_is_the_affinity():
    if hasattr(os, "sched_getaffinity"):
        assert available_cores() == len(os.sched_getaffinity(0))


def _train_args(*extra: str):
    return cli.build_parser().parse_args(["train", "--model", "tiny", *extra])


def test_train_runs_the_tiny_model_on_one_thread(monkeypatch):
    """The oversubscription of issue 20: torch's default threads on a tiny model."""
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    torch.set_num_threads(2)
    load_policy(_train_args(), "cpu")
    assert torch.get_num_threads() == 1
    load_policy(_train_args("--threads", "2"), "cpu")
    assert torch.get_num_threads() == 2


def test_an_environment_setting_is_kept(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    torch.set_num_threads(2)
    load_policy(_train_args(), "cpu")
    assert torch.get_num_threads() == 2


@pytest.mark.parametrize("command", ["train", "extract", "validate", "example"])
def test_every_torch_command_has_the_threads_option(command, capsys):
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    assert "--threads THREADS" in capsys.readouterr().out


def test_a_nonpositive_thread_count_is_refused_before_any_work(capsys):
    assert cli.main(["example", "--threads", "0"]) == 2
    assert "--threads 0: pass a positive number of threads" in capsys.readouterr().err


def test_info_shows_the_choice(capsys):
    assert cli.main(["info"]) == 0
    threads = json.loads(capsys.readouterr().out)["threads"]
    assert threads["cores"] == available_cores()
    assert threads["small_model"]["threads"] >= 1 and "demo" in threads
    assert threads["larger_model"]["source"] in ("auto", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
