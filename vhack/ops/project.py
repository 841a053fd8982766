"""vhack.ops.project_: input checks, backend dispatch and torch.library registration of the
one-launch projection. Mirrors vhack/kernels/project.py (Triton: ONE launch for every module, the
CUDA default); "cpp" is torch.ops.vhack_cpp.project_ from vhack._C (the CPU default when built);
"torch" is vhack/ops/project_torch.py; "reference" the oracle in vhack/reference.py.
"""

from __future__ import annotations

import math

import torch

from vhack import reference
from vhack.kernels.utils import FLOAT_DTYPES, check_same_device, check_tensor, empty
from vhack.ops.dispatch import choose_backend
from vhack.ops.layout import layout_for
from vhack.ops.modes import check_mode
from vhack.ops.project_torch import project_torch_

__all__ = ["project_"]


def _check_project(grad, offsets, basis, basis_offsets, ks, mode, alpha):
    check_tensor(grad, "grad", dim=1, contiguous=True)
    check_tensor(offsets, "offsets", dim=1, dtypes=(torch.int64,))
    check_tensor(basis, "basis", dim=1, dtypes=FLOAT_DTYPES, contiguous=True)
    check_tensor(basis_offsets, "basis_offsets", dim=1, dtypes=(torch.int64,))
    check_tensor(ks, "ks", dim=1, dtypes=(torch.int64,))
    check_mode(mode)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        raise TypeError(f"alpha must be a Python number, got {type(alpha).__name__}")
    if not math.isfinite(alpha):
        raise ValueError(f"alpha must be finite, got {alpha}")
    n_modules = offsets.shape[0] - 1
    if n_modules < 0:
        raise ValueError("offsets must have M + 1 >= 1 entries")
    if basis_offsets.shape[0] != n_modules + 1 or ks.shape[0] != n_modules:
        raise ValueError(
            f"offsets has {n_modules + 1} entries (M = {n_modules}), so basis_offsets needs "
            f"{n_modules + 1} and ks {n_modules}; got {basis_offsets.shape[0]} and {ks.shape[0]}"
        )
    if grad.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            "project_ modifies grad in place, but grad requires grad: pass a gradient "
            "(param.grad) or a detached tensor, or call it under torch.no_grad()"
        )
    return check_same_device(
        grad=grad, offsets=offsets, basis=basis, basis_offsets=basis_offsets, ks=ks
    )


def _project_impl(grad, offsets, basis, basis_offsets, ks, mode, alpha, preserve, backend):
    """Run project_ on a resolved backend; inputs already checked. Returns float32 [M, 4]."""
    grad = grad.detach()
    layout = layout_for(offsets, basis_offsets, ks, grad.numel(), basis.numel())
    if backend == "reference":
        return reference.project_(
            grad, offsets, basis, basis_offsets, ks, mode, alpha, preserve
        ).float()
    if backend == "triton":
        from vhack.kernels import project as kernels

        return kernels.project_(
            grad,
            offsets,
            basis,
            basis_offsets,
            ks,
            layout.order,
            layout.k_max,
            mode,
            alpha,
            preserve,
        )
    if backend == "cpp":
        if basis.dtype not in (torch.float32, torch.float64):
            basis = basis.float()  # the C++ op reads float32/float64 bases
        stats = empty((layout.n_modules, 4), torch.float32, grad.device)
        torch.ops.vhack_cpp.project_(
            grad, offsets, basis, basis_offsets, ks, stats, mode, alpha, preserve
        )
        return stats
    return project_torch_(grad, basis, layout, mode, alpha, preserve)


@torch.library.custom_op("vhack::project_", mutates_args=("grad",))
def _project_op(
    grad: torch.Tensor,
    offsets: torch.Tensor,
    basis: torch.Tensor,
    basis_offsets: torch.Tensor,
    ks: torch.Tensor,
    projection_mode: str,  # not "mode": torch's mode redirection passes a keyword of that name
    alpha: float,
    preserve_magnitude: bool,
    backend: str,
) -> torch.Tensor:
    return _project_impl(
        grad,
        offsets,
        basis,
        basis_offsets,
        ks,
        projection_mode,
        alpha,
        preserve_magnitude,
        backend,
    )


@_project_op.register_fake
def _(grad, offsets, basis, basis_offsets, ks, projection_mode, alpha, preserve, backend):
    return grad.new_empty((offsets.shape[0] - 1, 4), dtype=torch.float32)


def project_(
    grad: torch.Tensor,
    offsets: torch.Tensor,
    basis: torch.Tensor,
    basis_offsets: torch.Tensor,
    ks: torch.Tensor,
    mode: str = "hackward",
    alpha: float = 1.0,
    *,
    preserve_magnitude: bool = False,
    backend: str | None = None,
) -> torch.Tensor:
    """Project every module's slice of the packed gradient in place; return float32 stats [M, 4].

    grad [R_total] packed (float32/bfloat16/float16; float64 off the Triton path), modified in
    place; offsets int64 [M + 1]; basis packed, module m's row-major k_max_m x r_m block at
    basis[basis_offsets[m]:basis_offsets[m+1]]; ks int64 [M] rows to use (0 = not projected). See
    `vhack.ops.modes` for the modes; stats columns: |Vg|, |relu(Vg)|, |g| before, after.
    Modules with a non-finite |g| (or c) are left untouched and show it in their stats.

    The layout's values are checked once per (offsets, basis_offsets, ks) tensors and cached
    (keyed by their identity and version): reuse the same index tensors across calls and the call
    makes no host synchronisation. Under torch.compile (and for fake or other tensor subclasses)
    the call goes through the custom op `torch.ops.vhack.project_` (grad declared mutated).
    """
    device = _check_project(grad, offsets, basis, basis_offsets, ks, mode, alpha)
    chosen = choose_backend("project_", backend, device, grad, basis)
    args = (grad, offsets, basis, basis_offsets, ks, mode, float(alpha), bool(preserve_magnitude))
    if torch.compiler.is_compiling() or type(grad) is not torch.Tensor:  # traced, or fake
        return _project_op(*args, chosen)
    return _project_impl(*args, chosen)
