"""The `vhack` command line, in-process and as the installed console script."""

import json
import shutil
import subprocess

import pytest

from vhack import cli


def test_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for command in ("info", "example", "extract", "validate"):
        assert command in out


def test_no_command_prints_help_and_fails(capsys):
    assert cli.main([]) == 1
    assert "usage: vhack" in capsys.readouterr().out


def test_info_is_json(capsys):
    assert cli.main(["info"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert {"vhack", "torch", "backends"} <= set(info)


def test_example_runs_end_to_end(capsys):
    assert cli.main(["example", "--steps", "4"]) == 0
    out = capsys.readouterr().out
    assert "wrapped 14 Linear modules" in out
    moved = {}
    for line in out.splitlines():
        for arm in ("measure only", "grad projected", "update projected"):
            if line.startswith(arm) and "AdamW" not in line:
                moved[arm] = float(line.split()[-2])  # change on the basis pairs
    assert set(moved) == {"measure only", "grad projected", "update projected"}
    # The whole pipeline (extract -> Projector -> optimizer hook) must slow the drift toward the
    # hacks on the pairs the basis came from.
    assert moved["grad projected"] < moved["measure only"]
    assert moved["update projected"] < moved["measure only"]


def test_console_script_is_installed():
    exe = shutil.which("vhack")
    assert exe, "the vhack console script is not on PATH: install the package (see README)"
    result = subprocess.run([exe, "--version"], capture_output=True, text=True, check=True)
    assert result.stdout.startswith("vhack ")
