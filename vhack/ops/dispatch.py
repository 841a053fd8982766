"""Backend choice for every op of vhack.ops: which backends exist, which are available here, and
the one function (`choose_backend`) that picks the backend an op call runs on.

Backends:
  "reference"  vhack.reference: eager, readable, float64-safe; always available.
  "torch"      vectorised PyTorch: the CPU path, and the CUDA path where no kernel exists.
  "triton"     Triton kernels (vhack.kernels): the default for CUDA tensors; runs on CPU tensors
               only under TRITON_INTERPRET=1 (set before triton is imported).
  "cpp"        the C++ extension vhack._C (CPU), when it was built.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache

import torch

from vhack.kernels.utils import interpreter_enabled

__all__ = [
    "BACKENDS",
    "IMPLEMENTED",
    "available",
    "backends",
    "choose_backend",
    "cpp_available",
    "triton_importable",
    "use_backend",
]

BACKENDS = ("reference", "torch", "triton", "cpp")

# Which backends implement each op.
IMPLEMENTED: dict[str, tuple[str, ...]] = {
    "svd_linear": ("reference", "torch", "triton"),
    "delta_grad": ("reference", "torch", "triton"),
    "merge_weight": ("reference", "torch", "triton"),
    "project_": ("reference", "torch", "triton", "cpp"),
}
# Preferred order per device type; the first implemented and available backend wins.
_PREFERENCE = {"cuda": ("triton", "torch"), "cpu": ("cpp", "torch")}
# Set by use_backend(): the backend that calls with backend=None use, where the op implements it.
_forced: str | None = None


@contextmanager
def use_backend(backend: str) -> Iterator[None]:
    """Within the block, ops called with backend=None (e.g. inside SVDLinear) run on `backend`
    wherever the op implements it; ops without it keep their default. Not thread-local."""
    global _forced
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    previous, _forced = _forced, backend
    try:
        yield
    finally:
        _forced = previous


@cache
def triton_importable() -> bool:
    """Whether the triton package is installed (it is not imported here)."""
    return importlib.util.find_spec("triton") is not None


@cache
def cpp_available() -> bool:
    """Whether the C++ extension vhack._C was built and loads."""
    try:
        importlib.import_module("vhack._C")
    except ImportError:
        return False
    return True


def available(backend: str, device_type: str) -> bool:
    """Whether `backend` can run on tensors of `device_type` ("cpu", "cuda") here."""
    if backend in ("reference", "torch"):
        return True
    if backend == "triton":
        return triton_importable() and (device_type == "cuda" or interpreter_enabled())
    if backend == "cpp":
        return device_type == "cpu" and cpp_available()
    return False


def _resolve(op: str, backend: str | None, device: torch.device) -> str:
    """The backend that runs `op` on `device`: `backend` if given (checked), else the default."""
    implemented = IMPLEMENTED[op]
    if backend is None and _forced is not None and _forced in implemented:
        backend = _forced
    if backend is None:
        for choice in _PREFERENCE.get(device.type, ("torch",)):
            if choice in implemented and available(choice, device.type):
                return choice
        return "torch"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    if backend not in implemented:
        raise ValueError(f"{op} has no {backend!r} backend; implemented: {implemented}")
    if not available(backend, device.type):
        if backend == "triton":
            raise RuntimeError(
                f"backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before triton is "
                f"imported to run the kernels on CPU tensors (got {device.type} tensors"
                f"{', triton not installed' if not triton_importable() else ''})"
            )
        raise RuntimeError(
            f"backend={backend!r} is not available for {device.type} tensors here; "
            f"see vhack.ops.backends()"
        )
    return backend


def choose_backend(
    op: str, backend: str | None, device: torch.device, *tensors: torch.Tensor | None
) -> str:
    """The backend that runs `op` on `device` with these input tensors.

    backend: the one asked for (checked: implemented by the op, available here), or None for the
    default of the device (`use_backend` can override it). The Triton kernels accumulate in
    float32 and refuse float64: float64 inputs take the torch path by default, and an explicit
    backend="triton" with float64 inputs raises TypeError.
    """
    chosen = _resolve(op, backend, device)
    if chosen == "triton" and any(t is not None and t.dtype == torch.float64 for t in tensors):
        if backend == "triton":
            others = " or ".join(repr(b) for b in IMPLEMENTED[op] if b in ("torch", "cpp"))
            raise TypeError(
                f"{op}: backend='triton' takes float32/bfloat16/float16 tensors (it accumulates "
                f"in float32); use backend={others} for float64"
            )
        return "torch"
    return chosen


def backends() -> dict:
    """What is available here: flags per backend, the ops each implements, and the default backend
    of every op per device type ("cpu", and "cuda" when a GPU is visible)."""
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return {
        "triton": triton_importable(),
        "triton_interpreter": interpreter_enabled(),
        "cpp": cpp_available(),
        "cuda": torch.cuda.is_available(),
        "ops": dict(IMPLEMENTED),
        "default": {
            dev: {op: _resolve(op, None, torch.device(dev)) for op in IMPLEMENTED}
            for dev in devices
        },
    }
