"""The Triton kernels of the SVD linear (vhack.kernels.svd_linear), run in the interpreter on CPU
tensors, against vhack.reference in float64: forward, dX, dS, per-segment dS, merge; plus the
torch.library registration (opcheck, gradcheck, torch.compile) and bad input.

Tolerances (relative error in the Frobenius norm against a float64 reference fed the same,
already rounded, inputs; elementwise the same tolerance times the largest reference magnitude):
  float32   1e-4   IEEE dot precision (tf32 is CUDA-only, and never under the interpreter)
  float16   2e-3   output rounded to fp16 (unit roundoff 4.9e-4), and the [N, r] intermediate
                   (h, or g_h for dX) is stored in fp16 before the second GEMM
  bfloat16  1e-2   the same two roundings at bf16's unit roundoff 3.9e-3
dS gradients are float32 whatever the input dtype (no intermediate is rounded): 1e-4 for every
dtype.
"""

import functools
import os

import pytest
import torch
from helpers import DEVICE, assert_close, relative_error
from hypothesis import given
from hypothesis import strategies as st
from vhack.kernels import svd_linear as K
from vhack.kernels import utils as kernel_utils

from vhack import ops, reference

F64 = torch.float64
interpreter = pytest.mark.interpreter
# the torch backend's 16-bit path runs its GEMMs natively, like the kernels: same tolerances
BACKENDS = [pytest.param("triton", marks=interpreter), "torch"]
REL_TOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1e-2}


