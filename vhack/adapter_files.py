"""Adapter files (PEFT-style) and the merged export: what keeps a trained dS.

A trained adapter is small (dS: one float32 per singular value of every target weight) while the
base model is large, so it is saved on its own, next to nothing of the base model but a
fingerprint of it:

    adapter.save_pretrained(dir)   ->  dir/adapter_config.json, dir/adapter_model.safetensors
    adapter = vhack.load_adapter(base_model, dir)    # wraps the saved targets, loads dS

adapter_config.json: format ("vhack-adapter") and format_version, vhack_version, targets (module
names, packed order), ranks {name: r}, dtype (of dS: "float32"), base_dtype (of the target weights),
base_model (the model's config._name_or_path, informative) and fingerprint (the base weights'
module names, shapes and singular values at 16 indices, as in `vhack.basis`). A model whose
weights do not match the fingerprint is refused (strict=False: a warning), since the same dS on
other weights is another model.

adapter_model.safetensors: {module name: dS [r] float32}.

`adapter.save_merged(dir)` writes a plain Hugging Face model directory instead (W + U diag(dS) Vh
under the base model's names, no vhack names): `AutoModelForCausalLM.from_pretrained(dir)` loads
the trained model, for serving (vLLM) or publishing (push the directory to the Hub).
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import safetensors
import safetensors.torch
import torch
from torch import nn

from vhack._version import __version__
from vhack.adapter import Adapter, SVDLinear, wrap
from vhack.basis import adapter_fingerprint, fingerprint_mismatches

__all__ = [
    "ADAPTER_CONFIG_NAME",
    "ADAPTER_WEIGHTS_NAME",
    "FORMAT",
    "AdapterFileError",
    "is_adapter_dir",
    "load_adapter",
    "load_adapter_weights",
    "read_adapter_config",
    "save_adapter",
    "save_merged",
]

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT = "vhack-adapter"
FORMAT_VERSION = 1


class AdapterFileError(ValueError):
    """An adapter directory that cannot be read: missing files, not a vhack adapter, damaged."""


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def save_adapter(adapter: Adapter, path: str | os.PathLike) -> Path:
    """Write adapter_config.json and adapter_model.safetensors (dS only) into directory `path`
    (created); returns it. The files are written under temporary names, then renamed."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    dS = adapter.state_dict()  # checks that the adapter is attached; CPU copies follow
    first = next(iter(adapter.modules.values()))
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "vhack_version": __version__,
        "targets": adapter.names,
        "ranks": dict(zip(adapter.names, adapter.ranks, strict=True)),
        "dtype": _dtype_name(adapter.delta.dtype),
        "base_dtype": _dtype_name(first.base_weight.dtype),
        "base_model": str(getattr(getattr(adapter.model, "config", None), "_name_or_path", "")),
        "base_model_class": type(adapter.model).__name__,
        "fingerprint": adapter_fingerprint(adapter),
    }
    tensors = {name: t.cpu().contiguous() for name, t in dS.items()}
    data = safetensors.torch.save(tensors, metadata={"format": "pt", "vhack_version": __version__})
    for name, payload in (
        (ADAPTER_WEIGHTS_NAME, data),
        (ADAPTER_CONFIG_NAME, (json.dumps(config, indent=2) + "\n").encode()),
    ):
        tmp = path / f".{name}.tmp{os.getpid()}"
        tmp.write_bytes(payload)
        tmp.replace(path / name)
    return path


def is_adapter_dir(path: str | os.PathLike) -> bool:
    """True when `path` holds a vhack adapter (adapter_config.json with format vhack-adapter)."""
    config = Path(path) / ADAPTER_CONFIG_NAME
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("format") == FORMAT
    except (ValueError, OSError):
        return False


def read_adapter_config(path: str | os.PathLike) -> dict:
    """The parsed adapter_config.json of a vhack adapter directory (AdapterFileError otherwise)."""
    path = Path(path)
    file = path / ADAPTER_CONFIG_NAME
    if not file.is_file():
        raise AdapterFileError(
            f"{path}: no {ADAPTER_CONFIG_NAME}; not an adapter directory (adapter.save_pretrained "
            "writes one)"
        )
    try:
        config = json.loads(file.read_text())
    except ValueError as err:
        raise AdapterFileError(f"{file}: not valid JSON ({err})") from None
    found = config.get("format") if isinstance(config, dict) else None
    if found != FORMAT:
        raise AdapterFileError(
            f"{file}: not a vhack adapter (format {found!r}, expected {FORMAT!r}); a PEFT "
            "adapter loads with peft, not vhack"
        )
    if config.get("format_version") != FORMAT_VERSION:
        raise AdapterFileError(
            f"{file}: format_version {config.get('format_version')!r}; this vhack reads "
            f"{FORMAT_VERSION}"
        )
    missing = [k for k in ("targets", "ranks", "fingerprint") if k not in config]
    if missing:
        raise AdapterFileError(f"{file}: lacks {missing}")
    return config


