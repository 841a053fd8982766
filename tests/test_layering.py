"""The layering rule (CONTRIBUTING.md): a module imports only from its own layer or the layers below.

Every import statement in vhack/ and kernels/ counts, module-level and function-level alike (a lazy
import is still a dependency). A new module must be given a layer here; the test says so.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Bottom to top. A module belongs to the longest prefix listed (vhack.ops.layout -> vhack.ops).
LAYERS: list[tuple[str, ...]] = [
    # 0: foundations: no model, no ops (the kernels, the oracle, files and data helpers)
    (
        "vhack._version",
        "vhack._source_tree",
        "vhack.errors",
        "vhack.cache",
        "vhack.extract_config",
        "vhack.files",
        "vhack.threads",
        "vhack.data",
        "vhack.kernels",
        "vhack.ops.modes",  # the projection modes: what the oracle and every backend check
        "vhack.reference",
        "vhack.packing",
        "vhack.pairs",
        "vhack.lm",
        "vhack.models",
    ),
    # 1: the ops: backend dispatch over kernels/, csrc/ (vhack._C) and the reference
    ("vhack.ops", "vhack._C"),
    # 2: the adapter and the basis (what the ops act on)
    (
        "vhack.svd_cache",
        "vhack.adapter",
        "vhack.adapter_files",
        "vhack.basis",
        "vhack.shared_prompt",
    ),
    # 3: projection and extraction
    ("vhack.projector", "vhack.projstats", "vhack.extract", "vhack.difference_basis"),
    # 4: validation (extracts and projects)
    ("vhack.validate",),
    # 5: the public facade, `import vhack` (vhack/__init__.py)
    ("vhack",),
    # 6: the sandbox for untrusted code (used by the code environment)
    ("vhack.sandbox",),
    # 7: applications of the library, independent of each other
    ("vhack.grpo", "vhack.integrations"),
    # 8: the command line
    ("vhack.cli", "vhack.__main__"),
]
# Same-layer packages that must not import each other.
INDEPENDENT = [("vhack.grpo", "vhack.integrations")]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[0] == "kernels":
        parts = ["vhack", *parts]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _group(module: str) -> str | None:
    """The longest LAYERS prefix that owns `module`."""
    best = None
    for layer in LAYERS:
        for prefix in layer:
            if (module == prefix or module.startswith(prefix + ".")) and (
                best is None or len(prefix) > len(best)
            ):
                best = prefix
    return best


def _layer(group: str) -> int:
    return next(i for i, layer in enumerate(LAYERS) if group in layer)


def _imports(path: Path, module: str, known: set[str]) -> set[str]:
    """The vhack modules `path` imports; `from vhack import x` counts as vhack.x when x is a
    module, else as the facade `vhack`."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "vhack")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source.split(".")[0] != "vhack":
                continue
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                found.add(sub if sub in known else source)
    return found


def _sources() -> dict[str, Path]:
    files = sorted((ROOT / "vhack").rglob("*.py")) + sorted((ROOT / "kernels").glob("*.py"))
    return {_module_name(p): p for p in files}


SOURCES = _sources()


def test_every_module_has_a_layer():
    missing = [m for m in SOURCES if _group(m) is None]
    assert not missing, f"give these modules a layer in tests/test_layering.py LAYERS: {missing}"


@pytest.mark.parametrize("module", sorted(SOURCES))
def test_imports_point_down(module):
    group = _group(module)
    if group is None:
        pytest.fail(f"{module} has no layer (see test_every_module_has_a_layer)")
    known = set(SOURCES) | {"vhack._C"}
    bad = []
    for target in sorted(_imports(SOURCES[module], module, known)):
        target_group = _group(target)
        if target_group is None:
            bad.append(f"{target} (no layer)")
        elif _layer(target_group) > _layer(group):
            bad.append(f"{target} (layer {_layer(target_group)} > {_layer(group)})")
        elif any({group, target_group} == set(pair) for pair in INDEPENDENT):
            bad.append(f"{target} ({group} and {target_group} are independent)")
    assert not bad, f"{module} (layer {_layer(group)}) imports upward: {bad}"


def test_kernels_import_nothing_from_vhack_but_themselves():
    for module, path in SOURCES.items():
        if module.startswith("vhack.kernels"):
            known = set(SOURCES)
            outside = [
                t for t in _imports(path, module, known) if not t.startswith("vhack.kernels")
            ]
            assert not outside, f"{module} imports {outside}: kernels/ stays free of vhack/"


def test_the_checker_sees_an_upward_import(tmp_path):
    """The rule can fail: an adapter-level file importing the projector is reported."""
    fake = ROOT / "vhack" / "adapter.py"
    found = _imports(fake, "vhack.adapter", set(SOURCES))
    assert "vhack.ops" in found  # a real, allowed, downward import is seen
    src = tmp_path / "mod.py"
    src.write_text("def f():\n    from vhack.projector import Projector\n")
    assert _imports(src, "vhack.adapter", set(SOURCES)) == {"vhack.projector"}
    assert _layer(_group("vhack.projector")) > _layer(_group("vhack.adapter"))


def test_only_the_ops_use_the_oracle():
    """vhack.reference is the tests' oracle and the ops' "reference" backend: production code
    reaches it only through vhack.ops (constants live in vhack.ops.modes)."""
    known = set(SOURCES)
    users = [
        m
        for m, path in SOURCES.items()
        if "vhack.reference" in _imports(path, m, known)
        and not m.startswith("vhack.ops")
        and m != "vhack"  # the facade lists it as a public submodule
    ]
    assert not users, f"{users} import vhack.reference; import from vhack.ops instead"