@functools.cache
def interpreter_truncates_bf16() -> bool:
    """Whether Triton's interpreter converts float32 to bfloat16 by truncation (triton 3.9 does,
    even with fp_downcast_rounding="rtne"), where compiled kernels round to nearest even."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return False
    import triton
    import triton.language as tl

    @triton.jit
    def _to_bf16_kernel(x_ptr, y_ptr):
        tl.store(y_ptr, tl.load(x_ptr).to(tl.bfloat16))

    x = torch.tensor([1.0 + 3 * 2.0**-9])  # halfway-plus: rounds up to 1 + 2^-7, truncates to 1
    y = torch.empty(1, dtype=torch.bfloat16)
    _to_bf16_kernel[(1,)](x, y)
    return y.item() == 1.0


def rel_tol(dtype: torch.dtype, backend: str) -> float:
    """REL_TOL, doubled for bfloat16 Triton results under a truncating interpreter: truncation
    errs by up to one bf16 ulp (2^-8 relative) per conversion instead of half of one."""
    if dtype == torch.bfloat16 and backend == "triton" and interpreter_truncates_bf16():
        return 2 * REL_TOL[dtype]
    return REL_TOL[dtype]


GRAD_TOL = 1e-4
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def check(actual, expected, tol, name):
    """Finite (catches NaN-poisoned, unwritten outputs), norm-wise and elementwise close."""
    assert actual.shape == expected.shape, f"{name}: {tuple(actual.shape)} vs {expected.shape}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values (an unwritten output?)"
    if expected.numel() == 0:
        return
    err = relative_error(actual, expected)
    assert err <= tol, f"{name}: relative error {err:.3e} > {tol:.0e}"
    scale = expected.abs().max().item()
    assert_close(actual, expected, rtol=tol, atol=tol * scale + 1e-30, name=name)


def orthonormal(rows, cols, g):
    """[rows, cols] with orthonormal columns (rows >= cols), float64."""
    q, _ = torch.linalg.qr(torch.randn(rows, cols, dtype=F64, generator=g))
    return q


def make_factors(d_in, d_out, r, dtype, seed):
    """U [d_out, r], S [r], dS [r] (float32), Vh [r, d_in], contiguous, U/Vh in dtype."""
    g = torch.Generator().manual_seed(seed)
    U = orthonormal(d_out, r, g).to(DEVICE, dtype).contiguous()
    Vh = orthonormal(d_in, r, g).T.to(DEVICE, dtype).contiguous()
    S = (torch.rand(r, dtype=F64, generator=g) * 3 + 0.1).sort(descending=True).values
    dS = 0.2 * torch.randn(r, dtype=F64, generator=g)
    return U, S.to(DEVICE, torch.float32), dS.to(DEVICE, torch.float32), Vh


def rand(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, dtype=F64, generator=g).to(DEVICE, dtype)


def d64(*tensors):
    return [t.double() if t is not None else None for t in tensors]


@st.composite
def problems(draw):
    """Shapes with non-power-of-2 sizes, r < d_in and r < d_out, 2-D or 3-D x, empty batches."""
    d_in = draw(st.integers(1, 70))
    d_out = draw(st.integers(1, 70))
    full = min(d_in, d_out)
    r = draw(st.one_of(st.just(full), st.integers(1, full)))  # full rank (as wrap makes) or less
    lead = draw(
        st.one_of(
            st.tuples(st.integers(0, 40)),
            st.tuples(st.integers(1, 3), st.integers(1, 13)),
        )
    )
    return dict(
        d_in=d_in,
        d_out=d_out,
        r=r,
        lead=lead,
        bias=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )


# ---- forward, dX, dS ---------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@given(p=problems())
def test_forward_matches_reference(backend, dtype, p):
    U, S, dS, Vh = make_factors(p["d_in"], p["d_out"], p["r"], dtype, p["seed"])
    x = rand((*p["lead"], p["d_in"]), dtype, p["seed"] + 1)
    bias = rand((p["d_out"],), dtype, p["seed"] + 2) if p["bias"] else None
    y = ops.svd_linear(x, U, S, dS, Vh, bias, backend=backend)
    expected = reference.svd_linear(*d64(x, U, S, dS, Vh, bias))
    assert y.dtype == dtype
    check(y, expected, rel_tol(dtype, backend), "y")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@given(p=problems(), dense=st.booleans(), need=st.sampled_from(["both", "dx", "dS"]))
def test_backward_matches_reference(backend, dtype, p, dense, need):
    """dX and dS through autograd: the fused backward (dS kernel storing g_h, then the dX GEMM),
    dX alone, dS alone, and the dense-weight path (dS kernel only)."""
    U, S, dS, Vh = make_factors(p["d_in"], p["d_out"], p["r"], dtype, p["seed"])
    x = rand((*p["lead"], p["d_in"]), dtype, p["seed"] + 1)
    gy = rand((*p["lead"], p["d_out"]), dtype, p["seed"] + 3)
    weight = reference.merge_weight(U, S, dS, Vh) if dense else None
    x.requires_grad_(need != "dS")
    dS_var = dS.clone().requires_grad_(need != "dx")
    y = ops.svd_linear(x, U, S, dS_var, Vh, weight=weight, backend=backend)
    y.backward(gy)

    x64, dS64 = x.detach().double().requires_grad_(), dS.double().requires_grad_()
    y64 = reference.svd_linear(x64, *d64(U, S), dS64, Vh.double())
    gx64, gdS64 = torch.autograd.grad(y64, (x64, dS64), gy.double())
    if need != "dS":
        # the dense path rounds W_eff to dtype: its dx carries that rounding too
        check(x.grad, gx64, rel_tol(dtype, backend) * (2 if dense else 1), "dx")
    if need != "dx":
        assert dS_var.grad.dtype == torch.float32
        check(dS_var.grad, gdS64, GRAD_TOL, "dS grad")


@interpreter
@pytest.mark.parametrize(
    "d_in, d_out, fused_dx", [(20, 45, True), (45, 20, False), (20, 20, False)]
)
def test_dense_path_takes_dx_from_the_fused_kernel_when_it_saves_work(
    monkeypatch, d_in, d_out, fused_dx
):
    """With a dense W_eff and r = d_in < d_out, dx = ((gy U) * s) Vh comes out of the fused dS
    kernel (2 T d_in^2 FLOPs instead of 2 T d_in d_out); otherwise dx = gy W_eff."""
    calls = []
    real = K.svd_linear_backward
    monkeypatch.setattr(K, "svd_linear_backward", lambda *a: calls.append(1) or real(*a))
    U, S, dS, Vh = make_factors(d_in, d_out, min(d_in, d_out), torch.float32, 11)
    x = rand((2, 7, d_in), torch.float32, 12).requires_grad_()
    gy = rand((2, 7, d_out), torch.float32, 13)
    dS = dS.requires_grad_()
    W = reference.merge_weight(U, S, dS.detach(), Vh)
    ops.svd_linear(x, U, S, dS, Vh, weight=W, backend="triton").backward(gy)
    assert len(calls) == int(fused_dx)
    x64, dS64 = x.detach().double().requires_grad_(), dS.detach().double().requires_grad_()
    y64 = reference.svd_linear(x64, *d64(U, S), dS64, Vh.double())
    gx64, gdS64 = torch.autograd.grad(y64, (x64, dS64), gy.double())
    check(x.grad, gx64, REL_TOL[torch.float32], "dx")
    check(dS.grad, gdS64, GRAD_TOL, "dS grad")


@interpreter
@given(p=problems())
def test_delta_grad_kernel_direct(p):
    """The launch function itself on 2-D rows (float32)."""
    U, _, _, Vh = make_factors(p["d_in"], p["d_out"], p["r"], torch.float32, p["seed"])
    n = p["lead"][0] if len(p["lead"]) == 1 else p["lead"][0] * p["lead"][1]
    x = rand((n, p["d_in"]), torch.float32, p["seed"] + 1)
    gy = rand((n, p["d_out"]), torch.float32, p["seed"] + 3)
    check(K.delta_grad(x, gy, U, Vh), reference.delta_grad(*d64(x, gy, U, Vh)), GRAD_TOL, "dS")


# ---- per-segment dS ----------------------------------------------------------------------------


@st.composite
def segment_layouts(draw):
    """(segment_ids [N], n_segments): unequal lengths, empty segments, contiguous or shuffled."""
    n_rows = draw(st.integers(0, 48))
    n_segments = draw(st.integers(1, 7))
    ids = draw(st.lists(st.integers(0, n_segments - 1), min_size=n_rows, max_size=n_rows))
    ids = torch.tensor(ids, dtype=torch.int64)
    if draw(st.booleans()):
        ids = ids.sort().values  # contiguous segments (the [B, T] layout)
    return ids, n_segments


@interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@given(
    layout=segment_layouts(),
    d=st.tuples(st.integers(1, 50), st.integers(1, 50)),
    seed=st.integers(0, 999),
)
def test_per_segment_grads_match_reference_and_sum_to_batch(dtype, layout, d, seed):
    ids, n_segments = layout
    ids = ids.to(DEVICE)
    d_in, d_out = d
    U, _, _, Vh = make_factors(d_in, d_out, min(d_in, d_out), dtype, seed)
    x = rand((ids.shape[0], d_in), dtype, seed + 1)
    gy = rand((ids.shape[0], d_out), dtype, seed + 2)
    per = ops.delta_grad(x, gy, U, Vh, ids, n_segments=n_segments, backend="triton")
    expected = reference.delta_grad(*d64(x, gy, U, Vh), ids, n_segments)
    assert per.shape == (n_segments, U.shape[1]) and per.dtype == torch.float32
    check(per, expected, GRAD_TOL, "per-segment dS")
    for s in set(range(n_segments)) - set(ids.tolist()):
        assert per[s].abs().sum() == 0, f"empty segment {s} got a gradient"
    batch = ops.delta_grad(x, gy, U, Vh, backend="triton")
    check(per.sum(0), batch.double(), GRAD_TOL, "sum over segments vs batch")


@interpreter
def test_unchecked_out_of_range_ids_are_ignored():
    """check_ids=False skips the host-synchronising range check; the kernel then drops rows
    whose id is out of range instead of writing out of bounds."""
    U, _, _, Vh = make_factors(20, 12, 12, torch.float32, 0)
    x, gy = rand((9, 20), torch.float32, 1), rand((9, 12), torch.float32, 2)
    ids = torch.tensor([0, 0, 5, 1, 1, -2, 2, 2, 99], device=DEVICE)
    got = ops.delta_grad(x, gy, U, Vh, ids, n_segments=3, check_ids=False, backend="triton")
    keep = (ids >= 0) & (ids < 3)
    expected = reference.delta_grad(*d64(x[keep], gy[keep], U, Vh), ids[keep], 3)
    check(got, expected, GRAD_TOL, "valid rows only")
    with pytest.raises(ValueError, match=r"must lie in \[0, n_segments=3\)"):
        ops.delta_grad(x, gy, U, Vh, ids, n_segments=3, backend="triton")
    with pytest.raises(ValueError, match="check_ids=False needs n_segments"):
        ops.delta_grad(x, gy, U, Vh, ids, check_ids=False, backend="triton")


# ---- merge -------------------------------------------------------------------------------------


@interpreter
@pytest.mark.parametrize("dtype", DTYPES)
@given(
    d=st.tuples(st.integers(1, 70), st.integers(1, 70)),
    r_frac=st.floats(0.1, 1.0),
    seed=st.integers(0, 999),
)
def test_merge_matches_reference(dtype, d, r_frac, seed):
    d_in, d_out = d
    r = max(1, int(r_frac * min(d_in, d_out)))
    U, S, dS, Vh = make_factors(d_in, d_out, r, dtype, seed)
    W = ops.merge_weight(U, S, dS, Vh, backend="triton")
    check(W, reference.merge_weight(*d64(U, S, dS, Vh)), rel_tol(dtype, "triton"), "W_eff")
    base = rand((d_out, d_in), dtype, seed + 5)
    W_res = ops.merge_weight(U, S, dS, Vh, base=base, backend="triton")
    assert W_res.dtype == dtype
    check(
        W_res,
        reference.merge_weight(*d64(U, S, dS, Vh), base.double()),
        rel_tol(dtype, "triton"),
        "res",
    )
    # residual form at dS = 0 is the base weight, bit for bit
    zero = ops.merge_weight(U, S, torch.zeros_like(dS), Vh, base=base, backend="triton")
    assert torch.equal(zero, base)


# ---- outputs are poisoned, so the checks above see unwritten elements --------------------------


@interpreter
def test_outputs_are_nan_poisoned_in_tests(monkeypatch):
    assert kernel_utils.POISON_OUTPUTS
    assert torch.isnan(kernel_utils.empty((3,), torch.float32, DEVICE)).all()
    # a kernel that writes nothing leaves NaN that check() reports
    monkeypatch.setattr(K, "_matmul", lambda a, b, strides, out, **kw: out)
    U, S, dS, Vh = make_factors(5, 4, 4, torch.float32, 0)
    y = K.svd_linear_forward(rand((3, 5), torch.float32, 1), U, S, dS, Vh)
    with pytest.raises(AssertionError, match="non-finite"):
        check(y, torch.zeros(3, 4, dtype=F64), 1e-4, "y")


# ---- torch.library registration ----------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    """Schema, fake (meta) implementation and autograd registration agree with the real ops."""
    U, S, dS, Vh = make_factors(9, 6, 5, torch.float32, 0)
    x = rand((2, 3, 9), torch.float32, 1).requires_grad_()
    gy = rand((2, 3, 6), torch.float32, 2)
    dS = dS.requires_grad_()
    bias = rand((6,), torch.float32, 3).requires_grad_()
    W = reference.merge_weight(U, S, dS.detach(), Vh)
    ids = torch.tensor([0, 0, 1, 1, 1, 3], device=DEVICE)
    cases = [
        (torch.ops.vhack.svd_linear.default, (x, U, S, dS, Vh, bias, None, backend)),
        (torch.ops.vhack.svd_linear.default, (x, U, S, dS, Vh, None, W, backend)),
        (
            torch.ops.vhack.svd_linear_backward.default,
            (x.detach(), gy, U, S, dS.detach(), Vh, None, True, True, backend),
        ),
        (
            torch.ops.vhack.svd_linear_backward.default,
            (x.detach(), gy, U, S, dS.detach(), Vh, W, False, True, backend),
        ),
        (torch.ops.vhack.delta_grad.default, (x.detach(), gy, U, Vh, ids, 4, backend)),
        (torch.ops.vhack.delta_grad.default, (x.detach(), gy, U, Vh, None, 0, backend)),
        (torch.ops.vhack.merge_weight.default, (U, S, dS, Vh, None, backend)),
        (torch.ops.vhack.merge_weight.default, (U, S, dS, Vh, W, backend)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_gradcheck_float64():
    """Analytical gradients of the registered ops (torch path, float64) against finite
    differences: svd_linear with only dS needing a gradient, and both forms of merge_weight."""
    U, S, dS, Vh = (t.double() for t in make_factors(7, 5, 4, torch.float32, 3))
    x = rand((2, 3, 7), F64, 1)
    dS = dS.requires_grad_()
    assert torch.autograd.gradcheck(lambda d: ops.svd_linear(x, U, S, d, Vh), (dS,))
    S_var = S.clone().requires_grad_()
    base = rand((5, 7), F64, 2).requires_grad_()
    assert torch.autograd.gradcheck(lambda s, d: ops.merge_weight(U, s, d, Vh), (S_var, dS))
    assert torch.autograd.gradcheck(lambda d, b: ops.merge_weight(U, S, d, Vh, base=b), (dS, base))


class _Factored(torch.nn.Module):
    def __init__(self, d_in=9, d_out=6, r=5):
        super().__init__()
        U, S, dS, Vh = make_factors(d_in, d_out, r, torch.float32, 7)
        self.register_buffer("U", U)
        self.register_buffer("S", S)
        self.register_buffer("Vh", Vh)
        self.dS = torch.nn.Parameter(dS)
        self.bias = torch.nn.Parameter(rand((d_out,), torch.float32, 8))

    def forward(self, x):
        return torch.tanh(ops.svd_linear(x, self.U, self.S, self.dS, self.Vh, self.bias)).sum(-1)


@pytest.mark.slow
def test_torch_compile_fullgraph_matches_eager():
    module = _Factored()
    x = rand((2, 3, 9), torch.float32, 9).requires_grad_()
    eager = module(x)
    eager.sum().backward()
    expected = [x.grad.clone(), module.dS.grad.clone(), module.bias.grad.clone()]
    x.grad = module.dS.grad = module.bias.grad = None
    compiled = torch.compile(module, fullgraph=True)(x)
    compiled.sum().backward()
    assert_close(compiled, eager, rtol=1e-5, atol=1e-6, name="y")
    for got, want, name in zip(
        [x.grad, module.dS.grad, module.bias.grad], expected, ["dx", "dS", "bias"], strict=True
    ):
        assert_close(got, want, rtol=1e-5, atol=1e-6, name=name)


@pytest.mark.slow
@pytest.mark.skipif(
    DEVICE.type == "cuda", reason="VHACK_TEST_CUDA=1 runs the compiled kernels for real"
)
def test_kernels_compile_for_sm90():
    """The interpreter never runs Triton's compiler: compile every kernel variant of the SVD linear
    (dtypes, dot modes, fused terms, block-size table rows) and of the fused projection (modes,
    k = 12 / k = 5 tiles, gradient dtypes) for an H100/H200 down to cubin, no GPU needed, with
    ptxas's register and spill report (printed; see sm90_compile_check.py)."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).with_name("sm90_compile_check.py")
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    proc = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    print(proc.stdout)  # registers and spills per variant, shown with pytest -s
    lines = proc.stdout.splitlines()
    assert sum(line.startswith(("matmul", "dS")) for line in lines) == 2 * 2 * (4 + 3)
    project = [line for line in lines if line.startswith("project")]
    assert len(project) == 2 * 2 * 7  # grad dtypes x k tiles x (mode, preserve) variants
    # no variant spills registers (int64 offsets everywhere made the 128x128 GEMM tiles spill;
    # see "Offsets" in kernels/svd_linear.py), the projection's [16, 256] / [8, 512] tiles included
    spilling = [line for line in lines if not line.endswith("spill 0/0 B")]
    assert not spilling, "\n".join(spilling)


