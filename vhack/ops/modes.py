"""The projection modes of `vhack.ops.project_`: their one definition and their one check.

Every path names its modes from here: `vhack.Projector` and `vhack.ops.project_` check a mode once,
at the API edge, with `check_mode`; the reference oracle (vhack/reference.py), the torch path
(project_torch.py) and the sharded projector use `PROJECTION_MODES` and `coefficient_step`. Two
paths cannot import it and mirror it instead, with a test that holds them to it: the Triton kernel
(kernels/project.py `MODES`, which imports nothing from vhack) and the C++ op (csrc/project.cpp
`parse_mode`, a string check). With c = V g (coefficients of the gradient on the basis rows):

  hackward  g' = g - alpha V^T relu(c)   (removes the hack-ward side only; the default)
  both      g' = g - alpha V^T c         (removes span(V))
  reverse   g' = g - 2 alpha V^T c       (reflects through span(V))
  measure   g' = g                       (statistics only)
"""

from __future__ import annotations

import torch

__all__ = ["PRESERVE_MIN_RATIO", "PROJECTION_MODES", "check_mode", "coefficient_step"]

PROJECTION_MODES = ("hackward", "both", "reverse", "measure")
# preserve_magnitude leaves g' as is when |g'| <= PRESERVE_MIN_RATIO |g|: g lies in span(V) up to
# rounding, and rescaling that residue would blow rounding noise up to |g|. Every backend uses this
# value (csrc/project.cpp and kernels/project.py repeat it).
PRESERVE_MIN_RATIO = 1e-5


def check_mode(mode: object) -> str:
    """mode, if it is one of PROJECTION_MODES; ValueError naming them otherwise."""
    if not isinstance(mode, str) or mode not in PROJECTION_MODES:
        raise ValueError(f"mode must be one of {PROJECTION_MODES}, got {mode!r}")
    return mode


def coefficient_step(c: torch.Tensor, mode: str, alpha: float) -> torch.Tensor:
    """phi [..., k] from the coefficients c [..., k] for a projecting mode (not "measure"):
    g' = g - V^T phi. relu keeps a NaN (clamp_min), so a non-finite c stays visible."""
    if mode == "hackward":
        phi = c.clamp_min(0)
    elif mode == "both":
        phi = c
    elif mode == "reverse":
        phi = 2.0 * c
    else:
        raise ValueError(f"coefficient_step needs a projecting mode, got {mode!r}")
    return phi * alpha
