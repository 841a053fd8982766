"""Merged dense weights under the base model's names: what an inference engine (vLLM) must receive.

A wrapped model's own parameters are `<module>.base_weight` (the original weight), the packed
`<first module>.vhack_store.delta`, and the untouched rest. An engine that loads the base
architecture needs `<module>.weight = W + U diag(dS) Vh` instead, under the names the unwrapped
model has. `merged_named_parameters` yields exactly the dense model's `named_parameters()` (names,
order, values), one merged weight at a time; `merged_state_dict` gives the dense model's full
`state_dict()`. `patch_vllm_sync` makes TRL's vLLM weight sync (server and colocate mode) send
them (`VHackCallback` calls it when the trainer has use_vllm=True); it refuses a TRL whose sync
does not go through the method it replaces (SUPPORTED_TRL). To keep or serve the merged model
after training, `adapter.save_merged(dir)` writes it as a Hugging Face model directory.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

import vhack
from vhack.errors import UsageError

__all__ = ["SUPPORTED_TRL", "merged_named_parameters", "merged_state_dict", "patch_vllm_sync"]

# TRL versions whose VLLMGeneration.sync_weights streams `_iter_named_params()` (server and
# colocate mode): 1.11 introduced it (1.0 to 1.10 iterate model.named_parameters() inline, so the
# patch would be ignored); checked on 1.11, 1.12, 1.14.2, 1.15 and 1.16, tested on 1.16.
SUPPORTED_TRL = ">=1.11 (tested with 1.16)"


def _renames(adapter: vhack.Adapter) -> tuple[dict[str, str], set[str]]:
    """({wrapped name: dense name} for every base weight, wrapped names that do not exist densely:
    the packed dS)."""
    if not isinstance(adapter, vhack.Adapter):
        raise TypeError(f"adapter must be a vhack.Adapter (from vhack.wrap), got {adapter!r}")
    store = [n for n, p in adapter.model.named_parameters() if p is adapter.delta]
    if not store:
        raise ValueError("this adapter was unwrapped or merged: wrap the model again")
    renames = {f"{name}.base_weight": f"{name}.weight" for name in adapter.modules}
    return renames, set(store)


def merged_named_parameters(adapter: vhack.Adapter) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) as the dense (unwrapped, merged) model's named_parameters() would:
    same names and order, tied parameters once; wrapped Linears give their merged weight W_eff in
    the weight's dtype (at dS = 0, the original weight itself), everything else its data. Detached,
    no copies beyond the merges; each merge is cached by the module until dS changes."""
    renames, dropped = _renames(adapter)
    weights = {f"{name}.base_weight": mod for name, mod in adapter.modules.items()}
    for name, param in adapter.model.named_parameters():
        if name in dropped:
            continue
        if name in weights:
            yield renames[name], weights[name].merged_weight()
        else:
            yield name, param.detach()


def merged_state_dict(adapter: vhack.Adapter) -> dict[str, torch.Tensor]:
    """The dense model's state_dict(): what `adapter.merge()` followed by `model.state_dict()`
    would give, without changing the model (`Adapter.merged_state_dict`)."""
    _renames(adapter)  # the same checks as merged_named_parameters
    return adapter.merged_state_dict()


def patch_vllm_sync(vllm_generation, adapter: vhack.Adapter) -> None:
    """Make TRL's VLLMGeneration (trainer.vllm_generation) sync merged dense weights.

    TRL streams `model.named_parameters()` to vLLM, which for a wrapped model would be the
    `base_weight`/`delta` names the engine does not know. This replaces, on that instance only,
    the iterator its `sync_weights` reads (server and colocate mode) with
    `merged_named_parameters(adapter)`. FSDP/DeepSpeed-sharded syncs are not covered (the
    callback refuses those setups).
    """
    _check_sync_path(vllm_generation)
    model = getattr(vllm_generation, "model", None)
    if model is not adapter.model:
        raise ValueError(
            "the vLLM generator does not drive the wrapped model of this adapter; pass the "
            "trainer's vllm_generation and the adapter of the model given to the trainer"
        )
    fix = getattr(vllm_generation, "_fix_param_name_to_vllm", lambda name: name)

    def iter_named_params():
        for name, tensor in merged_named_parameters(adapter):
            yield fix(name), tensor

    vllm_generation._iter_named_params = iter_named_params
    vllm_generation._weight_metadata = None  # recollected under the new names


def _trl_version() -> str:
    try:
        import trl

        return trl.__version__
    except ImportError:  # pragma: no cover - a stand-in generator without TRL
        return "not installed"


def _check_sync_path(vllm_generation) -> None:
    """UsageError unless TRL's weight sync goes through the `_iter_named_params` this patch
    replaces: the method exists, `sync_weights` (where defined) reads it, and vLLM does not share
    the model's weights directly (a colocate `share_weights` path would bypass the sync)."""
    cls = type(vllm_generation)
    where = f"{cls.__module__}.{cls.__qualname__}"
    supported = (
        f"vhack's vLLM weight sync supports TRL {SUPPORTED_TRL}; this is TRL {_trl_version()}"
    )
    if not callable(getattr(cls, "_iter_named_params", None)):
        raise UsageError(
            f"{where} has no _iter_named_params, the method vhack replaces to send merged weights "
            f"to vLLM (without it vLLM would get the wrapped model's internal names): {supported}"
        )
    sync = getattr(cls, "sync_weights", None)
    code = getattr(sync, "__code__", None)
    if code is not None and "_iter_named_params" not in code.co_names:
        raise UsageError(
            f"{where}.sync_weights does not read _iter_named_params, so vhack's merged weights "
            f"would never reach vLLM: {supported}"
        )
    for owner in (vllm_generation, getattr(vllm_generation, "args", None)):
        for attr in ("share_weights", "vllm_share_weights"):
            if getattr(owner, attr, False) is True:
                raise UsageError(
                    f"TRL's vLLM colocate mode with {attr}=True reads the model's own weights, "
                    "bypassing the sync that sends vhack's merged weights; turn it off (vLLM then "
                    f"receives W + U diag(dS) Vh at every sync): {supported}"
                )
