"""Environments of the GRPO loop, by name (see `get_env`)."""

from __future__ import annotations

from vhack.grpo.envs.base import Environment, Score, Task

__all__ = ["ENV_NAMES", "Environment", "Score", "Task", "get_env"]

# name -> "module:class", imported on first use
_REGISTRY = {
    "toy": "vhack.grpo.envs.toy:ToyEnv",
    "code": "vhack.grpo.envs.code:CodeEnv",
}
ENV_NAMES = tuple(_REGISTRY)


def get_env(name: str, **kwargs) -> Environment:
    """The environment called `name` ("toy" or "code"), built with kwargs."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown environment {name!r}; choose one of {', '.join(ENV_NAMES)}")
    import importlib

    module, cls = _REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)(**kwargs)
