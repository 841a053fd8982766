"""vhack: keep reward-hacking gradient directions out of RL fine-tuning.

Wrap a model's Linears in their SVD basis (`wrap`), extract a hack basis from contrastive pairs,
and project the hack-ward part out of the dS gradient at every optimizer step. See README.md.
"""

from vhack import models, ops, reference
from vhack._version import __version__
from vhack.adapter import DEFAULT_TARGETS, Adapter, SegmentGrads, SVDLinear, wrap
from vhack.project import Projector, ProjStats

__all__ = [
    "DEFAULT_TARGETS",
    "Adapter",
    "ProjStats",
    "Projector",
    "SVDLinear",
    "SegmentGrads",
    "__version__",
    "models",
    "ops",
    "reference",
    "wrap",
]
