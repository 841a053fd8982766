"""`vhack demo` writes only inside its own run folder (issue 17): a directory holding another
run or files it did not write is refused without --overwrite, and nothing it did not write is
ever deleted (a TensorBoard `runs/` in `--out .` survives)."""

from __future__ import annotations

import pytest

import vhack.grpo.demo
from vhack.cli import main
from vhack.errors import UsageError
from vhack.grpo.demo import DEMO_OUTPUTS
from vhack.grpo.run_dir import MANIFEST, claim_run_dir


class Stop(Exception):
    """Raised where the demo would start its work: the claim is all these tests look at."""


@pytest.fixture
def no_work(monkeypatch):
    def pool(*args, **kwargs):
        raise Stop

    monkeypatch.setattr(vhack.grpo.demo, "_pool", pool)


def demo(out, *extra) -> list[str]:
    return ["demo", "--quick", "--quiet", "--no-cache", "--out", str(out), *extra]


def one_line_error(capsys, argv) -> str:
    try:
        rc = main(argv)
    except SystemExit as exc:
        rc = exc.code
    err = capsys.readouterr().err
    assert rc == 2, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("vhack demo: error: "), err
    return err


def test_a_foreign_runs_folder_is_never_deleted(tmp_path, capsys, no_work):
    events = tmp_path / "runs" / "Dec03" / "events.out.tfevents.1"
    events.parent.mkdir(parents=True)
    events.write_bytes(b"tensorboard")
    err = one_line_error(capsys, demo(tmp_path))
    assert "did not write (runs)" in err and "--overwrite" in err
    err = one_line_error(capsys, demo(tmp_path, "--overwrite"))
    assert "holds runs, which vhack demo did not write" in err
    assert events.read_bytes() == b"tensorboard"


def full_run(out):
    """A previous full demo run's folder: its manifest and some of its files."""
    claim_run_dir(out, "vhack demo", DEMO_OUTPUTS, overwrite=False)
    (out / "validation").mkdir()
    (out / "validation" / "validation.json").write_text("{}")
    (out / "summary.json").write_text('{"full": true}')
    (out / "runs" / "vanilla-seed2").mkdir(parents=True)


def test_quick_does_not_silently_replace_a_full_run(tmp_path, capsys, no_work):
    out = tmp_path / "vhack-demo"
    full_run(out)
    (out / "my-notes.md").write_text("mine")
    err = one_line_error(capsys, demo(out))
    assert "holds a previous vhack demo run" in err and "--overwrite" in err
    assert (out / "validation" / "validation.json").exists()
    with pytest.raises(Stop):  # replaced: the old run's files go, before any work
        main(demo(out, "--overwrite"))
    assert not (out / "validation").exists() and not (out / "summary.json").exists()
    assert not (out / "runs").exists()
    assert (out / "my-notes.md").read_text() == "mine"  # not the demo's: kept


def test_a_train_run_is_not_a_demo_run(tmp_path):
    (tmp_path / "checkpoint-0000004").mkdir()
    (tmp_path / "history.jsonl").write_text("")
    with pytest.raises(UsageError, match="did not write"):
        claim_run_dir(tmp_path, "vhack demo", DEMO_OUTPUTS, overwrite=False)
    with pytest.raises(UsageError, match="holds history.jsonl, which vhack demo did not write"):
        claim_run_dir(tmp_path, "vhack demo", DEMO_OUTPUTS, overwrite=True)
    assert (tmp_path / "checkpoint-0000004").is_dir()


def test_an_empty_or_new_folder_is_claimed_with_a_manifest(tmp_path):
    out = claim_run_dir(tmp_path / "new", "vhack demo", DEMO_OUTPUTS, overwrite=False)
    assert (out / MANIFEST).is_file()
    (out / ".summary.json.vhack-tmp-99-1").write_text("half")  # a killed run's temporary
    with pytest.raises(UsageError, match="previous vhack demo run"):
        claim_run_dir(out, "vhack demo", DEMO_OUTPUTS, overwrite=False)
    assert not (out / ".summary.json.vhack-tmp-99-1").exists()
    with pytest.raises(UsageError, match="is a file"):
        claim_run_dir(out / MANIFEST, "vhack demo", DEMO_OUTPUTS, overwrite=False)


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["--out", "{plain}"], "--out"),
        (["--out", "{plain}/demo"], "is a file, not a directory"),
        (["--marker-reward", "nan"], "--marker-reward"),
        (["--steps", "0"], "steps must be >= 1"),
        (["--arms", "vanilla,sideways"], "unknown arm"),
    ],
)
def test_demo_user_errors_are_one_line_before_any_work(extra, fragment, tmp_path, capsys, no_work):
    plain = tmp_path / "plain"
    plain.write_text("x\n")
    argv = ["demo", "--quick", "--out", str(tmp_path / "d"), *extra]
    err = one_line_error(capsys, [a.format(plain=plain) for a in argv])
    assert fragment in err
