"""Command-line options generated from config dataclasses, and the parser they go into.

A dataclass field becomes one option: its name (--top-k for top_k, or metadata "flag"), its
default (the command may override it), its type (from the annotation, or a checked type the
command passes), metadata "help" and "choices". The default is written into the help text, so
`--help` shows every default once; an option whose default is computed (None in the dataclass)
says what it is in its help ("default: ...").
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import typing
from collections.abc import Callable, Mapping, Sequence

__all__ = [
    "BELOW_ONE",
    "FRACTION",
    "NONNEGATIVE_INT",
    "POSITIVE_FLOAT",
    "POSITIVE_INT",
    "Parser",
    "add_options",
    "shown",
]


class Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors are one line (`vhack COMMAND: error: ...`, exit 2); its
    subparsers inherit this."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _number(
    kind: type, lo: float, hi: float = math.inf, *, open_lo: bool = False, open_hi: bool = False
) -> Callable[[str], float]:
    """An argparse type: `kind` (int or float) within [lo, hi] (open ends where asked)."""
    left, right = "(" if open_lo else "[", ")" if open_hi or hi == math.inf else "]"
    what = (
        f"an integer >= {lo}"
        if kind is int and hi == math.inf
        else f"a {'number' if kind is float else 'integer'} in {left}{lo}, {hi}{right}"
    )

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        ok_lo = value > lo if open_lo else value >= lo
        ok_hi = value < hi if open_hi else value <= hi
        if not (math.isfinite(value) and ok_lo and ok_hi):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return value

    return parse


POSITIVE_INT = _number(int, 1)
NONNEGATIVE_INT = _number(int, 0)
FRACTION = _number(float, 0.0, 1.0)  # [0, 1]
BELOW_ONE = _number(float, 0.0, 1.0, open_hi=True)  # [0, 1)
POSITIVE_FLOAT = _number(float, 0.0, open_lo=True)


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None


def _finite_float(text: str) -> float:
    """A float option: any finite number (range checks are the config dataclass's)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def _name_list(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def _parse_type(annotation) -> Callable[[str], object]:
    """The argparse type of a field annotation: int, float, str, X | None, tuple[int | str, ...]."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is tuple:
        return _int_list if args[0] is int else _name_list
    if args:  # X | None
        return _parse_type(args[0])
    if annotation is float:
        return _finite_float
    if annotation in (int, str):
        return annotation
    raise TypeError(f"no command-line type for {annotation!r}")


def shown(value) -> str:
    """A default as --help shows it (tuples as comma-separated lists)."""
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    return str(value)


def add_options(
    parser: argparse.ArgumentParser,
    cls: type,
    names: Sequence[str] | None = None,
    *,
    defaults: Mapping[str, object] | None = None,
    types: Mapping[str, Callable[[str], object]] | None = None,
    helps: Mapping[str, str] | None = None,
    only_when_given: bool = False,
    notes: Mapping[str, str] | None = None,
) -> None:
    """Add one option per field `names` (default: every field with metadata "help") of the
    dataclass `cls` to `parser`; the parsed value is stored under the field's name.

    defaults: this command's default where it is not the field's; types: a checked argparse type
    (e.g. POSITIVE_INT) where the annotation's is not enough; helps: help text replacing the
    field's; only_when_given: the parsed value is None unless the option is given (the command
    then builds the dataclass from the given ones), while --help shows the field's default;
    notes: text shown after a default (e.g. "; --quick: 30").
    """
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    defaults, types, helps, notes = defaults or {}, types or {}, helps or {}, notes or {}
    for name in (
        names if names is not None else [n for n, f in fields.items() if "help" in f.metadata]
    ):
        f = fields[name]
        flag = f.metadata.get("flag", "--" + name.replace("_", "-"))
        default = defaults.get(name, f.default)
        text = helps.get(name, f.metadata["help"])
        kwargs: dict = {"dest": name}
        if hints[name] is bool:
            # a switch: --X turns on a field that is off by default, --no-X turns one off
            kwargs.update(action="store_const", const=not default)
            what = "off"
        else:
            kwargs.update(type=types.get(name) or _parse_type(hints[name]))
            if "choices" in f.metadata:
                kwargs["choices"] = f.metadata["choices"]
            else:  # named after the flag, not the field (--group-size GROUP_SIZE)
                kwargs["metavar"] = flag.lstrip("-").replace("-", "_").upper()
            what = shown(default)
        if "default" not in text:
            if default is None:
                raise ValueError(f"{cls.__name__}.{name}: say in its help what None means")
            text += f" (default: {what}{notes.get(name, '')})"
        kwargs["default"] = None if only_when_given else default
        parser.add_argument(flag, help=text, **kwargs)
