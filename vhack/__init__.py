"""vhack: keep reward-hacking gradient directions out of RL fine-tuning.

Wrap a model's Linears in their SVD basis (`wrap`), extract a hack basis from contrastive pairs,
and project the hack-ward part out of the dS gradient at every optimizer step. See README.md.
"""

# _source_tree comes first: in a source checkout it maps kernels/ to vhack.kernels (see there).
from vhack import _source_tree, errors, lm, models, ops, reference, validate  # noqa: F401
from vhack._version import __version__
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
