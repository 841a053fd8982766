"""Shared test helpers: comparisons that say where and how tensors differ, tolerances per dtype."""

from __future__ import annotations

import torch

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
