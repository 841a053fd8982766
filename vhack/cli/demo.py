"""`vhack demo`: the toy reward-hacking world, every arm over several seeds (CPU, minutes)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

from vhack.cli._common import check_writable
from vhack.cli._options import add_options, shown
from vhack.grpo.demo_settings import QUICK, DemoSettings

HELP = "the toy reward-hacking world: does a projection hold GRPO's hacking down? (CPU, minutes)"

# DemoSettings fields that are options; the others keep their defaults
OPTIONS = (
    "seeds",
    "arms",
    "steps",
    "warm_steps",
    "marker_reward",
    "kl_beta",
    "workers",
    "validate",
    "cache",
)


@dataclass
class DemoRun:
    out: str = field(default="vhack-demo", metadata={"help": "output directory"})
    quick: bool = field(
        default=False,
        metadata={"help": "the CI-sized demo: the options below say what it changes"},
    )
    quiet: bool = field(default=False, metadata={"help": "no progress bars"})
    overwrite: bool = field(
        default=False,
        metadata={"help": "replace a previous demo run in --out (only its files; others are kept)"},
    )


def _quick_note(value) -> str:
    """What --quick sets an option to, for its help; a switch (--no-validate) is then on."""
    return f"; --quick: {'on' if isinstance(value, bool) else shown(value)}"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_options(p, DemoRun)
    # None unless given: --quick has its own defaults for some (shown after the full demo's)
    add_options(
        p,
        DemoSettings,
        OPTIONS,
        only_when_given=True,
        notes={name: _quick_note(value) for name, value in QUICK.items()},
    )


def run(args: argparse.Namespace) -> int:
    """Warm-start the tiny model on the toy world (reverse a word; the grader also pays the
    marker " PASS" and a held-out marker " DONE" that no hack pair contains), extract and
    validate a hack basis, then run GRPO in every arm over several seeds (parallel processes,
    one torch thread each) and evaluate each final policy on held-out prompts. Prints the
    tables and the verdict; writes summary.json, history.jsonl, hack_rate.png, tradeoff.png and
    report.md to --out: a new or empty directory, or one holding a previous demo run (replaced
    with --overwrite; the demo never deletes what it did not write)."""
    from vhack.grpo.demo import format_table, run_demo

    given = {name: getattr(args, name) for name in OPTIONS}
    overrides = {name: value for name, value in given.items() if value is not None}
    settings = DemoSettings.quick(**overrides) if args.quick else DemoSettings(**overrides)
    settings.check()
    check_writable(args.out, "--out", directory=True)
    summary = run_demo(args.out, settings, progress=not args.quiet, overwrite=args.overwrite)
    print()
    print(format_table(summary))
    print(
        f"\nstart = step 0; end = mean of the last {summary['end_window']} steps; mean ± sd over "
        f"seeds {list(settings.seeds)}; held: end rate < {summary['held_below']} (k/n runs, "
        "Wilson 95 % interval). energy removed: fraction of |g|^2 the arm's projection removed; "
        "cin_hack: hack-ward cin of the gradient the optimizer received.\n"
    )
    print(summary["verdict"])
    out = Path(args.out)
    print(
        f"{summary['wall_seconds']:.0f} s; wrote {out / 'summary.json'}, {out / 'history.jsonl'}, "
        f"{out / 'hack_rate.png'}, {out / 'tradeoff.png'}, {out / 'report.md'}"
    )
    return 0
