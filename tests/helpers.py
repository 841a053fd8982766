"""Shared test helpers: the test device, comparisons that say where and how tensors differ,
tolerances per dtype, and a guard against host synchronisation."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

# The ONE device switch of the suite. VHACK_TEST_CUDA=1 (conftest.py then leaves TRITON_INTERPRET
# unset) runs every kernel test on CUDA tensors through the compiled kernels; otherwise the tests
# use CPU tensors and Triton's interpreter. Kernel tests take their device from here (DEVICE, or
# device_for(backend)), never from a literal.
CUDA_TESTS = os.environ.get("VHACK_TEST_CUDA") == "1"
DEVICE = torch.device("cuda" if CUDA_TESTS else "cpu")


def device_for(backend: str) -> torch.device:
    """Where a backend's tests run: the C++ op ("cpp") serves CPU tensors only; every other
    backend (triton, torch, reference) runs on DEVICE."""
    return torch.device("cpu") if backend == "cpp" else DEVICE


# (rtol, atol) for results computed in float32 from inputs of the given dtype, compared with a
# float64 reference. bf16/fp16 inputs are rounded once before the kernel sees them, so the kernel's
# own error is float32 accumulation error; the reference is fed the same rounded values.
TOLERANCES = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1e-4, 1e-5),
    torch.float16: (2e-3, 1e-3),
    torch.bfloat16: (1e-2, 1e-2),
}


def assert_close(actual, expected, *, rtol: float, atol: float, name: str = "tensor") -> None:
    """torch.testing-style check that reports NaN/inf mismatches and the first bad indices."""
    actual = torch.as_tensor(actual).detach().cpu()
    expected = torch.as_tensor(expected).detach().cpu()
    assert actual.shape == expected.shape, (
        f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    )
    a, e = actual.double(), expected.double()
    nan_mismatch = torch.isnan(a) != torch.isnan(e)
    if nan_mismatch.any():
        idx = nan_mismatch.nonzero()[:5].tolist()
        raise AssertionError(f"{name}: NaN where the reference has none (or vice versa) at {idx}")
    finite = torch.isfinite(e) & torch.isfinite(a)
    inf_mismatch = (~torch.isnan(e)) & (~finite) & (a != e)
    if inf_mismatch.any():
        raise AssertionError(f"{name}: inf mismatch at {inf_mismatch.nonzero()[:5].tolist()}")
    err = (a - e).abs()
    bad = finite & (err > atol + rtol * e.abs())
    if bad.any():
        idx = bad.nonzero()
        first = idx[:5].tolist()
        worst = err[finite].max().item()
        raise AssertionError(
            f"{name}: {idx.shape[0]} of {a.numel()} elements out of tolerance (rtol={rtol}, "
            f"atol={atol}); max abs error {worst:.3e}; first at {first}: "
            f"got {[a[tuple(i)].item() for i in first]}, expected {[e[tuple(i)].item() for i in first]}"
        )


def relative_error(actual, expected) -> float:
    """|actual - expected| / |expected| in the Frobenius norm (0 when both are zero)."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    denom = e.norm().item()
    return (a - e).norm().item() / denom if denom > 0 else (a - e).norm().item()


def random_orthonormal_rows(k: int, r: int, generator: torch.Generator | None = None):
    """[k, r] float64 with orthonormal rows (k <= r)."""
    q, _ = torch.linalg.qr(torch.randn(r, k, dtype=torch.float64, generator=generator))
    return q.T.contiguous()


def record_launches(monkeypatch, module, kernel_name: str) -> list:
    """Replace the Triton kernel `module.kernel_name` by a wrapper that records the grid of every
    launch (`kernel[grid](...)`) and then launches the real kernel; return the (live) list."""
    launches = []
    real = getattr(module, kernel_name)

    class Recording:
        def __getitem__(self, grid):
            launches.append(grid)
            return real[grid]

    monkeypatch.setattr(module, kernel_name, Recording())
    return launches


# Tensor methods and torch functions that copy a value to the host (and so wait for the device):
# Python conversions, value-dependent output sizes, whole-tensor comparisons returning a bool.
_TENSOR_SYNC_POINTS = (
    "__bool__", "__int__", "__float__", "__index__", "__complex__", "__format__", "__array__",
    "item", "tolist", "numpy", "cpu", "nonzero", "nonzero_static", "unique",
    "unique_consecutive", "masked_select", "equal", "allclose",
)  # fmt: skip
_TORCH_SYNC_POINTS = (
    "equal", "allclose", "is_nonzero", "nonzero", "unique", "unique_consecutive",
    "masked_select",
)  # fmt: skip


@contextlib.contextmanager
def forbid_host_sync() -> Iterator[contextlib.AbstractContextManager]:
    """Within the block, any host synchronisation point raises AssertionError naming it.

    Patches the Tensor methods and torch functions above (every device: on CPU nothing would
    otherwise notice), torch.cuda.synchronize, and on CUDA also sets
    torch.cuda.set_sync_debug_mode("error"), which catches every synchronising CUDA call whatever
    its Python spelling. Yields a context manager that lifts the patches (not the CUDA sync
    mode) for code that is not under test, e.g. the Triton interpreter running a kernel, which
    reads tensors through numpy."""
    saved: list[tuple[object, str, object]] = []

    def patch(owner, name: str) -> None:
        if not hasattr(owner, name):
            return
        label = f"{getattr(owner, '__name__', owner)}.{name}"

        def sync(*args, **kwargs):
            raise AssertionError(f"host synchronisation ({label}) in code that must not sync")

        saved.append((owner, name, owner.__dict__.get(name, _MISSING)))
        setattr(owner, name, sync)

    def restore() -> None:
        for owner, name, original in reversed(saved):
            if original is _MISSING:
                delattr(owner, name)
            else:
                setattr(owner, name, original)

    def apply() -> None:
        saved.clear()
        for name in _TENSOR_SYNC_POINTS:
            patch(torch.Tensor, name)
        for name in _TORCH_SYNC_POINTS:
            patch(torch, name)
        patch(torch.cuda, "synchronize")

    @contextlib.contextmanager
    def lifted() -> Iterator[None]:
        restore()
        try:
            yield
        finally:
            apply()

    cuda = torch.cuda.is_available()
    previous_mode = torch.cuda.get_sync_debug_mode() if cuda else None
    apply()
    if cuda:
        torch.cuda.set_sync_debug_mode("error")
    try:
        yield lifted
    finally:
        restore()
        if cuda:
            torch.cuda.set_sync_debug_mode(previous_mode)


_MISSING = object()


def assert_one_line_error(rc: int, err: str, command: str, *fragments: str) -> None:
    """A `vhack COMMAND` user error: exit status 2, no traceback, one line on stderr that starts
    with `vhack COMMAND: error: ` and holds every fragment."""
    assert rc == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"vhack {command}: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, err)
