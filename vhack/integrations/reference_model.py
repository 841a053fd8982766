"""The dS = 0 state of a wrapped model as the KL reference: exact, and no second model in memory.

At dS = 0 every wrapped Linear's effective weight is its original weight, so running the same
model with dS forced to zero IS the base model. `ZeroDeltaReference(adapter)` is a module whose
forward does that (a plain dense forward through the original weights, whatever dS holds now).

TRL's GRPOTrainer with beta > 0 builds its reference by `from_pretrained(model.config.
_name_or_path)`, which fails for an in-memory model and otherwise loads a second full copy. Build
the trainer with beta = 0 and switch the KL on afterwards:

    trainer = GRPOTrainer(model=model, args=GRPOConfig(beta=0.0, ...), ...)
    use_zero_delta_reference(trainer, adapter, beta=0.04)

(Passing a saved checkpoint as model.config._name_or_path also works, at the cost of that copy.)
`VHackCallback` refuses GRPOConfig(beta > 0) on a wrapped model whose `_name_or_path` TRL cannot
load (an in-memory model: TRL would fail with "Repo id must use alphanumeric chars") before TRL
tries, pointing here.
"""

from __future__ import annotations

import os

import torch
from torch import nn

import vhack
from vhack.errors import UsageError

__all__ = ["ZeroDeltaReference", "use_zero_delta_reference", "zero_delta"]


def _check_adapter(adapter) -> None:
    if not isinstance(adapter, vhack.Adapter):
        raise TypeError(f"adapter must be a vhack.Adapter (from vhack.wrap), got {adapter!r}")
    if not any(p is adapter.delta for p in adapter.model.parameters()):
        raise ValueError("this adapter was unwrapped or merged: wrap the model again")


def zero_delta(adapter: vhack.Adapter):
    """Run adapter.model as if dS were 0 (dense forward through the original weights); yields the
    model: `adapter.base()`, after checking the adapter is still attached."""
    _check_adapter(adapter)
    return adapter.base()


class ZeroDeltaReference(nn.Module):
    """The base model as a module: forward(*args, **kwargs) = adapter.model(...) with dS = 0, under
    torch.no_grad(). Holds no parameters of its own (the model is not registered as a submodule,
    so .eval()/.to() on the reference never touch the policy). `config` is the model's config."""

    def __init__(self, adapter: vhack.Adapter) -> None:
        super().__init__()
        _check_adapter(adapter)
        object.__setattr__(self, "adapter", adapter)
        object.__setattr__(self, "config", getattr(adapter.model, "config", None))

    def forward(self, *args, **kwargs):
        with torch.no_grad(), zero_delta(self.adapter) as model:
            return model(*args, **kwargs)

    def extra_repr(self) -> str:
        return f"dS = 0 view of {type(self.adapter.model).__name__}"


def use_zero_delta_reference(trainer, adapter: vhack.Adapter, beta: float) -> ZeroDeltaReference:
    """Give a TRL GRPOTrainer built with beta = 0 a KL term against the dS = 0 reference.

    Sets trainer.beta and trainer.ref_model (TRL reads both at every step); returns the reference.
    Not for sync_ref_model (the reference is the base model by construction).
    """
    if not (isinstance(beta, (int, float)) and beta > 0):
        raise ValueError(f"beta must be a positive number, got {beta!r}")
    if getattr(trainer, "beta", None) != 0.0 or getattr(trainer, "ref_model", None) is not None:
        raise ValueError(
            "build the GRPOTrainer with GRPOConfig(beta=0.0) (so that TRL loads no reference "
            "model of its own), then call use_zero_delta_reference(trainer, adapter, beta)"
        )
    model = getattr(trainer, "model", None)
    if model is None or not any(p is adapter.delta for p in model.parameters()):
        raise ValueError("the trainer's model is not the model this adapter wraps")
    reference = ZeroDeltaReference(adapter)
    trainer.ref_model = reference
    trainer.beta = float(beta)
    return reference


def _loadable(name_or_path: str) -> bool:
    """Whether from_pretrained(name_or_path) can be tried: a local directory or a valid Hub id."""
    if not name_or_path:
        return False
    if os.path.isdir(name_or_path):
        return True
    try:
        from huggingface_hub.utils import validate_repo_id

        validate_repo_id(name_or_path)
    except Exception:
        return False
    return True


def check_reference_source(args, model) -> None:
    """UsageError when TRL's GRPOTrainer with args.beta > 0 would build its reference model by
    `from_pretrained(model.config._name_or_path)` and that name cannot be loaded (a model built
    or modified in memory). Called by VHackCallback at on_init_end, before TRL tries."""
    if not any(cls.__name__ == "GRPOConfig" for cls in type(args).__mro__):
        return  # other trainers' beta means something else (DPO: a temperature)
    beta = getattr(args, "beta", None)
    if not isinstance(beta, (int, float)) or beta <= 0 or model is None:
        return
    name = str(getattr(getattr(model, "config", None), "_name_or_path", "") or "")
    if _loadable(name):
        return  # TRL loads a second copy of the base model from there: correct, costs memory
    raise UsageError(
        f"{type(args).__name__}(beta={beta}) makes TRL load a reference model with "
        f"from_pretrained(model.config._name_or_path={name!r}), which this in-memory model "
        "cannot give (TRL would fail with 'Repo id must use alphanumeric chars'); build the "
        "trainer with beta=0.0 and call vhack.integrations.use_zero_delta_reference(trainer, "
        f"adapter, beta={beta}): the dS = 0 state of the same model is the exact reference, with "
        "no second model in memory"
    )
