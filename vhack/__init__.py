"""vhack: keep reward-hacking gradient directions out of RL fine-tuning.

Wrap a model's Linears in their SVD basis (`wrap`), extract a hack basis from contrastive pairs,
and project the hack-ward part out of the dS gradient at every optimizer step. See README.md.

The public names are imported on first use (PEP 562), so that `import vhack.cli` or
`import vhack.grpo.config` does not pay for torch and transformers: `vhack.wrap`,
`from vhack import wrap` and `vhack.models` work as if imported here.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from typing import TYPE_CHECKING

# _source_tree comes first: in a source checkout it maps kernels/ to vhack.kernels (see there).
from vhack import _source_tree  # noqa: F401
from vhack._version import __version__

# public name -> the module that defines it (None: the name is a submodule of vhack; other
# submodules, e.g. vhack.cache, are imported on first access too)
_LAZY = {
    "DEFAULT_TARGETS": "vhack.adapter",
    "Adapter": "vhack.adapter",
    "SVDLinear": "vhack.adapter",
    "SegmentGrads": "vhack.adapter",
    "wrap": "vhack.adapter",
    "load_adapter": "vhack.adapter_files",
    "HackBasis": "vhack.basis",
    "load_or_extract": "vhack.extract",
    "Pair": "vhack.pairs",
    "builtin_pairs": "vhack.pairs",
    "load_pairs": "vhack.pairs",
    "Projector": "vhack.projector",
    "ProjStats": "vhack.projector",
    "errors": None,
    "lm": None,
    "models": None,
    "ops": None,
    "reference": None,
    "validate": None,
}

if TYPE_CHECKING:
    from vhack import errors, lm, models, ops, reference, validate
    from vhack.adapter import DEFAULT_TARGETS, Adapter, SegmentGrads, SVDLinear, wrap
    from vhack.adapter_files import load_adapter
    from vhack.basis import HackBasis
    from vhack.extract import extract, load_or_extract
    from vhack.pairs import Pair, builtin_pairs, load_pairs
    from vhack.projector import Projector, ProjStats

__all__ = [
    "DEFAULT_TARGETS",
    "Adapter",
    "HackBasis",
    "Pair",
    "ProjStats",
    "Projector",
    "SVDLinear",
    "SegmentGrads",
    "__version__",
    "builtin_pairs",
    "errors",
    "extract",
    "lm",
    "load_adapter",
    "load_or_extract",
    "load_pairs",
    "models",
    "ops",
    "reference",
    "validate",
    "wrap",
]


def __getattr__(name: str):
    source = _LAZY.get(name)
    if source is None:  # a submodule: vhack.models, vhack.cache, ...
        if name.startswith("__") or importlib.util.find_spec(f"vhack.{name}") is None:
            raise AttributeError(f"module 'vhack' has no attribute {name!r}")
        value = importlib.import_module(f"vhack.{name}")
    else:
        value = getattr(importlib.import_module(source), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """vhack's module type: `vhack.extract` is the function vhack.extract.extract, although the
    import system sets the package attribute `extract` to the submodule when it imports it."""

    @property
    def extract(self):
        return (
            self.__dict__.get("_extract_override")
            or importlib.import_module("vhack.extract").extract
        )

    @extract.setter
    def extract(self, value) -> None:
        if not isinstance(value, types.ModuleType):  # e.g. monkeypatch.setattr(vhack, ...)
            self.__dict__["_extract_override"] = value


sys.modules[__name__].__class__ = _Package
