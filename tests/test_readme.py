"""The README's two set-up commands stay true: CI runs the test command verbatim."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bash_blocks():
    return re.findall(r"```bash\n(.*?)\n```", (ROOT / "README.md").read_text(), flags=re.S)


def test_ci_runs_the_readme_test_command():
    test_cmd = next(b for b in _bash_blocks() if b.rstrip().endswith("pytest"))
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_cmd.strip() in [line.strip() for line in ci]


def test_readme_main_job_uses_an_existing_subcommand():
    from vhack.cli import build_parser

    main_cmd = next(b for b in _bash_blocks() if "vhack " in b.split("&&")[-1])
    sub = main_cmd.split("&&")[-1].split()[1]
    subcommands = build_parser()._subparsers._group_actions[0].choices
    assert sub in subcommands
    assert "torch==2.13.0" in main_cmd and "--no-build-isolation" in main_cmd


def test_readme_quickstart_runs():
    blocks = re.findall(r"```python\n(.*?)\n```", (ROOT / "README.md").read_text(), flags=re.S)
    assert blocks, "README has no python quickstart"
    exec(compile(blocks[0], "README quickstart", "exec"), {})
