"""vhack.reference against brute-force formulas (explicit sums, separate autograd passes)."""

import pytest
import torch
from helpers import assert_close, random_orthonormal_rows
from hypothesis import given
from hypothesis import strategies as st

from vhack import reference

F64 = torch.float64
TOL = dict(rtol=1e-10, atol=1e-12)


def _factors(d_in, d_out, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(d_out, d_in, dtype=dtype, generator=g)
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    dS = 0.1 * torch.randn(S.shape[0], dtype=dtype, generator=g)
    return W, U, S, Vh, dS


def _brute_weight(U, S, Vh):
    """W = sum_i S_i outer(U[:, i], Vh[i]) as an explicit sum of rank-one terms."""
    W = torch.zeros(U.shape[0], Vh.shape[1], dtype=U.dtype)
    for i in range(S.shape[0]):
        W += S[i] * torch.outer(U[:, i], Vh[i])
    return W


@given(d_in=st.integers(1, 9), d_out=st.integers(1, 9), n=st.integers(1, 5), bias=st.booleans())
def test_svd_linear_matches_rank_one_sum(d_in, d_out, n, bias):
    _W, U, S, Vh, dS = _factors(d_in, d_out)
    x = torch.randn(n, d_in, dtype=F64)
    b = torch.randn(d_out, dtype=F64) if bias else None
    expected = x @ _brute_weight(U, S + dS, Vh).T + (b if bias else 0)
    assert_close(reference.svd_linear(x, U, S, dS, Vh, b), expected, **TOL)


def test_svd_linear_keeps_leading_dims_and_dtype():
    _, U, S, Vh, dS = _factors(6, 5)
    x = torch.randn(2, 3, 6, dtype=torch.float32)
    y = reference.svd_linear(x, U.float(), S.float(), dS.float(), Vh.float())
    assert y.shape == (2, 3, 5) and y.dtype == torch.float32


@given(
    d_in=st.integers(1, 8),
    d_out=st.integers(1, 8),
    n_rows=st.integers(0, 12),
    n_segments=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
def test_delta_grad_matches_autograd_per_segment(d_in, d_out, n_rows, n_segments, seed):
    g = torch.Generator().manual_seed(seed)
    _, U, S, Vh, dS = _factors(d_in, d_out, seed)
    x = torch.randn(n_rows, d_in, dtype=F64, generator=g)
    gy = torch.randn(n_rows, d_out, dtype=F64, generator=g)
    seg = torch.randint(0, n_segments, (n_rows,), generator=g)

    per_seg = reference.delta_grad(x, gy, U, Vh, seg, n_segments)
    assert per_seg.shape == (n_segments, S.shape[0])
    for s in range(n_segments):
        rows = seg == s
        dS_s = dS.clone().requires_grad_(True)
        y = reference.svd_linear(x[rows], U, S, dS_s, Vh)
        (grad,) = torch.autograd.grad((y * gy[rows]).sum(), dS_s, allow_unused=True)
        assert_close(per_seg[s], grad, **TOL, name=f"segment {s}")
    assert_close(per_seg.sum(0), reference.delta_grad(x, gy, U, Vh), **TOL, name="batch")


def test_delta_grad_3d_input_and_default_n_segments():
    _, U, _, Vh, _ = _factors(4, 3)
    x, gy = torch.randn(2, 5, 4, dtype=F64), torch.randn(2, 5, 3, dtype=F64)
    seg = torch.arange(2).repeat_interleave(5)
    out = reference.delta_grad(x, gy, U, Vh, seg)
    assert out.shape == (2, 3)
    assert_close(out[1], reference.delta_grad(x[1], gy[1], U, Vh), **TOL)


@given(d_in=st.integers(1, 9), d_out=st.integers(1, 9))
def test_merge_weight_with_and_without_base(d_in, d_out):
    W, U, S, Vh, dS = _factors(d_in, d_out)
    assert_close(reference.merge_weight(U, S, dS, Vh), _brute_weight(U, S + dS, Vh), **TOL)
    with_base = reference.merge_weight(U, S, dS, Vh, base=W)
    assert_close(with_base, W + _brute_weight(U, dS, Vh), **TOL)
    assert torch.equal(reference.merge_weight(U, S, torch.zeros_like(dS), Vh, base=W), W)


# ---- project_ ------------------------------------------------------------------------------------


def _brute_project(g, V, mode, alpha):
    """One module, by explicit loops over rows: returns (g', c)."""
    k, r = V.shape
    c = torch.tensor([sum(V[j, i] * g[i] for i in range(r)) for j in range(k)], dtype=F64)
    phi = {
        "hackward": c.clamp_min(0),
        "both": c,
        "reverse": 2 * c,
        "measure": torch.zeros_like(c),
    }[mode] * alpha
    out = g.clone()
    for j in range(k):
        out -= phi[j] * V[j]
    return out, c


def _module_set(rs, ks, seed=0):
    """Packed grad, offsets, packed basis (k_max = ks + 1 rows stored), and the blocks."""
    g = torch.Generator().manual_seed(seed)
    grads = [torch.randn(r, dtype=F64, generator=g) for r in rs]
    blocks = [random_orthonormal_rows(min(k + 1, r), r, g) for k, r in zip(ks, rs, strict=True)]
    grad = torch.cat(grads)
    offsets = torch.tensor([0, *torch.tensor(rs).cumsum(0).tolist()], dtype=torch.int64)
    sizes = [b.numel() for b in blocks]
    basis_offsets = torch.tensor([0, *torch.tensor(sizes).cumsum(0).tolist()], dtype=torch.int64)
    basis = torch.cat([b.reshape(-1) for b in blocks])
    return grad, offsets, basis, basis_offsets, torch.tensor(ks, dtype=torch.int64), blocks


@pytest.mark.parametrize("mode", reference.PROJECTION_MODES)
@pytest.mark.parametrize("alpha", [1.0, 0.5, 1.7])
def test_project_matches_brute_force(mode, alpha):
    rs, ks = [5, 1, 7, 3], [2, 0, 3, 1]
    grad, offsets, basis, basis_offsets, kt, blocks = _module_set(rs, ks)
    before = grad.clone()
    stats = reference.project_(grad, offsets, basis, basis_offsets, kt, mode, alpha)
    for m, (_r, k) in enumerate(zip(rs, ks, strict=True)):
        lo, hi = int(offsets[m]), int(offsets[m + 1])
        g_new, c = _brute_project(before[lo:hi], blocks[m][:k], mode, alpha)
        assert_close(grad[lo:hi], g_new, **TOL, name=f"module {m} grad")
        expected = [c.norm(), c.clamp_min(0).norm(), before[lo:hi].norm(), g_new.norm()]
        assert_close(stats[m], torch.stack(expected), **TOL, name=f"module {m} stats")


def test_project_properties():
    rs, ks = [6, 9, 4], [3, 2, 4]
    grad, offsets, basis, basis_offsets, kt, blocks = _module_set(rs, ks, seed=3)
    for mode in ("both", "hackward"):
        g = grad.clone()
        reference.project_(g, offsets, basis, basis_offsets, kt, mode)
        again = g.clone()
        reference.project_(again, offsets, basis, basis_offsets, kt, mode)
        assert_close(again, g, **TOL, name=f"{mode} idempotent")
        for m, k in enumerate(ks):
            c = blocks[m][:k] @ g[int(offsets[m]) : int(offsets[m + 1])]
            if mode == "both":
                assert c.abs().max() < 1e-12
            else:
                assert c.max() < 1e-12
            orig = grad[int(offsets[m]) : int(offsets[m + 1])]
            assert g[int(offsets[m]) : int(offsets[m + 1])].norm() <= orig.norm() + 1e-12


def test_project_zero_and_nonfinite_modules():
    rs, ks = [4, 4, 4], [2, 2, 2]
    grad, offsets, basis, basis_offsets, kt, _ = _module_set(rs, ks)
    grad[0:4] = 0.0
    grad[5] = float("nan")
    untouched = grad[8:12].clone()
    stats = reference.project_(grad, offsets, basis, basis_offsets, kt, "both")
    assert torch.equal(stats[0], torch.zeros(4, dtype=F64))  # zero gradient: zeros, not NaN
    assert torch.isnan(stats[1, 2]) and torch.isnan(grad[5])  # NaN reported, module left alone
    assert torch.isfinite(stats[2]).all() and not torch.equal(grad[8:12], untouched)


def test_project_preserve_magnitude():
    grad, offsets, basis, basis_offsets, kt, _ = _module_set([8, 5], [3, 2], seed=1)
    before = grad.clone()
    stats = reference.project_(
        grad, offsets, basis, basis_offsets, kt, "both", preserve_magnitude=True
    )
    assert_close(stats[:, 3], stats[:, 2], **TOL)
    assert_close(grad[:8].norm(), before[:8].norm(), **TOL)


def test_project_rejects_unknown_mode():
    grad, offsets, basis, basis_offsets, kt, _ = _module_set([3], [1])
    with pytest.raises(ValueError, match="mode must be one of"):
        reference.project_(grad, offsets, basis, basis_offsets, kt, "sideways")


# ---- extraction maths ---------------------------------------------------------------------------


def test_project_nonfinite_basis_block_leaves_module_untouched():
    """A NaN in a module's basis (finite gradient) must not spread into that module's gradient."""
    grad, offsets, basis, basis_offsets, kt, _ = _module_set([4, 4], [2, 2])
    basis[1] = float("nan")  # module 0's first row
    before = grad.clone()
    stats = reference.project_(grad, offsets, basis, basis_offsets, kt, "both")
    assert torch.equal(grad[:4], before[:4]) and torch.isnan(stats[0, 0])
    assert stats[0, 3] == stats[0, 2] and not torch.equal(grad[4:], before[4:])


def test_project_preserve_magnitude_leaves_a_gradient_inside_the_span():
    """g in span(V): g' is rounding residue, which is not stretched back to |g|."""
    grad, offsets, basis, basis_offsets, kt, blocks = _module_set([6], [2])
    grad[:] = 3.0 * blocks[0][0] - 2.0 * blocks[0][1]
    stats = reference.project_(
        grad, offsets, basis, basis_offsets, kt, "both", preserve_magnitude=True
    )
    assert grad.abs().max() < 1e-12 and stats[0, 3] < 1e-12
