"""Bad input to the GRPO loop, `vhack train` and `vhack demo`: one clear UsageError (exit 2 from
the CLI) before any work starts."""

from __future__ import annotations

import json

import pytest
import torch

import vhack
from vhack.cli import main
from vhack.errors import UsageError
from vhack.grpo.config import ARMS, GRPOConfig
from vhack.grpo.envs.toy import ToyEnv
from vhack.grpo.trainer import GRPOTrainer
from vhack.grpo.warmstart import toy_model


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"arm": "sideways"}, "unknown arm 'sideways'"),
        ({"num_generations": 1}, r"num_generations \(--group-size\) must be an integer >= 2"),
        ({"steps": 0}, r"steps \(--steps\) must be an integer >= 1"),
        ({"num_iterations": 0}, "num_iterations"),
        ({"k": 7, "top_k": 6}, "k=7"),
        ({"lr": 0.0}, r"lr \(--lr\) must be a finite number > 0"),
        ({"lr": float("inf")}, r"lr \(--lr\) must be a finite number > 0, got inf"),
        ({"temperature": float("inf")}, r"temperature \(--temperature\) must be a finite"),
        ({"beta": -1.0}, r"beta \(--beta\) must be a finite number >= 0"),
        ({"beta": float("nan")}, "beta"),
        ({"max_grad_norm": float("inf")}, r"max_grad_norm \(--max-grad-norm\)"),
        ({"kl_clamp": float("inf")}, "kl_clamp must be a finite number > 0"),
        ({"top_p": 0.0}, "top_p"),
        ({"scale_rewards": "batch"}, "scale_rewards"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
    ],
)
def test_config_rejects_bad_fields(fields, message):
    with pytest.raises(UsageError, match=message):
        GRPOConfig(**fields)


def test_config_round_trips_and_knows_every_arm():
    for arm in ARMS:
        cfg = GRPOConfig(arm=arm, beta=0.5 if arm == "kl" else 0.0)  # kl: the penalty alone
        assert GRPOConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(UsageError, match="unknown GRPOConfig fields"):
        GRPOConfig.from_dict({"arms": "vanilla"})


def test_tokens_beyond_the_models_positions_fail_before_any_step():
    model = toy_model(seed=0)  # 64 positions
    tok = vhack.models.byte_tokenizer()
    adapter = vhack.wrap(model, targets="all-linear", use_cache=False, progress=False)
    basis = {n: torch.eye(r)[:2] for n, r in zip(adapter.names, adapter.ranks, strict=True)}
    with pytest.raises(UsageError, match="exceed the model's 64 positions"):
        GRPOTrainer(adapter, tok, ToyEnv(), GRPOConfig(max_new_tokens=60), hack_basis=basis)
    assert torch.count_nonzero(adapter.delta) == 0


def one_line_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_train_cli_bad_names(capsys, tmp_path):
    out = str(tmp_path / "run")
    assert "unknown arm 'bogus'" in one_line_error(
        capsys, ["train", "--arm", "bogus", "--out", out]
    )
    assert "unknown environment 'nope'" in one_line_error(
        capsys, ["train", "--env", "nope", "--out", out]
    )
    assert "num_generations (--group-size) must be" in one_line_error(
        capsys, ["train", "--group-size", "1", "--out", out]
    )
    assert "no such file" in one_line_error(
        capsys, ["train", "--basis", str(tmp_path / "missing.safetensors"), "--out", out]
    )
    assert "no checkpoint" in one_line_error(capsys, ["train", "--resume", "--out", out])


@pytest.mark.parametrize("source", ["toy", "tiny-seed1"])
def test_train_cli_rejects_a_basis_from_another_model(capsys, tmp_path, source):
    # a basis of the toy model (other shapes) or of the tiny model with other weights (seed 1),
    # given to the tiny model of seed 0
    tok = vhack.models.byte_tokenizer()
    model = toy_model(seed=0) if source == "toy" else vhack.models.tiny_model(seed=1)
    adapter = vhack.wrap(model, targets="all-linear", use_cache=False, progress=False)
    basis = vhack.extract(adapter, tok, ToyEnv().hack_pairs(), top_k=2, n_heldout=0, progress=False)
    path = basis.save(tmp_path / "other_basis.safetensors")
    err = one_line_error(
        capsys,
        [
            "train",
            "--model",
            "tiny",
            "--basis",
            str(path),
            "--k",
            "2",
            "--top-k",
            "2",
            "--quiet",
            "--out",
            str(tmp_path / "r"),
        ],
    )
    assert f"--basis {path}" in err and "mismatch" in err and "extract one for this model" in err


def test_train_cli_max_tokens_beyond_positions(capsys, tmp_path):
    err = one_line_error(
        capsys,
        [
            "train",
            "--model",
            "tiny",
            "--max-new-tokens",
            "5000",
            "--quiet",
            "--out",
            str(tmp_path / "r"),
        ],
    )
    assert "exceed the model's 2048 positions" in err
    assert not (tmp_path / "r").exists()  # nothing written


def test_demo_cli_bad_input(capsys, tmp_path):
    out = str(tmp_path / "demo")
    assert "unknown arm(s) ['bogus']" in one_line_error(
        capsys, ["demo", "--arms", "vanilla,bogus", "--out", out]
    )
    assert "steps must be" in one_line_error(capsys, ["demo", "--steps", "0", "--out", out])
    assert "must not repeat" in one_line_error(capsys, ["demo", "--seeds", "0,0", "--out", out])
    (tmp_path / "file").write_text("x")
    assert "is a file" in one_line_error(capsys, ["demo", "--out", str(tmp_path / "file")])


def test_train_cli_runs_checkpoints_and_resumes(capsys, tmp_path):
    out = tmp_path / "run"
    common = ["train", "--model", "tiny", "--out", str(out), "--quiet", "--k", "2", "--top-k", "2"]
    small = ["--group-size", "2", "--prompts-per-step", "2", "--checkpoint-every", "1"]
    assert main([*common, *small, "--steps", "2"]) == 0
    assert (out / "delta.safetensors").exists() and (out / "hack_basis.safetensors").exists()
    assert "already holds a run" in one_line_error(capsys, [*common, *small, "--steps", "3"])
    assert main([*common, *small, "--steps", "3", "--resume"]) == 0
    steps = [json.loads(x)["step"] for x in (out / "history.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == [
        "checkpoint-0000002",
        "checkpoint-0000003",
    ]


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"marker_reward": float("nan")}, r"marker_reward \(--marker-reward\) must be a finite"),
        ({"marker_reward": float("inf")}, "marker_reward"),
        ({"warm_lr": float("inf")}, "warm_lr must be a finite number > 0"),
        ({"lr": float("inf")}, r"lr \(--lr\) must be a finite"),
        ({"steps": 0}, "steps must be >= 1"),
    ],
)
def test_demo_settings_are_checked_when_made(fields, message):
    """The Python API gets the CLI's checks: DemoSettings refuses bad values when constructed."""
    from vhack.grpo.demo_settings import DemoSettings

    with pytest.raises(UsageError, match=message):
        DemoSettings(**fields)
