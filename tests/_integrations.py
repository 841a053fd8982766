"""Shared set-up of the vhack.integrations tests."""

from __future__ import annotations

import torch

import vhack


def wrapped(seed: int = 0, **config):
    """(tiny model wrapped, its adapter, a random orthonormal basis {name: V [2, r]})."""
    model = vhack.models.tiny_model(seed=seed, **config)
    adapter = vhack.wrap(model, progress=False, use_cache=False)
    g = torch.Generator().manual_seed(seed + 1)
    basis = {}
    for name, mod in adapter.modules.items():
        q, _ = torch.linalg.qr(torch.randn(mod.rank, 2, generator=g, dtype=torch.float64))
        basis[name] = q.T.contiguous()
    return model, adapter, basis
