"""vhack.ops: dispatch, input validation shared by every backend, autograd of svd_linear."""

import pytest
import torch
from helpers import assert_close

from vhack import ops, reference
from vhack.ops import dispatch
from vhack.ops.dispatch import choose_backend

F64 = torch.float64


def _factors(d_in=5, d_out=4, dtype=F64, seed=0):
    g = torch.Generator().manual_seed(seed)
    U, S, Vh = torch.linalg.svd(
        torch.randn(d_out, d_in, dtype=F64, generator=g), full_matrices=False
    )
    dS = 0.1 * torch.randn(S.shape[0], dtype=F64, generator=g)
    fp = torch.float64 if dtype == F64 else torch.float32
    return U.to(dtype), S.to(fp), dS.to(fp), Vh.to(dtype)


def test_backends_report():
    info = ops.backends()
    assert set(info["ops"]) == {"svd_linear", "delta_grad", "merge_weight", "project_"}
    for op, impls in info["ops"].items():
        assert "reference" in impls and info["default"]["cpu"][op] in impls
    assert isinstance(info["triton"], bool) and isinstance(info["cpp"], bool)


def test_backend_errors():
    U, S, dS, Vh = _factors()
    x = torch.randn(3, 5, dtype=F64)
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.svd_linear(x, U, S, dS, Vh, backend="cuda")
    with pytest.raises(ValueError, match="backend must be one of"), ops.use_backend("fast"):
        pass
    for op, impls in ops.backends()["ops"].items():
        for b in ops.BACKENDS:
            if b not in impls:
                with pytest.raises(ValueError, match=f"has no '{b}' backend"):
                    choose_backend(op, b, torch.device("cpu"))


def test_use_backend_sets_default_and_restores():
    with ops.use_backend("reference"):
        assert choose_backend("svd_linear", None, torch.device("cpu")) == "reference"
    assert choose_backend("svd_linear", None, torch.device("cpu")) != "reference"


def test_svd_linear_gradcheck_float64():
    U, S, dS, Vh = _factors()
    x = torch.randn(2, 3, 5, dtype=F64, requires_grad=True)
    S = S.clone().requires_grad_(True)
    dS = dS.clone().requires_grad_(True)
    bias = torch.randn(4, dtype=F64, requires_grad=True)
    for backend in ("torch", "reference"):
        assert torch.autograd.gradcheck(
            lambda x, S, dS, b, be=backend: ops.svd_linear(x, U, S, dS, Vh, b, backend=be),
            (x, S, dS, bias),
        )


def test_svd_linear_with_weight_matches_factored_and_its_gradients():
    U, S, dS, Vh = _factors(7, 6)
    W = reference.merge_weight(U, S, dS, Vh)
    x = torch.randn(4, 7, dtype=F64, requires_grad=True)
    dS = dS.clone().requires_grad_(True)
    gy = torch.randn(4, 6, dtype=F64)
    y = ops.svd_linear(x, U, S, dS, Vh, weight=W)
    y_ref = reference.svd_linear(x, U, S, dS, Vh)
    assert_close(y, y_ref, rtol=1e-10, atol=1e-12)
    gx, gdS = torch.autograd.grad((y * gy).sum(), (x, dS))
    gx_ref, gdS_ref = torch.autograd.grad((y_ref * gy).sum(), (x, dS))
    assert_close(gx, gx_ref, rtol=1e-10, atol=1e-12, name="dx")
    assert_close(gdS, gdS_ref, rtol=1e-10, atol=1e-12, name="dS")


@pytest.mark.parametrize(
    "change, error, match",
    [
        (lambda a: {**a, "x": a["x"][:, :4]}, ValueError, "x has 4 features"),
        (lambda a: {**a, "U": a["U"][:, :3]}, ValueError, "Vh must have 3 rows"),
        (lambda a: {**a, "dS": a["dS"][:3]}, ValueError, "dS must have length r"),
        (lambda a: {**a, "S": a["S"].half()}, TypeError, "S has dtype torch.float16"),
        (lambda a: {**a, "x": a["x"].long()}, TypeError, "x has dtype torch.int64"),
        (lambda a: {**a, "Vh": a["Vh"].float()}, TypeError, "U and Vh must share a dtype"),
        (lambda a: {**a, "bias": torch.zeros(5, dtype=F64)}, ValueError, "bias must have length"),
        (lambda a: {**a, "weight": torch.zeros(5, 4, dtype=F64)}, ValueError, "weight must be"),
        (lambda a: {**a, "dS": a["dS"].to("meta")}, ValueError, "one device"),
        (lambda a: {**a, "U": a["U"].numpy()}, TypeError, "U must be a torch.Tensor"),
    ],
)
def test_svd_linear_bad_input(change, error, match):
    U, S, dS, Vh = _factors()
    args = dict(x=torch.randn(3, 5, dtype=F64), U=U, S=S, dS=dS, Vh=Vh, bias=None, weight=None)
    with pytest.raises(error, match=match):
        ops.svd_linear(**change(args))


