"""`import vhack` from a source checkout that is not the installed copy.

The Triton kernels live in the checkout's top-level kernels/ and become `vhack.kernels` only when
the package is installed (pyproject's package-dir). Python puts the current directory first on
sys.path, so after a plain `pip install .`, `python -c "import vhack"` in the clone's root imports
the checkout's vhack/, where vhack.kernels does not exist. Importing this module (vhack/__init__.py
does so first) then installs a finder
that maps exactly the name vhack.kernels to ../kernels (its submodules follow from its __path__).
It does nothing in an installed copy (vhack/kernels/ is there) or an editable one (setuptools'
finder maps the name first).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
from pathlib import Path

__all__ = ["map_kernels"]


class _KernelsFinder(importlib.abc.MetaPathFinder):
    """Finds `vhack.kernels` in a checkout's kernels/ directory; no other name."""

    def __init__(self, kernels: Path) -> None:
        self.kernels = kernels

    def find_spec(self, fullname, path=None, target=None) -> importlib.machinery.ModuleSpec | None:
        if fullname != "vhack.kernels":
            return None
        return importlib.util.spec_from_file_location(
            fullname, self.kernels / "__init__.py", submodule_search_locations=[str(self.kernels)]
        )


def map_kernels(package_dir: str | Path) -> bool:
    """Install the finder when `package_dir` (vhack/) is a checkout's, i.e. it has no kernels/
    but its parent holds pyproject.toml and kernels/__init__.py. Returns True when installed."""
    here = Path(package_dir)
    root = here.parent
    kernels = root / "kernels"
    if (here / "kernels").exists() or not (kernels / "__init__.py").is_file():
        return False
    if not (root / "pyproject.toml").is_file():
        return False
    if not any(isinstance(f, _KernelsFinder) for f in sys.meta_path):
        sys.meta_path.append(_KernelsFinder(kernels))
    return True


map_kernels(Path(__file__).resolve().parent)
