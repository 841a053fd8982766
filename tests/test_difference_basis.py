"""The extraction math: per-module PCA of paired gradient differences (vhack.difference_basis)."""

import pytest
import torch
from helpers import assert_close

from vhack import difference_basis

F64 = torch.float64
TOL = dict(rtol=1e-10, atol=1e-12)


def test_orientation_majority_vote_and_ties():
    V = torch.eye(3, dtype=F64)
    D = torch.tensor([[1.0, -1.0, 1.0], [1.0, -1.0, -1.0], [-1.0, -1.0, 0.0]], dtype=F64)
    out = difference_basis.orient_by_majority(V, D)
    # axis 0: 2 pos vs 1 neg -> kept; axis 1: 0 vs 3 -> flipped; axis 2: 1 vs 1 (one abstains) -> +
    assert torch.equal(out, torch.diag(torch.tensor([1.0, -1.0, 1.0], dtype=F64)))


def test_paired_difference_basis_finds_planted_direction_and_orients_it():
    g = torch.Generator().manual_seed(0)
    r, n = 40, 10
    v = torch.randn(r, dtype=F64, generator=g)
    v /= v.norm()
    clean = torch.randn(n, r, dtype=F64, generator=g)
    strength = 3.0 + torch.rand(n, dtype=F64, generator=g)
    hack = clean + strength[:, None] * v + 0.05 * torch.randn(n, r, dtype=F64, generator=g)
    V, sv = difference_basis.paired_difference_basis(hack, clean, top_k=4)
    assert V.shape == (4, r) and sv.shape == (4,)
    assert V[0] @ v > 0.99  # found, and oriented hack-ward
    assert_close(V @ V.T, torch.eye(4, dtype=F64), rtol=0, atol=1e-10)
    assert torch.all(sv[:-1] >= sv[1:])
    V_flipped, sv_flipped = difference_basis.paired_difference_basis(clean, hack, top_k=4)
    assert V_flipped[0] @ v < -0.99  # swapping hack and clean flips the axis
    assert_close(sv_flipped, sv, **TOL)


def test_paired_difference_basis_tau_axis_and_small_n():
    g = torch.Generator().manual_seed(1)
    hack, clean = torch.randn(3, 20, dtype=F64, generator=g), torch.zeros(3, 20, dtype=F64)
    V, sv = difference_basis.paired_difference_basis(hack, clean, top_k=12)
    assert V.shape == (3, 20)  # k = min(top_k, n_pairs, r)
    tau = float((sv[1] / sv[0] + sv[2] / sv[0]) / 2)  # between the 2nd and 3rd ratio
    V_tau, sv_tau = difference_basis.paired_difference_basis(hack, clean, top_k=12, tau_axis=tau)
    assert V_tau[2].abs().max() == 0 and V_tau[1].abs().max() > 0
    assert_close(sv_tau, sv, **TOL)  # singular values are kept for zeroed rows
    V0, sv0 = difference_basis.paired_difference_basis(clean, clean, top_k=2)
    assert torch.equal(V0, torch.zeros_like(V0)) and torch.equal(sv0, torch.zeros_like(sv0))
    with pytest.raises(ValueError, match="n_pairs, r"):
        difference_basis.paired_difference_basis(hack, clean[:2], top_k=2)


def test_paired_difference_basis_batches_modules_of_one_shape():
    g = torch.Generator().manual_seed(2)
    hack, clean = torch.randn(3, 6, 15, dtype=F64, generator=g), torch.randn(3, 6, 15, dtype=F64)
    clean[1] = hack[1]  # a module with D = 0 inside the batch
    V, sv = difference_basis.paired_difference_basis(hack, clean, top_k=4, tau_axis=0.3)
    assert V.shape == (3, 4, 15) and sv.shape == (3, 4)
    for m in range(3):
        V_m, sv_m = difference_basis.paired_difference_basis(
            hack[m], clean[m], top_k=4, tau_axis=0.3
        )
        assert_close(V[m], V_m, **TOL, name=f"V module {m}")
        assert_close(sv[m], sv_m, **TOL, name=f"sv module {m}")
    assert torch.equal(V[1], torch.zeros_like(V[1]))