def test_delta_grad_bad_input():
    U, _, _, Vh = _factors()
    x, gy = torch.randn(6, 5, dtype=F64), torch.randn(6, 4, dtype=F64)
    with pytest.raises(ValueError, match="same leading shape"):
        ops.delta_grad(x, gy[:5], U, Vh)
    with pytest.raises(ValueError, match=r"x \[..., 5\] and gy \[..., 4\]"):
        ops.delta_grad(x, x, U, Vh)
    with pytest.raises(ValueError, match="one id per row"):
        ops.delta_grad(x, gy, U, Vh, torch.zeros(5, dtype=torch.int64))
    with pytest.raises(TypeError, match="segment_ids has dtype torch.int32"):
        ops.delta_grad(x, gy, U, Vh, torch.zeros(6, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"must lie in \[0, n_segments=2\)"):
        ops.delta_grad(x, gy, U, Vh, torch.tensor([0, 1, 2, 0, 0, 0]), n_segments=2)
    with pytest.raises(ValueError, match="must lie in"):
        ops.delta_grad(x, gy, U, Vh, torch.tensor([0, -1, 0, 0, 0, 0]))
    out = ops.delta_grad(x, gy, U, Vh, torch.tensor([3, 0, 3, 0, 3, 0]), n_segments=5)
    assert out.shape == (5, 4) and out[1].abs().sum() == 0  # unsorted ids, empty segments


def test_merge_weight_and_project_bad_input():
    U, S, dS, Vh = _factors()
    with pytest.raises(ValueError, match=r"base must be \[4, 5\]"):
        ops.merge_weight(U, S, dS, Vh, base=torch.zeros(5, 4, dtype=F64))
    grad = torch.zeros(6)
    offsets = torch.tensor([0, 6])
    basis, boff, ks = torch.zeros(6), torch.tensor([0, 6]), torch.tensor([1])
    with pytest.raises(ValueError, match="mode must be one of"):
        ops.project_(grad, offsets, basis, boff, ks, mode="sideways")
    with pytest.raises(TypeError, match="offsets has dtype torch.int32"):
        ops.project_(grad, offsets.int(), basis, boff, ks)
    with pytest.raises(ValueError, match="basis_offsets needs 2 and ks 1"):
        ops.project_(grad, offsets, basis, boff, torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="grad must be contiguous"):
        ops.project_(torch.zeros(12)[::2], offsets, basis, boff, ks)
    with pytest.raises(TypeError, match="alpha must be a Python number"):
        ops.project_(grad, offsets, basis, boff, ks, alpha=torch.tensor(1.0))


@pytest.mark.interpreter
@pytest.mark.parametrize("backend", ["torch", "triton", "reference"])
def test_ops_take_the_factors_torch_linalg_svd_returns(backend):
    """U and Vh straight from torch.linalg.svd (Vh built as a transposed view, U a column slice)
    work on every backend, like torch ops: same results as contiguous copies."""
    if backend == "triton" and not dispatch.available("triton", "cpu"):
        pytest.skip("Triton needs CUDA or TRITON_INTERPRET=1")
    g = torch.Generator().manual_seed(3)
    W = torch.randn(7, 5, generator=g)
    U_full, S, Vh_full = torch.linalg.svd(W, full_matrices=True)
    U = U_full[:, :5]  # [7, 5] column slice: not contiguous
    Vh = Vh_full.T.contiguous().T  # [5, 5] transposed view: not contiguous
    assert not U.is_contiguous() and not Vh.is_contiguous()
    dS = torch.randn(5, generator=g) * 0.1
    x = torch.randn(2, 3, 5, generator=g)
    gy = torch.randn(2, 3, 7, generator=g)
    ids = torch.tensor([0, 0, 1, 1, 1, 0])
    tol = dict(rtol=1e-5, atol=1e-5)
    Uc, Vhc = U.contiguous(), Vh.contiguous()
    torch.testing.assert_close(
        ops.svd_linear(x, U, S, dS, Vh, backend=backend),
        reference.svd_linear(x, Uc, S, dS, Vhc),
        **tol,
    )
    torch.testing.assert_close(
        ops.delta_grad(x, gy, U, Vh, ids, backend=backend),
        reference.delta_grad(x, gy, Uc, Vhc, ids, 2),
        **tol,
    )
    torch.testing.assert_close(
        ops.merge_weight(U, S, dS, Vh, backend=backend),
        reference.merge_weight(Uc, S, dS, Vhc),
        **tol,
    )
    # the untouched inputs keep their strides (a copy was made, not an in-place change)
    assert not U.is_contiguous() and not Vh.is_contiguous()
