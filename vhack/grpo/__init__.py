"""Reference GRPO loop: environments, rollouts, advantages, the clipped objective and training.

The names below are imported on first use (PEP 562), so that `vhack.grpo.config` stays importable
without torch (the command line builds its options from it before deciding to load a model).
"""

from __future__ import annotations

import importlib

__all__ = [
    "GRPOConfig",
    "GRPOTrainer",
    "load_toy_weights",
    "save_toy_weights",
    "toy_model",
    "warm_model",
    "warm_start",
]

_HOME = {
    "GRPOConfig": "vhack.grpo.config",
    "GRPOTrainer": "vhack.grpo.trainer",
    "load_toy_weights": "vhack.grpo.warmstart",
    "save_toy_weights": "vhack.grpo.warmstart",
    "toy_model": "vhack.grpo.warmstart",
    "warm_model": "vhack.grpo.warmstart",
    "warm_start": "vhack.grpo.warmstart",
}


def __getattr__(name: str):
    if name in _HOME:
        return getattr(importlib.import_module(_HOME[name]), name)
    raise AttributeError(f"module 'vhack.grpo' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
