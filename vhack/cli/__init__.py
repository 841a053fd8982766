"""The `vhack` command line. `vhack --help` lists the subcommands.

One module per subcommand in this package (bench.py, demo.py, example.py, extract.py, info.py,
train.py, validate.py); the module's name is the command's. Every option is generated from a config
dataclass field (see `_options.add_options`): its default is written once, in the dataclass,
and `--help` shows it.

Adding a subcommand is a one-file change: write vhack/cli/NAME.py with
- HELP: the one-line help in `vhack --help`;
- add_arguments(parser): `add_options(parser, SomeConfig, ...)` for a dataclass of its options;
- run(args) -> int: the command; its docstring is `vhack NAME --help`'s description.
`build_parser` finds it. Keep its top-level imports free of torch and transformers (import them
inside run): `vhack --help`, every `--help` and argument errors must stay under a second.

Every user mistake (a bad number, a missing file, an unknown model or pair set, an unwritable
output) raises `vhack.errors.UsageError` before any work starts; `main` prints it as one line,
`vhack COMMAND: error: MESSAGE`, and returns 2. argparse's own errors get the same one-line form.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys

from vhack._version import __version__
from vhack.cli._common import HUB_TIMEOUT_S
from vhack.cli._options import Parser
from vhack.errors import UsageError

__all__ = ["HUB_TIMEOUT_S", "build_parser", "command_names", "main"]


def command_names() -> list[str]:
    """The subcommands: the public modules of this package, sorted."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def build_parser() -> Parser:
    parser = Parser(
        prog="vhack",
        description="Keep reward-hacking gradient directions out of RL fine-tuning.",
    )
    parser.add_argument("--version", action="version", version=f"vhack {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in command_names():
        command = importlib.import_module(f"{__name__}.{name}")
        p = sub.add_parser(name, help=command.HELP, description=command.run.__doc__)
        command.add_arguments(p)
        p.set_defaults(func=command.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    try:
        return args.func(args)
    except UsageError as err:
        print(f"vhack {args.command}: error: {err}", file=sys.stderr)
        return 2