# ---- bad input: clear errors before any launch -------------------------------------------------


def _on_test_device(t: torch.Tensor) -> torch.Tensor:
    """t on DEVICE with its strides kept (a transposed or strided input stays non-contiguous);
    meta tensors stay on meta (they are the wrong-device case)."""
    if t.device.type == "meta":
        return t
    out = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=DEVICE)
    return out.copy_(t)


class _NoLaunch:
    def __getitem__(self, grid):
        raise AssertionError("a kernel was launched despite bad input")


@pytest.fixture
def no_launch(monkeypatch):
    monkeypatch.setattr(K, "_svd_linear_matmul_kernel", _NoLaunch())
    monkeypatch.setattr(K, "_svd_linear_dS_kernel", _NoLaunch())


def _good():
    U, S, dS, Vh = make_factors(6, 5, 4, torch.float32, 0)
    x, gy = rand((3, 6), torch.float32, 1), rand((3, 5), torch.float32, 2)
    return dict(x=x, gy=gy, U=U, S=S, dS=dS, Vh=Vh)


@interpreter
@pytest.mark.parametrize(
    "fn, change, error, match",
    [
        ("forward", {"x": torch.randn(3, 7)}, ValueError, r"x must be \[N, 6\]"),
        ("forward", {"x": torch.randn(2, 3, 6)}, ValueError, "x must be 2-D"),
        ("forward", {"U": torch.randn(5, 3)}, ValueError, "Vh must have 3 rows"),
        ("forward", {"dS": torch.zeros(3)}, ValueError, "dS must have length r = 4"),
        ("forward", {"dS": torch.zeros(4, dtype=torch.bfloat16)}, TypeError, "dS has dtype"),
        ("forward", {"x": torch.zeros(3, 6, dtype=torch.int32)}, TypeError, "x has dtype"),
        ("forward", {"x": torch.zeros(3, 6, dtype=F64)}, TypeError, "x has dtype torch.float64"),
        ("forward", {"U": torch.randn(4, 5).T}, ValueError, "U must be contiguous"),
        ("forward", {"x": torch.randn(6, 3).T}, ValueError, "x must be contiguous"),
        ("forward", {"Vh": torch.randn(4, 6).half()}, TypeError, "must share a dtype"),
        ("forward", {"S": torch.zeros(4, device="meta")}, ValueError, "one device"),
        ("forward", {"bias": torch.zeros(4)}, ValueError, "bias must have length d_out = 5"),
        ("backward", {"gy": torch.randn(2, 5)}, ValueError, "same rows"),
        ("backward", {"gy": torch.randn(3, 4)}, ValueError, r"gy must be \[N, 5\]"),
        ("delta_grad", {"segment_ids": torch.zeros(3, dtype=torch.int32)}, TypeError, "int32"),
        ("delta_grad", {"segment_ids": torch.zeros(4, dtype=torch.int64)}, ValueError, "one id"),
        (
            "delta_grad",
            {"segment_ids": torch.zeros(6, dtype=torch.int64)[::2]},
            ValueError,
            "segment_ids must be contiguous",
        ),
        ("merge", {"base": torch.zeros(6, 5)}, ValueError, r"base must be \[5, 6\]"),
    ],
)
def test_launch_functions_reject_bad_input(no_launch, fn, change, error, match):
    a = {**_good(), **{name: _on_test_device(t) for name, t in change.items()}}
    call = {
        "forward": lambda: K.svd_linear_forward(a["x"], a["U"], a["S"], a["dS"], a["Vh"], a.get("bias")),
        "backward": lambda: K.svd_linear_backward(a["x"], a["gy"], a["U"], a["S"], a["dS"], a["Vh"]),
        "delta_grad": lambda: K.delta_grad(a["x"], a["gy"], a["U"], a["Vh"], a.get("segment_ids"), 2),
        "merge": lambda: K.merge_weight(a["U"], a["S"], a["dS"], a["Vh"], a.get("base")),
    }[fn]  # fmt: skip
    with pytest.raises(error, match=match):
        call()


