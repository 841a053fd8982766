"""The README's two set-up commands stay true: CI runs the test command verbatim."""

import importlib
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

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


CPU_TORCH = "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu && "


def test_setup_commands_install_the_cpu_build_of_torch():
    """A bare `pip install torch==...` takes PyPI's Linux build and its CUDA libraries."""
    blocks = [b for b in _bash_blocks() if "torch==" in b]
    assert len(blocks) == 2
    for block in blocks:
        assert block.startswith(CPU_TORCH), block


def test_ci_requires_the_cpp_extension():
    """CI exports VHACK_REQUIRE_EXT=1 before the test command, so a failed C++ build fails
    tests/test_project_kernels.py::test_extension_required instead of skipping silently."""
    lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    test_line = next(i for i, line in enumerate(lines) if line.endswith("pytest"))
    assert "export VHACK_REQUIRE_EXT=1" in lines[:test_line]


def _resolve(dotted: str):
    """The object a dotted name names: attributes first, submodules where there is none."""
    parts = dotted.split(".")
    obj = importlib.import_module(parts[0])
    for i, part in enumerate(parts[1:], start=2):
        obj = (
            getattr(obj, part)
            if hasattr(obj, part)
            else importlib.import_module(".".join(parts[:i]))
        )
    return obj


def test_readme_names_only_what_exists():
    """Every `vhack.NAME...` in the README resolves, what it calls is callable (not a module),
    and every `from vhack... import NAME` imports. Private names (vhack._C, optional) aside."""
    text = re.sub(r"```.*?```", "", (ROOT / "README.md").read_text(), flags=re.S)
    spans = re.findall(r"`([^`]+)`", text)
    checked = 0
    for span in spans:
        span = " ".join(span.split())
        for module, name in re.findall(r"from (vhack[\w.]*) import (\w+)", span):
            assert hasattr(importlib.import_module(module), name), span
            checked += 1
        for dotted, call in re.findall(r"(?<![\w.])(vhack(?:\.\w+)+)(\()?", span):
            if any(part.startswith("_") for part in dotted.split(".")):
                continue
            try:
                obj = _resolve(dotted)
            except (AttributeError, ImportError) as err:
                raise AssertionError(
                    f"README names `{dotted}`, which does not exist: {err}"
                ) from None
            if call:
                assert callable(obj) and not inspect.ismodule(obj), f"README calls `{dotted}`"
            checked += 1
    assert checked > 10


def test_readme_has_no_paths_outside_the_repository():
    assert "../" not in (ROOT / "README.md").read_text()


def test_readme_documents_the_disk_cache():
    text = (ROOT / "README.md").read_text()
    section = text.split("## Disk cache", 1)[1].split("\n## ", 1)[0]
    for needle in ("VHACK_CACHE_DIR", "VHACK_SVD_CACHE=0", "use_cache=False", "rm -rf", "GB"):
        assert needle in section, needle


def test_triton_is_required_only_where_it_has_wheels():
    from packaging.requirements import Requirement

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    triton = next(Requirement(d) for d in deps if d.startswith("triton"))
    env = {"platform_system": "Linux", "sys_platform": "linux"}
    for machine, wanted in (("x86_64", True), ("aarch64", True), ("ppc64le", False)):
        assert triton.marker.evaluate({**env, "platform_machine": machine}) is wanted, machine
    for system, machine in (("Darwin", "arm64"), ("Windows", "AMD64"), ("Darwin", "x86_64")):
        assert not triton.marker.evaluate({"platform_system": system, "platform_machine": machine})


def test_import_vhack_from_the_clone_root(tmp_path):
    """After a plain install, `python -c "import vhack"` in the clone's root imports the
    checkout's vhack/, where kernels/ is not vhack.kernels: it must import all the same. The
    editable install's finder is removed here, so the checkout is seen as a plain install sees it.
    """
    code = (
        "import sys\n"
        "sys.meta_path[:] = [f for f in sys.meta_path\n"
        "                    if '__editable__' not in getattr(f, '__module__', '')]\n"
        "import vhack, vhack.kernels.utils\n"
        "print(vhack.__file__)\n"
        "print(vhack.kernels.utils.__file__)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=env
    )
    assert result.returncode == 0, result.stderr
    package, kernels = result.stdout.split()
    assert Path(package) == ROOT / "vhack" / "__init__.py"
    assert Path(kernels) == ROOT / "kernels" / "utils.py"
