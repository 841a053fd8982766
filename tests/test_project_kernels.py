"""vhack.ops.project_ on every backend (Triton: in the interpreter on CPU tensors, compiled on CUDA
tensors under VHACK_TEST_CUDA=1; the C++ op; the torch path) against vhack.reference.project_ in
float64; stats are NaN-poisoned before a backend writes them (conftest sets VHACK_POISON_OUTPUTS).
Tensors live on helpers.device_for(backend): CPU for the C++ op, helpers.DEVICE otherwise.

Tolerances: float32 math against a float64 oracle fed the same (rounded) inputs: rtol 1e-4,
atol 1e-5 x max(1, |g|) (TOLERANCES[float32] scaled by the module norm); a bfloat16/float16
gradient written back is compared at that dtype's TOLERANCES (one rounding of the result)."""

import math
import os

import pytest
import torch
from helpers import (
    DEVICE,
    TOLERANCES,
    assert_close,
    device_for,
    forbid_host_sync,
    random_orthonormal_rows,
    record_launches,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from torch._subclasses.fake_tensor import FakeTensorMode

import vhack
from vhack import ops, reference
from vhack.ops import layout
from vhack.packing import offsets_from_sizes, pack_blocks

F64 = torch.float64
MODES = reference.PROJECTION_MODES
CPP_BUILT = ops.backends()["cpp"]
cpp_only = pytest.mark.skipif(
    not CPP_BUILT, reason="vhack._C was not built (see test_extension_required)"
)
# (backend, max r, max modules): the interpreter runs one program per module at ~ms each, so its
# module sets stay small; the C++ and torch paths take the few-thousand r of real models.
BACKENDS = [
    pytest.param("triton", 300, 4, marks=pytest.mark.interpreter, id="triton"),
    pytest.param("cpp", 3000, 8, marks=cpp_only, id="cpp"),
    pytest.param("torch", 3000, 8, id="torch"),
]
ALL = [pytest.param("triton", marks=pytest.mark.interpreter), "cpp", "torch"]


def make_set(
    rs, ks, *, stored=None, absent=(), zero=(), dtype=torch.float32, seed=0, device=DEVICE
):
    """A packed module set on `device`: grad [R] in dtype, offsets, basis fp32 (k_m + stored extra
    rows), basis_offsets, ks; modules in `absent` have no basis block, those in `zero` a zero
    gradient. Drawn on the CPU, so every device gets the same numbers."""
    g = torch.Generator().manual_seed(seed)
    stored = stored or [0] * len(rs)
    blocks = []
    for m, (r, k) in enumerate(zip(rs, ks, strict=True)):
        rows = min(k + stored[m], r)
        blocks.append(None if m in absent else random_orthonormal_rows(rows, r, g))
    basis, basis_offsets, kt = pack_blocks(blocks, rs, dtype=torch.float32)
    kt = torch.tensor([0 if m in absent else k for m, k in enumerate(ks)], dtype=torch.int64)
    grad = torch.randn(sum(rs), generator=g).to(dtype)
    offsets = offsets_from_sizes(rs)
    for m in zero:
        grad[offsets[m] : offsets[m + 1]] = 0
    return tuple(t.to(device) for t in (grad, offsets, basis, basis_offsets, kt))


def run_both(backend, grad, offsets, basis, basis_offsets, ks, mode, alpha=1.0, preserve=False):
    """(grad', stats) of the backend and (grad', stats) of the float64 reference."""
    ours = grad.clone()
    stats = ops.project_(
        ours,
        offsets,
        basis,
        basis_offsets,
        ks,
        mode,
        alpha,
        preserve_magnitude=preserve,
        backend=backend,
    )
    ref = grad.to(F64)
    ref_stats = reference.project_(
        ref, offsets, basis.to(F64), basis_offsets, ks, mode, alpha, preserve
    )
    return ours, stats, ref, ref_stats


def check_against_reference(ours, stats, ref, ref_stats, offsets, dtype):
    assert stats.dtype == torch.float32 and stats.shape == ref_stats.shape
    rtol, atol = TOLERANCES[torch.float32]
    out_rtol, out_atol = TOLERANCES[dtype]
    for m in range(offsets.numel() - 1):
        lo, hi = int(offsets[m]), int(offsets[m + 1])
        scale = max(1.0, float(ref_stats[m, 2].nan_to_num(0)))
        assert_close(stats[m], ref_stats[m], rtol=rtol, atol=atol * scale, name=f"module {m} stats")
        assert_close(
            ours[lo:hi],
            ref[lo:hi].to(dtype),
            rtol=max(rtol, out_rtol),
            atol=max(atol, out_atol) * scale,
            name=f"module {m} grad",
        )


@st.composite
def module_sets(draw, max_r, max_modules):
    n = draw(st.integers(1, max_modules))
    rs = draw(st.lists(st.integers(0, max_r), min_size=n, max_size=n))
    ks = [draw(st.integers(0, min(12, r))) for r in rs]
    stored = [draw(st.integers(0, 2)) for _ in rs]
    absent = draw(st.sets(st.integers(0, n - 1), max_size=n))
    zero = draw(st.sets(st.integers(0, n - 1), max_size=1))
    return rs, ks, stored, absent, zero


@pytest.mark.parametrize("backend, max_r, max_modules", BACKENDS)
@settings(max_examples=max(100, settings().max_examples))  # cheap: more than the CI default
@given(data=st.data())
def test_matches_reference(backend, max_r, max_modules, data):
    rs, ks, stored, absent, zero = data.draw(module_sets(max_r, max_modules), label="modules")
    mode = data.draw(st.sampled_from(MODES), label="mode")
    alpha = data.draw(st.sampled_from([1.0, 0.5, 1.7]), label="alpha")
    dtype = data.draw(st.sampled_from([torch.float32, torch.bfloat16]), label="dtype")
    preserve = data.draw(st.booleans(), label="preserve_magnitude")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    tensors = make_set(
        rs,
        ks,
        stored=stored,
        absent=absent,
        zero=zero,
        dtype=dtype,
        seed=seed,
        device=device_for(backend),
    )
    ours, stats, ref, ref_stats = run_both(backend, *tensors, mode, alpha, preserve)
    check_against_reference(ours, stats, ref, ref_stats, tensors[1], dtype)


@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_large_ragged_set_float64_and_fp16(backend):
    """r = 9728 beside r = 64 and r = 1 (the balance case), k = 12, and float64 / float16 grads
    (the C++ and torch paths accumulate float64 grads in float64: tight tolerance)."""
    if backend == "cpp" and not CPP_BUILT:
        pytest.skip("vhack._C was not built")
    rs, ks = [9728, 64, 1, 2560, 1024], [12, 5, 1, 12, 0]
    for dtype in (F64, torch.float16):
        grad, offsets, basis, basis_offsets, kt = make_set(
            rs, ks, dtype=dtype, seed=3, device=device_for(backend)
        )
        basis = basis.to(F64) if dtype == F64 else basis
        ours, stats, ref, ref_stats = run_both(
            backend, grad, offsets, basis, basis_offsets, kt, "both", 0.9
        )
        if dtype == F64:
            assert_close(ours, ref, rtol=1e-10, atol=1e-10)
            assert_close(stats, ref_stats.float(), rtol=1e-6, atol=1e-6)
        else:
            check_against_reference(ours, stats, ref, ref_stats, offsets, dtype)


@pytest.mark.parametrize("backend", ["cpp", "torch"])
@pytest.mark.parametrize("mode", MODES)
def test_more_rows_than_one_pass(backend, mode):
    """k = 13 and 20 (more than the 12 rows the C++ op takes per pass over g, and than the 16 it
    prefetches for the next module) beside k = 12 and 1, r = 2563 and 700 (not multiples of the
    16-float step), in every mode (both/reverse move g along every row: several apply passes),
    fp32 and bf16, with and without preserve_magnitude."""
    if backend == "cpp" and not CPP_BUILT:
        pytest.skip("vhack._C was not built")
    rs, ks = [2563, 700, 2560, 33], [20, 13, 12, 1]
    for dtype in (torch.float32, torch.bfloat16):
        for preserve in (False, True):
            tensors = make_set(rs, ks, dtype=dtype, seed=11, device=device_for(backend))
            ours, stats, ref, ref_stats = run_both(backend, *tensors, mode, 0.8, preserve)
            check_against_reference(ours, stats, ref, ref_stats, tensors[1], dtype)


@pytest.mark.parametrize("backend", ALL)
def test_properties(backend):
    """Idempotent; V g' = 0 ("both"); relu(V g') = 0 ("hackward"); |g'| <= |g|; zero gradient:
    zero statistics, not NaN; measure changes nothing."""
    _skip_unavailable(backend)
    rs, ks = [200, 37, 128, 64], [12, 3, 5, 7]
    device = device_for(backend)
    grad, offsets, basis, basis_offsets, kt = make_set(rs, ks, zero={3}, seed=5, device=device)
    kept_negative = []  # one-sided: the hack-averse side (c < 0) stays
    for mode in ("both", "hackward", "measure"):
        g = grad.clone()
        stats = ops.project_(g, offsets, basis, basis_offsets, kt, mode, backend=backend)
        again = g.clone()
        ops.project_(again, offsets, basis, basis_offsets, kt, mode, backend=backend)
        assert_close(again, g, rtol=1e-5, atol=1e-6, name=f"{mode} idempotent")
        for m, k in enumerate(ks):
            lo, hi = int(offsets[m]), int(offsets[m + 1])
            V = basis[int(basis_offsets[m]) :][: k * rs[m]].reshape(k, rs[m])
            c = V @ g[lo:hi]
            if mode == "both":
                assert c.abs().max() < 1e-5
            elif mode == "hackward":
                assert c.max() < 1e-5
                kept_negative.append(bool((c < -1e-3).any()))
            else:
                assert torch.equal(g, grad)
            assert g[lo:hi].norm() <= grad[lo:hi].norm() * (1 + 1e-6)
            assert stats[m, 3] <= stats[m, 2] * (1 + 1e-6)
        assert torch.equal(stats[3], torch.zeros(4, device=device))  # zero gradient: not NaN
    assert any(kept_negative)


@pytest.mark.parametrize("backend", ALL)
def test_nonfinite_module_is_left_alone_and_reported(backend):
    """A NaN or inf in one module: that module untouched with its stats showing it; every other
    module projected exactly as without it."""
    _skip_unavailable(backend)
    grad, offsets, basis, basis_offsets, kt = make_set(
        [50, 60, 70], [4, 4, 4], seed=2, device=device_for(backend)
    )
    clean = grad.clone()
    ops.project_(clean, offsets, basis, basis_offsets, kt, "both", backend=backend)
    for bad in (float("nan"), float("inf")):
        g = grad.clone()
        g[60] = bad  # module 1
        before = g.clone()
        stats = ops.project_(g, offsets, basis, basis_offsets, kt, "both", backend=backend)
        assert torch.equal(g[50:110].nan_to_num(), before[50:110].nan_to_num())
        assert not math.isfinite(stats[1, 2]) and not math.isfinite(stats[1, 3])
        assert torch.isfinite(stats[[0, 2]]).all()
        assert torch.equal(g[:50], clean[:50]) and torch.equal(g[110:], clean[110:])


@pytest.mark.interpreter
def test_exactly_one_triton_launch_per_call(monkeypatch):
    from vhack.kernels import project as kernels

    launches = record_launches(monkeypatch, kernels, "_project_fused_kernel")
    for n_modules in (1, 9, 60):
        rs = [(7 * m) % 40 + 1 for m in range(n_modules)]
        tensors = make_set(rs, [min(3, r) for r in rs], seed=n_modules)
        launches.clear()
        ours, stats, ref, ref_stats = run_both("triton", *tensors, "hackward")
        assert launches == [(n_modules,)], launches
        check_against_reference(ours, stats, ref, ref_stats, tensors[1], torch.float32)


class _LaunchOutsideGuard:
    """Stands in for a Triton kernel: launches it with forbid_host_sync's patches lifted. The
    kernel itself cannot synchronise the host, but the interpreter that runs it on CPU tensors
    reads them through numpy; on CUDA the launch stays under set_sync_debug_mode("error")."""

    def __init__(self, kernel, lifted) -> None:
        self.kernel, self.lifted, self.launches = kernel, lifted, 0

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches += 1
            with self.lifted():
                return self.kernel[grid](*args, **kwargs)

        return launch


@pytest.mark.parametrize(
    "backend", [pytest.param("triton", marks=pytest.mark.interpreter), "torch"]
)
@pytest.mark.parametrize("preserve", [False, True])
def test_call_makes_no_host_sync_once_layout_is_cached(monkeypatch, backend, preserve):
    """ops.project_ with a cached layout: no Python-level sync point (bool/int/float of a tensor,
    item, tolist, numpy, cpu, nonzero, equal, ...; helpers.forbid_host_sync) is reached, and on
    CUDA no synchronising call at all. The torch path (CUDA's float64 path) shares the op's
    Python layer, so a sync added there fails both parametrisations."""
    _skip_unavailable(backend)
    from vhack.kernels import project as kernels

    grad, offsets, basis, basis_offsets, kt = make_set([40, 9, 33], [3, 1, 5])
    args = (offsets, basis, basis_offsets, kt, "hackward", 0.7)
    expected = grad.clone()
    ops.project_(expected, *args, preserve_magnitude=preserve, backend=backend)  # layout checked

    def rebuilt(*a):
        raise AssertionError("the layout was rebuilt (a host sync) for unchanged index tensors")

    monkeypatch.setattr(layout, "build_layout", rebuilt)
    ours = grad.clone()
    with forbid_host_sync() as lifted:
        guard = _LaunchOutsideGuard(kernels._project_fused_kernel, lifted)
        monkeypatch.setattr(kernels, "_project_fused_kernel", guard)
        stats = ops.project_(ours, *args, preserve_magnitude=preserve, backend=backend)
    assert guard.launches == (backend == "triton")
    assert torch.equal(ours, expected) and torch.isfinite(stats).all()


def test_host_sync_guard_catches_each_sync_point():
    """forbid_host_sync is itself tested: every spelling of a host read fails inside it."""
    t = torch.ones(3, device=DEVICE)
    reads = [
        lambda: bool(t[0] > 0),
        lambda: int(t[0]),
        lambda: float(t[0]),
        lambda: [0, 1][t.long()[0]],  # __index__
        lambda: t.sum().item(),
        lambda: t.tolist(),
        lambda: t.cpu(),
        lambda: t.nonzero(),
        lambda: torch.nonzero(t),
        lambda: torch.equal(t, t),
        lambda: t.allclose(t),
        lambda: f"{t.sum():.3f}",
        lambda: t[t > 0],  # boolean-mask indexing: masked_select in disguise, checked on CUDA
    ]
    with forbid_host_sync():
        for i, read in enumerate(reads):
            if i == len(reads) - 1 and DEVICE.type != "cuda":
                continue  # a boolean mask on CPU tensors has no Python-level sync point
            with pytest.raises((AssertionError, RuntimeError)):
                read()
        t.add_(1)  # device work stays allowed
    assert t.sum().item() == 6  # restored on exit


def test_layout_checked_once_and_again_after_in_place_change(monkeypatch):
    grad, offsets, basis, basis_offsets, kt = make_set([30, 20], [2, 3], stored=[0, 0])
    built = []
    real = layout.build_layout
    monkeypatch.setattr(layout, "build_layout", lambda *a: built.append(1) or real(*a))
    for _ in range(3):
        ops.project_(grad, offsets, basis, basis_offsets, kt, backend="torch")
    assert len(built) == 1
    kt[1] = 4  # module 1 stores 3 rows: the in-place change is seen, checked, refused
    with pytest.raises(ValueError, match=r"ks\[1\] = 4 but module 1's basis block stores 3 rows"):
        ops.project_(grad, offsets, basis, basis_offsets, kt, backend="torch")
    assert len(built) == 2


@pytest.mark.parametrize("backend", ["reference", *ALL])
def test_bad_layouts_fail_alike_on_every_backend(backend):
    _skip_unavailable(backend)
    device = device_for(backend)
    grad, offsets, basis, basis_offsets, kt = make_set([6, 4], [2, 1], device=device)

    def index(*values):
        return torch.tensor(values, device=device)

    bad = [
        (offsets.flip(0).contiguous(), basis_offsets, kt, "offsets must be nondecreasing"),
        (index(0, 6, 11), basis_offsets, kt, r"within \[0, grad.numel\(\) = 10\]"),
        (offsets, index(0, 12, 99), kt, "basis_offsets must be nondecreasing"),
        (offsets, basis_offsets, index(3, 1), r"ks\[0\] = 3"),
        (offsets, basis_offsets, index(-1, 1), r"ks\[0\] = -1"),
    ]
    for off, boff, ks, match in bad:
        g = grad.clone()
        with pytest.raises(ValueError, match=match):
            ops.project_(g, off, basis, boff, ks, backend=backend)
        assert torch.equal(g, grad)  # refused before anything was written


def test_op_level_bad_input():
    grad, offsets, basis, basis_offsets, kt = make_set([6, 4], [2, 1])
    with pytest.raises(ValueError, match="alpha must be finite"):
        ops.project_(grad, offsets, basis, basis_offsets, kt, alpha=float("nan"))
    with pytest.raises(ValueError, match="requires grad"):
        ops.project_(grad.requires_grad_(), offsets, basis, basis_offsets, kt)
    with pytest.raises(TypeError, match="backend='triton' takes float32"):
        ops.project_(grad.detach().double(), offsets, basis, basis_offsets, kt, backend="triton")
    with pytest.raises(ValueError, match="one device"):
        ops.project_(grad.detach(), offsets, basis.to("meta"), basis_offsets, kt)


@cpp_only
def test_cpp_op_checks_its_own_inputs():
    grad, offsets, basis, basis_offsets, kt = make_set([6, 4], [2, 1], device=device_for("cpp"))
    stats = grad.new_empty(2, 4)
    op = torch.ops.vhack_cpp.project_
    with pytest.raises(ValueError, match="mode must be one of"):
        op(grad, offsets, basis, basis_offsets, kt, stats, "sideways", 1.0, False)
    with pytest.raises(ValueError, match="basis block holds only"):
        op(grad, offsets, basis, basis_offsets, kt.new_tensor([4, 1]), stats, "both", 1.0, False)
    with pytest.raises(ValueError, match="stats must be"):
        op(grad, offsets, basis, basis_offsets, kt, grad.new_empty(3, 4), "both", 1.0, False)
    with pytest.raises(TypeError, match="basis must be float32 or float64"):
        op(grad, offsets, basis.half(), basis_offsets, kt, stats, "both", 1.0, False)


def test_backends_report_the_projection_paths():
    info = ops.backends()
    assert set(info["ops"]["project_"]) == {"reference", "torch", "triton", "cpp"}
    assert info["default"]["cpu"]["project_"] == ("cpp" if CPP_BUILT else "torch")
    assert info["cpp"] is CPP_BUILT


def test_extension_required():
    """CI's fresh-clone install must build vhack._C; set VHACK_REQUIRE_EXT=1 to make a missing
    extension fail here instead of silently falling back to the torch path."""
    if os.environ.get("VHACK_REQUIRE_EXT") == "1":
        assert CPP_BUILT, "vhack._C is not importable: the C++ extension failed to build"
    else:
        assert ops.backends()["default"]["cpu"]["project_"] in ("cpp", "torch")


def test_traced_by_torch_compile_and_opcheck():
    """The call goes through the custom op vhack::project_ under torch.compile (grad declared
    mutated), and the op passes torch.library.opcheck."""
    grad, offsets, basis, basis_offsets, kt = make_set([30, 12, 5], [4, 2, 0])

    def step(g):
        return ops.project_(g, offsets, basis, basis_offsets, kt, "hackward", backend="torch")

    expected = grad.clone()
    expected_stats = step(expected)
    compiled = grad.clone()
    stats = torch.compile(step, backend="aot_eager", fullgraph=True)(compiled)
    assert_close(compiled, expected, rtol=1e-6, atol=1e-6)
    assert_close(stats, expected_stats, rtol=1e-6, atol=1e-6)
    # shape propagation without data (fake grad, real index tensors): the fake implementation
    with FakeTensorMode(allow_non_fake_inputs=True) as fake:
        stats = step(fake.from_tensor(grad))
    assert stats.shape == (3, 4) and stats.dtype == torch.float32
    torch.library.opcheck(
        torch.ops.vhack.project_.default,
        (grad.clone(), offsets, basis, basis_offsets, kt, "both", 1.0, False, "torch"),
        test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"),
    )


def _skip_unavailable(backend):
    if backend == "cpp" and not CPP_BUILT:
        pytest.skip("vhack._C was not built (see test_extension_required)")
    info = ops.backends()
    if backend == "triton" and not (
        info["triton"] and (DEVICE.type == "cuda" or info["triton_interpreter"])
    ):
        pytest.skip("Triton needs CUDA or TRITON_INTERPRET=1")


def test_public_names():
    assert {"Projector", "ProjStats"} <= set(vhack.__all__)


# ---- preserve_magnitude's no-rescale threshold ---------------------------------------------------


def _threshold_set(ratios, device):
    """Modules whose projected gradient g' has |g'| = ratio |g| exactly in float32 arithmetic:
    V holds signed unit vectors (so c = V g and g - V^T c are exact: g' is g with the k chosen
    coordinates zeroed), g = (head of norm ~3 on those coordinates) + (tail of norm t on the
    rest), t chosen so that t / |g| = ratio. Returns (grad, offsets, basis, basis_offsets, ks) on
    `device` and the float64 head-free gradient g' for each module."""
    gen = torch.Generator().manual_seed(11)
    rs, ks = [40, 64, 33, 100, 17, 50], [3, 12, 1, 5, 2, 4]
    assert len(ratios) == len(rs)
    blocks, grads, tails = [], [], []
    for r, k, ratio in zip(rs, ks, ratios, strict=True):
        perm = torch.randperm(r, generator=gen)
        V = torch.zeros(k, r, dtype=F64)
        signs = torch.randint(0, 2, (k,), generator=gen, dtype=F64) * 2 - 1
        V[torch.arange(k), perm[:k]] = signs
        head = torch.zeros(r, dtype=F64)
        head[perm[:k]] = 1 + torch.rand(k, generator=gen, dtype=F64)
        tail = torch.zeros(r, dtype=F64)
        tail[perm[k:]] = torch.randn(r - k, generator=gen, dtype=F64)
        # float32 values first, then the exact ratio of what the kernel sees
        head, tail = head.float().double(), tail.float().double()
        t = ratio * head.norm() / math.sqrt(1 - ratio**2)
        tail = (tail * (t / tail.norm())).float().double() if ratio > 0 else tail * 0
        blocks.append(V)
        grads.append(head + tail)
        tails.append(tail)
    basis, basis_offsets, kt = pack_blocks(blocks, rs, dtype=torch.float32)
    grad = torch.cat(grads).float()
    tensors = (grad, offsets_from_sizes(rs), basis, basis_offsets, kt)
    return tuple(x.to(device) for x in tensors), tails


@pytest.mark.parametrize("backend", ["reference", *ALL])
def test_preserve_magnitude_threshold_is_the_same_on_every_backend(backend):
    """preserve_magnitude rescales g' to |g| iff |g'| > PRESERVE_MIN_RATIO |g|: modules 3% above
    and 3% below the threshold, far above, far below and exactly in span(V) (g' = 0). Every
    backend hard-codes the threshold in its own arithmetic (the kernel compares squares against
    1e-10), so a change in any one of them, or in reference.PRESERVE_MIN_RATIO, fails here."""
    _skip_unavailable(backend)
    device = device_for(backend)
    limit = reference.PRESERVE_MIN_RATIO
    ratios = [limit * 1.03, limit / 1.03, 1e-3, 1e-7, 0.0, limit * 1.5]
    (grad, offsets, basis, basis_offsets, kt), tails = _threshold_set(ratios, device)
    ours = grad.clone()
    stats = ops.project_(
        ours, offsets, basis, basis_offsets, kt, "both", preserve_magnitude=True, backend=backend
    )
    for m, (ratio, tail) in enumerate(zip(ratios, tails, strict=True)):
        lo, hi = int(offsets[m]), int(offsets[m + 1])
        norm_g = grad[lo:hi].double().norm()
        rescaled = ratio > limit
        want = tail * (norm_g / tail.norm()) if rescaled else tail
        got = ours[lo:hi].double().cpu()
        what = f"module {m} (|g'|/|g| = {ratio:.3g}, threshold {limit:g})"
        assert_close(got, want, rtol=1e-5, atol=1e-6 * float(want.abs().max()), name=what)
        after = float(stats[m, 3])
        assert after == pytest.approx(float(norm_g) if rescaled else ratio * float(norm_g), 1e-4)


# ---- multi-chunk modules: r > BLOCK_R ------------------------------------------------------------

# (ks, rs): k_max = 12 gives the [16, 256] tile, k_max = 5 the [8, 512] one. r straddles the
# chunk: BLOCK_R - 1, BLOCK_R, BLOCK_R + 1, 2 BLOCK_R - 1, a ragged 3-4 chunk module, and small
# modules beside them (one program each: the interpreter runs ~100 chunks per call in all).
MULTI_CHUNK = {
    "k12": ([12, 12, 12, 12, 12, 3, 1, 12], [700, 257, 256, 255, 511, 40, 1, 1000]),
    "k5": ([5, 5, 5, 2, 5], [1100, 513, 512, 37, 1023]),
}


@pytest.mark.interpreter
@pytest.mark.parametrize("case", list(MULTI_CHUNK))
@pytest.mark.parametrize(
    "mode, preserve, dtype",
    [
        ("hackward", False, torch.float32),
        ("both", True, torch.float32),
        ("reverse", False, torch.bfloat16),
        ("hackward", True, torch.bfloat16),
        ("measure", False, torch.float32),
    ],
)
def test_triton_multi_chunk_modules_match_reference(case, mode, preserve, dtype):
    """Modules longer than one BLOCK_R chunk: both sweeps (forward and reverse walk), the chunked
    |g|^2 and c accumulation and the ragged last chunk, through the Triton kernel."""
    from vhack.kernels import project as kernels

    ks, rs = MULTI_CHUNK[case]
    block_r = kernels.block_sizes(max(ks))[1]
    assert max(rs) > 2 * block_r and block_r + 1 in rs  # the shapes still span several chunks
    tensors = make_set(rs, ks, stored=[1] * len(rs), dtype=dtype, seed=len(rs))
    ours, stats, ref, ref_stats = run_both("triton", *tensors, mode, 0.9, preserve)
    check_against_reference(ours, stats, ref, ref_stats, tensors[1], dtype)


def test_projection_modes_are_defined_once_and_every_path_checks_them():
    """One list of modes (vhack.ops.modes): the reference oracle re-exports it, the Triton kernel
    mirrors it as its constexpr codes, and every Python path refuses a bad mode with
    check_mode's one message; the C++ op (csrc/project.cpp parse_mode, a string check that
    mirrors the list) accepts exactly the same names."""
    from vhack.kernels import project as kernels

    from vhack.ops.layout import layout_for
    from vhack.ops.modes import PROJECTION_MODES, check_mode
    from vhack.ops.project_torch import project_torch_

    assert ops.PROJECTION_MODES is PROJECTION_MODES
    assert reference.PROJECTION_MODES is PROJECTION_MODES
    assert tuple(kernels.MODES) == PROJECTION_MODES
    with pytest.raises(ValueError) as expected:
        check_mode("sideways")
    message = str(expected.value)
    assert "hackward" in message and "'sideways'" in message
    grad, offsets, basis, basis_offsets, kt = make_set([6, 4], [2, 1], device="cpu")
    lay = layout_for(offsets, basis_offsets, kt, grad.numel(), basis.numel())
    paths = {
        "ops": lambda m: ops.project_(grad, offsets, basis, basis_offsets, kt, m),
        "reference": lambda m: reference.project_(grad, offsets, basis, basis_offsets, kt, m),
        "torch": lambda m: project_torch_(grad, basis, lay, m, 1.0, False),
        "triton": lambda m: kernels.project_(
            grad, offsets, basis, basis_offsets, kt, lay.order, lay.k_max, m
        ),
    }
    for name, call in paths.items():
        with pytest.raises(ValueError) as err:
            call("sideways")
        assert str(err.value) == message, name
        assert torch.equal(grad, make_set([6, 4], [2, 1], device="cpu")[0]), name  # untouched
    if CPP_BUILT:
        stats = grad.new_empty(2, 4)
        for mode in PROJECTION_MODES:
            torch.ops.vhack_cpp.project_(
                grad.clone(), offsets, basis, basis_offsets, kt, stats, mode, 1.0, False
            )
        with pytest.raises(ValueError, match="mode must be one of"):
            torch.ops.vhack_cpp.project_(
                grad, offsets, basis, basis_offsets, kt, stats, "sideways", 1.0, False
            )