def test_int32_in_tile_offsets_are_checked_before_a_launch():
    """The kernels address within a tile in int32; an extent of 2^30 elements is refused with the
    way out, one below it passes."""
    K._check_int32_offsets(a_rows=2**30 - 1, b_columns=128 * 9728)
    with pytest.raises(ValueError, match=r"U_along_d_out spans 1073741824 .* backend='torch'"):
        K._check_int32_offsets(x_rows=4, U_along_d_out=2**30)


@interpreter
def test_launch_needs_cuda_or_interpreter(no_launch, monkeypatch):
    monkeypatch.setattr(K, "interpreter_enabled", lambda: False)
    a = {k: v.cpu() for k, v in _good().items()}  # CPU on purpose: the refused case
    with pytest.raises(RuntimeError, match="need CUDA tensors, or TRITON_INTERPRET=1"):
        K.merge_weight(a["U"], a["S"], a["dS"], a["Vh"])


@interpreter
def test_ops_triton_backend_rejects_bad_input(no_launch):
    a = _good()
    with pytest.raises(TypeError, match="backend='triton' takes float32/bfloat16/float16"):
        ops.merge_weight(
            *(t.double() for t in (a["U"], a["S"], a["dS"], a["Vh"])), backend="triton"
        )
    with pytest.raises(ValueError, match="frozen constant"):
        ops.svd_linear(
            a["x"], a["U"].clone().requires_grad_(), a["S"], a["dS"], a["Vh"], backend="triton"
        )
    ids = torch.tensor([0, 4, 1], device=DEVICE)
    with pytest.raises(ValueError, match=r"must lie in \[0, n_segments=2\)"):
        ops.delta_grad(
            a["x"], a["gy"], a["U"], a["Vh"].detach(), ids, n_segments=2, backend="triton"
        )


@interpreter
def test_float64_defaults_to_torch_path_under_triton_backend(no_launch):
    """use_backend('triton') leaves float64 on the exact torch path instead of failing."""
    U, S, dS, Vh = (t.double() for t in make_factors(6, 5, 4, torch.float32, 0))
    x = rand((3, 6), F64, 4)
    with ops.use_backend("triton"):
        y = ops.svd_linear(x, U, S, dS, Vh)
    assert_close(y, reference.svd_linear(x, U, S, dS, Vh), rtol=1e-12, atol=1e-12)
