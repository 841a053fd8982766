"""Coding problems of the code environment: the shipped set and a loader for public JSONL sets.

A problem is a `class Solution` method to write: a spec, one visible example (shown in the
prompt) and hidden tests (argument lists with expected outputs, never shown to the program).
Outputs are plain JSON values (int, str, bool, None, lists, str-keyed dicts) compared with
exact-type equality.
"""

from __future__ import annotations

import ast
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from vhack.errors import UsageError

__all__ = [
    "Problem",
    "builtin_problems_path",
    "format_value",
    "load_problems",
    "load_public_problems",
]


@dataclass(frozen=True)
class Problem:
    """One coding problem.

    id: unique name. method: the Solution method to write. signature: its `def` line without the
    colon, with `self`. description: the spec. example: (args, output), shown in the prompt.
    tests: hidden (args, output) pairs. reference: a correct `class Solution` source, or "".
    """

    id: str
    method: str
    signature: str
    description: str
    example: tuple[list, object]
    tests: tuple[tuple[list, object], ...]
    reference: str = ""

    def param_names(self) -> list[str]:
        """The method's parameter names after `self`."""
        fn = ast.parse(self.signature.strip() + ":\n    pass").body[0]
        names = [a.arg for a in fn.args.posonlyargs + fn.args.args]
        return names[1:] if names and names[0] == "self" else names

    def example_text(self) -> str:
        """The visible example as the prompt shows it: `a = 1, b = [2] -> 3`."""
        args, output = self.example
        shown = ", ".join(
            f"{n} = {format_value(v)}" for n, v in zip(self.param_names(), args, strict=False)
        )
        return f"{shown} -> {format_value(output)}"