def _read_weights(path: Path, config: dict) -> dict[str, torch.Tensor]:
    file = path / ADAPTER_WEIGHTS_NAME
    if not file.is_file():
        raise AdapterFileError(f"{path}: no {ADAPTER_WEIGHTS_NAME} next to {ADAPTER_CONFIG_NAME}")
    try:
        tensors = safetensors.torch.load_file(str(file))
    except Exception as err:
        raise AdapterFileError(
            f"{file}: cannot read it: corrupted, truncated or not safetensors "
            f"({type(err).__name__}: {err})"
        ) from None
    if set(tensors) != set(config["targets"]):
        raise AdapterFileError(
            f"{file}: its tensors do not match the config's targets (missing "
            f"{sorted(set(config['targets']) - set(tensors))[:5]}, unexpected "
            f"{sorted(set(tensors) - set(config['targets']))[:5]})"
        )
    return tensors


def _check_matches(adapter: Adapter, config: dict, path: Path, strict: bool) -> None:
    """Raise unless `adapter` wraps the saved targets with the saved ranks; then compare the
    fingerprint (ValueError, or a warning with strict=False)."""
    targets = list(config["targets"])
    if adapter.names != targets:
        missing = [n for n in targets if n not in adapter.modules]
        extra = [n for n in adapter.names if n not in targets]
        raise ValueError(
            f"{path}: the adapter was saved for other target modules (not wrapped here: "
            f"{missing[:5]}, wrapped but not saved: {extra[:5]})"
        )
    wrong = {
        n: (config["ranks"].get(n), adapter.modules[n].rank)
        for n in targets
        if config["ranks"].get(n) != adapter.modules[n].rank
    }
    if wrong:
        shown = ", ".join(f"{n}: saved r={a}, model r={b}" for n, (a, b) in list(wrong.items())[:5])
        raise ValueError(f"{path}: module shapes differ from the saved adapter's: {shown}")
    problems = fingerprint_mismatches(config["fingerprint"], adapter, targets)
    if problems:
        shown = "; ".join(problems[:3]) + (" ..." if len(problems) > 3 else "")
        message = (
            f"{path}: this adapter was trained on another base model "
            f"({config.get('base_model') or config.get('base_model_class')!r}) than the one given: "
            f"{shown}"
        )
        if strict:
            raise ValueError(message + ". Pass strict=False to load it anyway.")
        warnings.warn(message + " (loaded anyway: strict=False)", stacklevel=3)


def load_adapter_weights(adapter: Adapter, path: str | os.PathLike, strict: bool = True) -> None:
    """Load the dS saved in `path` into an adapter that already wraps the same targets (what
    `Adapter.load_pretrained` does). Nothing is written unless every check passes."""
    path = Path(path)
    config = read_adapter_config(path)
    tensors = _read_weights(path, config)
    _check_matches(adapter, config, path, strict)
    adapter.load_state_dict(tensors)


def load_adapter(
    model: nn.Module,
    path: str | os.PathLike,
    strict: bool = True,
    *,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    progress: bool = False,
) -> Adapter:
    """Wrap an unwrapped base model with the targets saved in `path` and load the saved dS.

    The model must be the base model the adapter was trained on: its weights are compared with
    the saved fingerprint (module names, shapes and singular values); another model is refused
    with a ValueError (strict=False: a warning, and dS is loaded anyway). The model is left
    unwrapped if anything fails. cache_dir / use_cache / progress: as for `vhack.wrap`.
    Returns the Adapter; the model's logits are then those of the saved adapter.
    """
    path = Path(path)
    config = read_adapter_config(path)
    tensors = _read_weights(path, config)
    if any(isinstance(m, SVDLinear) for m in model.modules()):
        raise ValueError(
            "model is already wrapped by vhack; load_adapter wraps a base model: pass the "
            "unwrapped model, or call adapter.load_pretrained(path) on the existing adapter"
        )
    adapter = wrap(
        model, list(config["targets"]), cache_dir=cache_dir, use_cache=use_cache, progress=progress
    )
    try:
        _check_matches(adapter, config, path, strict)
        adapter.load_state_dict(tensors)
    except BaseException:
        adapter.unwrap()
        raise
    return adapter


def save_merged(adapter: Adapter, path: str | os.PathLike, tokenizer=None) -> Path:
    """Write the trained model as a plain Hugging Face model directory (merged weights
    W + U diag(dS) Vh under the base model's names; config; the tokenizer when given). The
    wrapped model is not changed. Needs a transformers PreTrainedModel (`save_pretrained`)."""
    model = adapter.model
    if not callable(getattr(model, "save_pretrained", None)):
        raise TypeError(
            f"save_merged writes a Hugging Face model directory, but the wrapped model "
            f"({type(model).__name__}) has no save_pretrained; save "
            "adapter.merged_state_dict() with safetensors instead"
        )
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(path), state_dict=adapter.merged_state_dict())
    if tokenizer is not None:
        tokenizer.save_pretrained(str(path))
    return path
