"""The KL reference without a second model: the same wrapped model with dS bypassed.

Inside `bypass_delta(adapter)` every SVDLinear runs a plain dense forward with its original
weight W (what the model computed before wrapping), whatever dS holds: no copy of the model, no
write to dS, so autograd graphs built outside the block stay valid.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["bypass_delta"]


@contextmanager
def bypass_delta(adapter) -> Iterator[torch.nn.Module]:
    """Run `adapter.model` as the dS = 0 (base) model inside the block; yields the model.

    Uses the modules' dense generation path with the base weight, so no dS gradient flows
    inside; do not nest it in `adapter.merged()`.
    """
    modules = list(adapter.modules.values())
    if any(m.generation_weight is not None for m in modules):
        raise RuntimeError("bypass_delta() inside adapter.merged() or another bypass_delta()")
    for mod in modules:
        mod.generation_weight = mod.base_weight.detach()
    try:
        yield adapter.model
    finally:
        for mod in modules:
            mod.generation_weight = None