def format_value(value: object) -> str:
    """A Python literal for a JSON value (strings in double quotes, True/False/None)."""
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(format_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return (
            "{" + ", ".join(f"{format_value(k)}: {format_value(v)}" for k, v in value.items()) + "}"
        )
    return repr(value)


def builtin_problems_path() -> Path:
    """Path of the shipped problem set (36 problems written for this project, Apache-2.0)."""
    return Path(__file__).resolve().parents[2] / "data" / "code_problems.jsonl"


def _problem_from_row(row: dict, where: str) -> Problem:
    try:
        tests = tuple((list(t["args"]), t["output"]) for t in row["tests"])
        problem = Problem(
            id=str(row["id"]),
            method=str(row["method"]),
            signature=str(row["signature"]),
            description=str(row["description"]),
            example=(list(row["example"]["args"]), row["example"]["output"]),
            tests=tests,
            reference=str(row.get("reference", "")),
        )
        problem.param_names()
    except (KeyError, TypeError, SyntaxError) as e:
        raise UsageError(f"{where}: not a valid problem row ({type(e).__name__}: {e})") from e
    if not problem.tests:
        raise UsageError(f"{where}: problem {problem.id!r} has no hidden tests")
    return problem


def load_problems(path: str | Path | None = None) -> list[Problem]:
    """Problems from a JSONL file in this package's schema (default: the shipped set).

    One object per line: {"id", "method", "signature", "description",
    "example": {"args", "output"}, "tests": [{"args", "output"}, ...], "reference"}.
    """
    path = Path(path) if path is not None else builtin_problems_path()
    if not path.is_file():
        raise UsageError(f"problem file {str(path)!r} does not exist; pass a JSONL problem file")
    problems = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UsageError(f"{path}:{i}: invalid JSON ({e})") from e
                problems.append(_problem_from_row(row, f"{path}:{i}"))
    ids = [p.id for p in problems]
    if len(set(ids)) != len(ids):
        raise UsageError(f"{path}: problem ids must be unique")
    if not problems:
        raise UsageError(f"{path}: no problems")
    return problems


def _literal_asserts(test_code: str, entry: str) -> list[tuple[list, object]]:
    """(args, expected) from `assert entry(args...) == expected` lines whose arguments and expected
    value are literals (other asserts are skipped)."""
    out = []
    try:
        tree = ast.parse(test_code)
    except SyntaxError:
        return out
    for node in ast.walk(tree):
        if not isinstance(node, ast.Assert) or not isinstance(node.test, ast.Compare):
            continue
        cmp = node.test
        if len(cmp.ops) != 1 or not isinstance(cmp.ops[0], ast.Eq):
            continue
        call = cmp.left
        if not (
            isinstance(call, ast.Call)
            and isinstance(call.func, ast.Name)
            and call.func.id == entry
            and not call.keywords
        ):
            continue
        try:
            args = [ast.literal_eval(a) for a in call.args]
            expected = ast.literal_eval(cmp.comparators[0])
            json.dumps([args, expected])
        except (ValueError, TypeError, SyntaxError):
            continue
        if isinstance(expected, tuple | set | float):
            continue  # not comparable exactly after the JSON round trip
        out.append((json.loads(json.dumps(args)), expected))
    return out


def _function_signature(src: str, entry: str) -> tuple[str, str] | None:
    """(`def` line with self inserted, docstring) of function `entry` in `src`."""
    try:
        tree = ast.parse(src)
    except SyntaxError:
        return None
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name == entry:
            args = ast.unparse(node.args)
            ret = f" -> {ast.unparse(node.returns)}" if node.returns else ""
            sig = f"def {entry}(self{', ' + args if args else ''}){ret}"
            return sig, ast.get_docstring(node) or ""
    return None


def load_public_problems(path: str | Path, limit: int | None = None) -> list[Problem]:
    """Problems from a HumanEval- or MBPP-style JSONL file the user already has on disk.

    HumanEval rows: {"task_id", "prompt", "canonical_solution", "test", "entry_point"}; MBPP rows:
    {"task_id", "text", "code", "test_list"}. Only asserts of the form
    `assert f(literal args) == literal` become tests (the first is the visible example, the rest
    hidden); rows with fewer than two such asserts are skipped. The function becomes a
    `Solution` method. Nothing is downloaded.
    """
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{str(path)!r} does not exist; pass a HumanEval/MBPP-style JSONL file")
    problems: list[Problem] = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if "entry_point" in row:  # HumanEval
                entry = row["entry_point"]
                tests = _literal_asserts(row["test"].replace("candidate(", f"{entry}("), entry)
                found = _function_signature(row["prompt"], entry)
                reference = row["prompt"] + row.get("canonical_solution", "")
                description = found[1] if found else ""
            elif "test_list" in row:  # MBPP
                code = row.get("code", "")
                first = ast.parse(row["test_list"][0]).body[0]
                entry = first.test.left.func.id  # assert entry(...) == ...
                tests = _literal_asserts("\n".join(row["test_list"]), entry)
                found = _function_signature(code, entry)
                reference = code
                description = row.get("text", "")
            else:
                raise UsageError(f"{path}:{i}: neither a HumanEval nor an MBPP row")
            if found is None or len(tests) < 2 or not description:
                continue
            wrapper = (
                f"{reference}\n\nclass Solution:\n    def {entry}(self, *args):\n"
                f"        return {entry}(*args)\n"
            )
            problems.append(
                Problem(
                    id=str(row.get("task_id", f"{path.stem}-{i}")),
                    method=entry,
                    signature=found[0],
                    description=" ".join(description.split()),
                    example=tests[0],
                    tests=tuple(tests[1:]),
                    reference=wrapper,
                )
            )
            if limit is not None and len(problems) >= limit:
                break
    if not problems:
        raise UsageError(f"{path}: no usable problems (need >= 2 literal asserts per row)")
    return problems


def check_problems(problems: Sequence[Problem]) -> None:
    """Raise UsageError unless every problem's example and hidden outputs are JSON values."""
    for p in problems:
        try:
            json.dumps([p.example, p.tests])
        except TypeError as e:
            raise UsageError(f"problem {p.id!r}: outputs must be JSON values ({e})") from e
