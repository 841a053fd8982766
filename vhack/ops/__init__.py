"""Functional entry points of vhack: the SVD-basis linear, its dS gradient, the merge, and the
one-launch projection. `vhack.ops.dispatch` is the one place that knows about backends.

Backends ("reference", "torch", "triton", "cpp") are described in vhack/ops/dispatch.py.
`backend=None` picks the default for the tensors' device; `backends()` says what is available.
Every op validates its inputs before any backend runs, so all backends fail alike.

Layout: one file per op, mirroring vhack/kernels/<op>.py: svd_linear.py (svd_linear, delta_grad,
merge_weight) with its torch path in svd_linear_torch.py; project.py (project_) with its torch
path in project_torch.py, its modes in modes.py (PROJECTION_MODES, check_mode) and the cached
packed layout in layout.py.
"""

from vhack.ops.dispatch import BACKENDS, backends, use_backend
from vhack.ops.modes import PROJECTION_MODES, check_mode
from vhack.ops.project import project_
from vhack.ops.svd_linear import delta_grad, merge_weight, svd_linear

__all__ = [
    "BACKENDS",
    "PROJECTION_MODES",
    "backends",
    "check_mode",
    "delta_grad",
    "merge_weight",
    "project_",
    "svd_linear",
    "use_backend",
]
