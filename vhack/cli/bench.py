"""`vhack bench`: the projection, SVD-linear and extraction benchmarks on this machine, in one run.

The benchmarks live in the repository's bench/ directory, not in the installed package, as in
Liger-Kernel: a benchmark is a development tool, read together with the stored results it is
compared with (bench/results/, which no wheel should carry) and the notes that explain them
(bench/*_NOTES.md). What the package keeps is what users time their own code with
(torch.utils.benchmark plays that part for torch). This command finds bench/ beside the running
vhack (a clone, or an editable install), else in the current directory, or at --bench-dir, and says
how to get one when there is none; bench/suite.py does the rest.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from dataclasses import dataclass, field
from pathlib import Path

from vhack.cli._options import POSITIVE_INT, add_options
from vhack.errors import UsageError

HELP = "benchmark projection, SVD linear and extraction on this device (JSON, plots, comparison)"

BENCHMARKS = ("project", "svd_linear", "extract")
SUITE = "suite.py"  # bench/suite.py: runs the scripts, writes the summary


@dataclass
class BenchOptions:
    device: str | None = field(
        default=None, metadata={"help": "cpu or cuda (default: cuda when available)"}
    )
    quick: bool = field(
        default=False,
        metadata={
            "help": "the CI-sized run (about a minute on CPU): small shapes, few repetitions, "
            "no torch.compile; compared with stored quick results only"
        },
    )
    only: tuple[str, ...] = field(
        default=BENCHMARKS, metadata={"help": "the benchmarks to run, comma-separated"}
    )
    out_dir: str = field(
        default="vhack-bench",
        metadata={
            "help": "where the results go: each benchmark's JSON and PNG, and the summary "
            "bench-<device>-<date>.json/.png (pass bench/results to store them in the repository)"
        },
    )
    ks: tuple[int, ...] = field(
        default=(12, 5), metadata={"help": "projection: hack-basis rows per module"}
    )
    reps: int | None = field(
        default=None,
        metadata={"help": "timed repetitions per provider (default: each benchmark's own)"},
    )
    threads: int | None = field(
        default=None,
        metadata={
            "help": "torch CPU threads of the benchmarks, as OMP_NUM_THREADS (default: torch's "
            "own, every core, or OMP_NUM_THREADS when set; --quick: 1, which on a busy machine "
            "runs the tiny shapes several times faster)"
        },
    )
    compile: bool = field(
        default=True,
        metadata={
            "help": "skip torch.compile (the projection's compiled loops, the SVD linear's "
            "compiled eager path); --quick skips it too",
            "flag": "--no-compile",
        },
    )
    compare: bool = field(
        default=True,
        metadata={
            "help": "do not compare with the newest stored result of the same benchmark and "
            "device in bench/results",
            "flag": "--no-compare",
        },
    )
    bench_dir: str | None = field(
        default=None,
        metadata={
            "help": "the repository's bench/ directory (default: the one beside the running "
            "vhack, else ./bench)"
        },
    )


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_options(p, BenchOptions, types={"reps": POSITIVE_INT, "threads": POSITIVE_INT})


def find_bench_dir(given: str | None) -> Path:
    """The bench/ directory to run: --bench-dir, else the checkout of the running vhack, else
    ./bench; UsageError saying how to get one when none holds bench/suite.py."""
    import vhack

    if given is not None:
        path = Path(given).expanduser()
        if not (path / SUITE).is_file():
            raise UsageError(f"--bench-dir {given}: holds no {SUITE}; pass a clone's bench/")
        return path.resolve()
    for path in (Path(vhack.__file__).resolve().parents[1] / "bench", Path.cwd() / "bench"):
        if (path / SUITE).is_file():
            return path.resolve()
    raise UsageError(
        "the benchmarks live in the repository's bench/ directory, which this installation "
        "does not include; run from a clone (git clone the repository and pip install -e . "
        "there), or pass --bench-dir PATH/TO/CLONE/bench"
    )


def run(args: argparse.Namespace) -> int:
    """Run the projection, SVD-linear and extraction benchmarks of the repository's bench/ on one
    device, one after the other, each in its own process (the interpreter never timed: on CPU the
    CPU providers). Each writes its JSON (device, versions, date, rows) and plot to --out-dir;
    then a summary, bench[-quick]-<device>-<date>.json and .png, holds the ratios against each
    benchmark's eager reference (and torch.compile of it where it ran), the load average, and the
    comparison with the newest stored result of the same benchmark on the same device in
    bench/results/. Exit status 1 when a benchmark failed."""
    from vhack.cli import _common as common

    unknown = [name for name in args.only if name not in BENCHMARKS]
    if unknown or not args.only:
        raise UsageError(
            f"--only {','.join(args.only)}: choose from {','.join(BENCHMARKS)} (comma-separated)"
        )
    if not args.ks or any(k < 1 for k in args.ks):
        shown = ",".join(str(k) for k in args.ks)
        raise UsageError(f"--ks {shown}: pass positive numbers of rows, e.g. 12,5")
    bench_dir = find_bench_dir(args.bench_dir)
    out_dir = common.check_writable(args.out_dir, "--out-dir", directory=True)
    device = common.check_device(args.device)
    spec = importlib.util.spec_from_file_location("vhack_bench_suite", bench_dir / SUITE)
    suite = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = suite  # its dataclass looks its module up there
    spec.loader.exec_module(suite)
    options = suite.SuiteOptions(
        device=device.type,
        quick=args.quick,
        only=tuple(dict.fromkeys(args.only)),
        out_dir=out_dir,
        ks=args.ks,
        reps=args.reps,
        threads=1 if args.threads is None and args.quick else args.threads,
        compare=args.compare,
        compile=args.compile and not args.quick,
    )
    return suite.run(options, bench_dir)
