"""vhack.Projector and ProjStats: basis forms, statistics, grad and update modes, optimizer hooks,
research-code style inputs and bad input. Numbers are checked against vhack.reference.project_
(float64; float32 tolerances rtol 1e-4, atol 1e-5 as in helpers.TOLERANCES)."""

import json
import math

import pytest
import torch
from helpers import DEVICE, TOLERANCES, assert_close, random_orthonormal_rows, record_launches
from torch import nn

import vhack
from vhack import difference_basis, reference

F64 = torch.float64
TOL = dict(zip(("rtol", "atol"), TOLERANCES[torch.float32], strict=True))


class Toy(nn.Module):
    """Four target Linears of ranks 8, 5, 8, 3."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.q_proj = nn.Linear(12, 8)
        self.k_proj = nn.Linear(12, 5)
        self.up_proj = nn.Linear(8, 20)
        self.gate_proj = nn.Linear(3, 7)
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=g)


@pytest.fixture
def adapter():
    return vhack.wrap(Toy(), use_cache=False, progress=False)


def make_basis(adapter, ks=None, seed=0, skip=("gate_proj",)):
    """{name: V [k, r] float32} with orthonormal rows; modules in `skip` get an empty [0, r]
    block (covered, not projected)."""
    g = torch.Generator().manual_seed(seed)
    ks = ks or {"q_proj": 3, "k_proj": 2, "up_proj": 4, "gate_proj": 1}
    return {
        n: random_orthonormal_rows(0 if n in skip else ks[n], r, g).float()
        for n, r in zip(adapter.names, adapter.ranks, strict=True)
    }


def reference_projection(adapter, basis, grad, mode="hackward", alpha=1.0, preserve=False):
    blocks = [basis[n].double() if n in basis and len(basis[n]) else None for n in adapter.names]
    flat, boff, ks = vhack.packing.pack_blocks(blocks, adapter.ranks, dtype=F64)
    flat, boff, ks = (t.to(grad.device) for t in (flat, boff, ks))
    out = grad.double().clone()
    stats = reference.project_(out, adapter.offsets, flat, boff, ks, mode, alpha, preserve)
    return out, stats


class DuckBasis:
    """What vhack.HackBasis offers the Projector: .names and .V(name)."""

    def __init__(self, blocks: dict) -> None:
        self._blocks = blocks
        self.names = list(blocks)

    def V(self, name: str) -> torch.Tensor:
        return self._blocks[name]


@pytest.mark.parametrize("mode", reference.PROJECTION_MODES)
def test_project_matches_reference_and_stats(adapter, mode):
    basis = make_basis(adapter)
    grad = torch.randn(adapter.delta.numel(), generator=torch.Generator().manual_seed(1))
    adapter.delta.grad = grad.clone()
    proj = vhack.Projector(adapter, basis, mode=mode, alpha=0.8)
    stats = proj.project_()
    expected, ref_stats = reference_projection(adapter, basis, grad, mode, 0.8)
    assert_close(adapter.delta.grad, expected, **TOL, name="grad")
    assert_close(stats.raw, ref_stats, **TOL, name="raw")
    assert stats.names == adapter.names and proj.last_stats is stats
    # one-sided (hack-ward) cin for hackward and measure: a measure-only baseline logs the
    # statistic a projected run logs; two-sided for both / reverse
    num = ref_stats[:, 1] if mode in ("hackward", "measure") else ref_stats[:, 0]
    cin = num / ref_stats[:, 2]
    assert_close(stats.cin, cin, **TOL, name="cin")
    projected = torch.tensor([len(basis[n]) > 0 for n in adapter.names])
    assert stats.cin[~projected].eq(0).all()  # gate_proj: no basis rows, cin 0
    assert stats.cin_mean == pytest.approx(cin[projected].mean().item(), rel=1e-5)
    assert stats.fired == pytest.approx((cin[projected] > 1e-6).double().mean().item())
    summary = stats.as_dict()
    assert summary["norm_before"] == pytest.approx(grad.norm().item(), rel=1e-5)
    removed = 1 - (expected.norm() / grad.norm()).item() ** 2
    assert summary["energy_removed"] == pytest.approx(removed, rel=1e-4, abs=1e-6)
    assert "cin_mean" in repr(stats)
    two_sided = ref_stats[:, 0] / ref_stats[:, 2]
    assert summary["cin_mean_two_sided"] == pytest.approx(
        two_sided[projected].mean().item(), rel=1e-5
    )
    hackward = (ref_stats[projected, 1].square().sum() / ref_stats[:, 2].square().sum()).item()
    assert summary["energy_hackward"] == pytest.approx(hackward, rel=1e-5)


def test_basis_forms_agree_and_k_slices(adapter):
    basis = make_basis(adapter, ks={"q_proj": 4, "k_proj": 3, "up_proj": 4, "gate_proj": 2})
    grad = torch.randn(adapter.delta.numel(), generator=torch.Generator().manual_seed(2))
    results = []
    research_file = {**basis, **{f"_sv/{n}": torch.ones(V.shape[0]) for n, V in basis.items()}}
    for form in (basis, DuckBasis(basis), research_file):
        target = grad.clone()
        vhack.Projector(adapter, form, k=2).project_(target)
        results.append(target)
    expected, _ = reference_projection(adapter, {n: V[:2] for n, V in basis.items()}, grad)
    for got in results:
        assert_close(got, expected, **TOL)
    assert vhack.Projector(adapter, basis, k=2).ks == [2, 2, 2, 0]
    assert vhack.Projector(adapter, basis).ks == [4, 3, 4, 0]


def test_zero_rows_zero_gradient_and_measure(adapter):
    basis = make_basis(adapter)
    basis["q_proj"][1] = 0.0  # an axis zeroed by tau_axis at extraction: legal
    proj = vhack.Projector(adapter, basis)
    grad = torch.randn(adapter.delta.numel(), generator=torch.Generator().manual_seed(3))
    grad[adapter.offsets[1] : adapter.offsets[2]] = 0  # k_proj: zero gradient
    adapter.delta.grad = grad.clone()
    measured = proj.measure()
    assert torch.equal(adapter.delta.grad, grad)  # measure changes nothing
    stats = proj.project_()
    assert_close(measured.raw[:, :3], stats.raw[:, :3], rtol=0, atol=0)
    assert torch.equal(stats.raw[1], torch.zeros(4)) and stats.cin[1] == 0  # not NaN
    assert_close(adapter.delta.grad, reference_projection(adapter, basis, grad)[0], **TOL)


def test_dict_gradients_are_packed_and_written_back(adapter):
    basis = make_basis(adapter)
    g = torch.Generator().manual_seed(4)
    grads = {
        n: torch.randn(r, generator=g) for n, r in zip(adapter.names, adapter.ranks, strict=True)
    }
    del grads["k_proj"]  # absent: counted as zero, not written
    packed = torch.cat(
        [grads.get(n, torch.zeros(r)) for n, r in zip(adapter.names, adapter.ranks, strict=True)]
    )
    originals = {n: t.clone() for n, t in grads.items()}
    stats = vhack.Projector(adapter, basis).project_(grads)
    expected, ref_stats = reference_projection(adapter, basis, packed)
    assert_close(stats.raw, ref_stats, **TOL)
    for m, name in enumerate(adapter.names):
        if name in grads:
            lo, hi = int(adapter.offsets[m]), int(adapter.offsets[m + 1])
            assert_close(grads[name], expected[lo:hi], **TOL, name=name)
            assert not torch.equal(grads[name], originals[name]) or name == "gate_proj"
    assert stats.raw[1, 2] == 0


def test_preserve_magnitude(adapter):
    basis = make_basis(adapter)
    grad = torch.randn(adapter.delta.numel(), generator=torch.Generator().manual_seed(5))
    target = grad.clone()
    stats = vhack.Projector(adapter, basis, mode="both", preserve_magnitude=True).project_(target)
    assert_close(stats.raw[:, 3], stats.raw[:, 2], **TOL)
    expected, _ = reference_projection(adapter, basis, grad, "both", preserve=True)
    assert_close(target, expected, **TOL)


def test_bfloat16_dict_gradients(adapter):
    basis = make_basis(adapter)
    g = torch.Generator().manual_seed(6)
    grads = {
        n: torch.randn(r, generator=g).bfloat16()
        for n, r in zip(adapter.names, adapter.ranks, strict=True)
    }
    packed = torch.cat(list(grads.values()))
    vhack.Projector(adapter, basis).project_(grads)
    expected, _ = reference_projection(adapter, basis, packed)
    rtol, atol = TOLERANCES[torch.bfloat16]
    assert_close(torch.cat(list(grads.values())), expected.bfloat16(), rtol=rtol, atol=atol)


# ---- non-finite gradients ---------------------------------------------------------------------


def test_nonfinite_gradient_is_named_and_contained(adapter):
    basis = make_basis(adapter)
    grad = torch.randn(adapter.delta.numel(), generator=torch.Generator().manual_seed(7))
    clean, _ = reference_projection(adapter, basis, grad)
    grad[int(adapter.offsets[2]) + 1] = float("nan")  # up_proj
    lo, hi = int(adapter.offsets[2]), int(adapter.offsets[3])

    target = grad.clone()
    with pytest.raises(
        RuntimeError,
        match=r"non-finite dS gradient in up_proj: nothing was projected and the gradient is "
        "unchanged",
    ):
        vhack.Projector(adapter, basis).project_(target)
    assert torch.equal(target.isnan(), grad.isnan())  # all-or-nothing: every module as it was
    assert torch.equal(target.nan_to_num(), grad.nan_to_num())

    target = grad.clone()
    with pytest.warns(RuntimeWarning, match=r"up_proj; they are unchanged \(the other modules"):
        vhack.Projector(adapter, basis, on_nonfinite="warn").project_(target)
    assert torch.equal(target[lo:hi].isnan(), grad[lo:hi].isnan())  # left as it was
    assert_close(target[:lo], clean[:lo], **TOL)  # the others projected
    assert_close(target[hi:], clean[hi:], **TOL)
    stats = vhack.Projector(adapter, basis, on_nonfinite="ignore").project_(grad.clone())
    assert stats.nonfinite == ["up_proj"] and stats.cin[2].isnan()


# ---- bad input ----------------------------------------------------------------------------------


def _bad_bases(adapter):
    good = make_basis(adapter)
    skewed = dict(good)
    skewed["q_proj"] = good["q_proj"] * 1.01
    nan = dict(good)
    nan["k_proj"] = good["k_proj"].clone()
    nan["k_proj"][0, 0] = float("nan")
    return [
        (
            {**good, "model.layers.9.mlp.down_proj": torch.zeros(1, 8)},
            ValueError,
            r"not wrapped in this model \(model.layers.9.mlp.down_proj\)",
        ),
        (
            {**good, "k_proj": torch.zeros(1, 6)},
            ValueError,
            r"shapes mismatch: k_proj: basis r=6, model r=5",
        ),
        (skewed, ValueError, r"orthonormal.*q_proj \(2.0[0-9]e-02\)"),
        (nan, ValueError, "NaN/inf values: k_proj"),
        ({}, ValueError, "holds no modules"),
        ([good["q_proj"]], TypeError, "basis must be a vhack.HackBasis, a dict"),
        ({"q_proj": good["q_proj"].long()}, TypeError, "dtype torch.int64"),
    ]


def test_bad_basis(adapter):
    for basis, error, match in _bad_bases(adapter):
        with pytest.raises(error, match=match):
            vhack.Projector(adapter, basis)
    with pytest.raises(
        ValueError, match=r"k = 4 is larger than the rows stored.*k_proj \(2 rows\)"
    ):
        vhack.Projector(adapter, make_basis(adapter), k=4)
    loose = make_basis(adapter)
    loose["q_proj"] = loose["q_proj"] * 1.01
    vhack.Projector(adapter, loose, orthonormal_tol=0.03)  # a stated, adjustable tolerance


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(mode="sideways"), ValueError, "mode must be one of"),
        (dict(where="params"), ValueError, "where must be one of"),
        (dict(on_nonfinite="skip"), ValueError, "on_nonfinite must be one of"),
        (dict(alpha=torch.tensor(1.0)), TypeError, "alpha must be a Python number"),
        (dict(k=-1), ValueError, "k must be None or an int"),
    ],
)
def test_bad_arguments(adapter, kwargs, error, match):
    with pytest.raises(error, match=match):
        vhack.Projector(adapter, make_basis(adapter), **kwargs)


def test_bad_targets(adapter):
    proj = vhack.Projector(adapter, make_basis(adapter))
    n = adapter.delta.numel()
    with pytest.raises(RuntimeError, match=r"delta.grad is None: call project_\(\) after"):
        proj.project_()
    with pytest.raises(TypeError, match="adapter must be a vhack.Adapter"):
        vhack.Projector(adapter.model, make_basis(adapter))
    cases = [
        (torch.zeros(n + 1), ValueError, "1-D with R_total"),
        (torch.zeros(n, device="meta"), ValueError, "target is on meta"),
        ({"q_proj": None}, RuntimeError, r"gradient missing \(None\) for q_proj: call after"),
        ({"v_proj": torch.zeros(3)}, ValueError, "does not wrap: v_proj"),
        ({"q_proj": torch.zeros(7)}, ValueError, r"wrong gradient shapes.*q_proj.*\(8,\)"),
        (
            {"q_proj": torch.zeros(8), "k_proj": torch.zeros(5, dtype=F64)},
            TypeError,
            "share one float32/bfloat16/float16 dtype",
        ),
        ({"q_proj": torch.zeros(8, device="meta")}, ValueError, "not on the adapter's device"),
        ([torch.zeros(8)], TypeError, "target must be None"),
    ]
    for target, error, match in cases:
        with pytest.raises(error, match=match):
            proj.project_(target)


# ---- optimizer hooks ----------------------------------------------------------------------------


def test_attach_grad_mode_projects_before_each_step(adapter):
    basis = make_basis(adapter)
    twin = vhack.wrap(Toy(), use_cache=False, progress=False)  # manual projection, same init
    x = torch.randn(4, 12, generator=torch.Generator().manual_seed(8))
    opts = [torch.optim.AdamW([a.delta], lr=0.05) for a in (adapter, twin)]
    proj = vhack.Projector(adapter, basis).attach(opts[0])
    manual = vhack.Projector(twin, basis)
    for _ in range(3):
        for a, opt in zip((adapter, twin), opts, strict=True):
            opt.zero_grad()
            (a.model.q_proj(x).square().sum() + a.model.k_proj(x).sum()).backward()
        manual.project_()
        for opt in opts:
            opt.step()
        assert_close(adapter.delta, twin.delta, rtol=1e-6, atol=1e-7)
        assert_close(proj.last_stats.raw, manual.last_stats.raw, rtol=1e-6, atol=1e-6)
    with pytest.raises(RuntimeError, match="already attached"):
        proj.attach(opts[0])
    with pytest.raises(RuntimeError, match="closure"):
        opts[0].step(lambda: None)
    proj.detach()
    seen = proj.last_stats
    opts[0].step()
    assert proj.last_stats is seen  # detached: no more projection


def test_attach_refuses_an_optimizer_without_delta(adapter):
    other = torch.optim.SGD([nn.Parameter(torch.zeros(3))], lr=0.1)
    with pytest.raises(ValueError, match="does not hold adapter.delta"):
        vhack.Projector(adapter, make_basis(adapter)).attach(other)
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        vhack.Projector(adapter, make_basis(adapter)).attach(object())


def test_update_rule_sign(adapter):
    """Delta <- Delta + V^T relu(-V Delta): the part of an update along -v (hack-promoting, since
    the optimizer moves against the gradient) is removed; the part along +v stays. Applying the
    gradient rule to Delta literally would do the opposite."""
    v = torch.zeros(1, 8)
    v[0, 0] = 1.0
    proj = vhack.Projector(adapter, {"q_proj": v}, where="update", partial=True)
    n = adapter.delta.numel()
    promoting = torch.zeros(n)
    promoting[:2] = torch.tensor([-0.3, 0.4])  # q_proj's first coordinates: V Delta = -0.3 < 0
    update = promoting.clone()
    stats = proj.project_(update)
    assert_close(update[:2], torch.tensor([0.0, 0.4]), rtol=0, atol=1e-7)
    assert stats.cin[0] == pytest.approx(0.3 / 0.5, rel=1e-6)  # |relu(-V Delta)| / |Delta|
    as_dict = {"q_proj": promoting[:8].clone()}  # research-style input: the same rule
    proj.project_(as_dict)
    assert_close(as_dict["q_proj"], update[:8], rtol=0, atol=0)
    literal = promoting.clone()
    vhack.Projector(adapter, {"q_proj": v}, partial=True).project_(
        literal
    )  # the gradient rule on Delta
    assert torch.equal(literal, promoting)  # ... keeps exactly the hack-promoting part
    averse = -promoting  # along +v: not hack-promoting, kept
    kept = averse.clone()
    proj.project_(kept)
    assert torch.equal(kept, averse)
    with pytest.raises(RuntimeError, match=r"call snapshot\(\) before optimizer.step"):
        proj.project_()


def _hack_promoting_fraction(adapter, basis, change):
    """|relu(-V Delta)| / |Delta| of a parameter change, summed over the basis modules."""
    num, den = 0.0, 0.0
    for m, name in enumerate(adapter.names):
        lo, hi = int(adapter.offsets[m]), int(adapter.offsets[m + 1])
        d = change[lo:hi].double().cpu()
        if name in basis:
            num += float(torch.relu(-(basis[name].double() @ d)).square().sum())
        den += float(d.square().sum())
    return (num / den) ** 0.5


def test_attach_update_mode_removes_the_hack_promoting_side_of_each_step(adapter):
    """where="update" through attach() (fast; the slow test below shows it on a real model): with
    SGD the step is -lr g, so a gradient along +v makes an update along -v (hack-promoting), which
    the post-step hook removes exactly; the next step, along +v, is kept whole. Other coordinates
    and modules move as SGD moved them."""
    v = torch.zeros(1, 8)
    v[0, 0] = 1.0
    w = torch.zeros(1, 5)
    w[0, 2] = -1.0  # k_proj: its "hack" direction is -e_2
    basis = {"q_proj": v, "k_proj": w}
    opt = torch.optim.SGD([adapter.delta], lr=0.5)
    proj = vhack.Projector(adapter, basis, where="update", partial=True).attach(opt)
    n, q, k = adapter.delta.numel(), 0, int(adapter.offsets[1])
    grad = torch.zeros(n)
    grad[q : q + 3] = torch.tensor([0.6, -0.8, 0.2])  # SGD: Delta_q = (-0.3, 0.4, -0.1)
    grad[k + 2], grad[k + 3] = -0.4, 0.2  # SGD: Delta_k[2] = 0.2 along -w: hack-promoting
    grad[-1] = 1.0  # gate_proj (no basis): -0.5, untouched
    start = adapter.delta.detach().clone()
    adapter.delta.grad = grad.clone()
    opt.step()
    expected = start - 0.5 * grad
    expected[q] = start[q]  # the -v part of the update removed ...
    expected[k + 2] = start[k + 2]  # ... and the -w part of k_proj's
    assert_close(adapter.delta.detach(), expected, rtol=0, atol=1e-7, name="after step 1")
    assert proj.last_stats.cin[0] == pytest.approx(0.3 / (0.3**2 + 0.4**2 + 0.1**2) ** 0.5)
    assert proj.last_stats.cin[1] == pytest.approx(0.2 / (0.2**2 + 0.1**2) ** 0.5)

    start = adapter.delta.detach().clone()
    adapter.delta.grad = -grad  # now every update is along +v / +w: hack-averse, kept
    opt.step()
    assert_close(adapter.delta.detach(), start + 0.5 * grad, rtol=0, atol=1e-7, name="step 2")
    assert proj.last_stats.cin[:2].eq(0).all()


def test_attach_grad_vs_update_mode_under_adam(adapter):
    """Adam's first step is -lr g'/|g'| per coordinate: with v = (1, 2)/sqrt(5) and g = e_2, the
    projected gradient g' = (-0.4, 0.2) is hack-free, yet its Adam step (lr, -lr) points along -v.
    Grad mode leaks it (fraction 1/sqrt(10)). Update mode lets Adam step on g itself, (0, -lr),
    and removes that step's -v part: (0.4, -0.2) lr, orthogonal to v."""
    v = torch.zeros(1, 8)
    v[0, :2] = torch.tensor([1.0, 2.0]) / 5**0.5
    basis = {"q_proj": v}
    lr, changes = 0.01, {}
    for where in ("grad", "update"):
        with torch.no_grad():
            adapter.delta.zero_()
        opt = torch.optim.Adam([adapter.delta], lr=lr)
        proj = vhack.Projector(adapter, basis, where=where, partial=True).attach(opt)
        adapter.delta.grad = torch.zeros(adapter.delta.numel())
        adapter.delta.grad[1] = 1.0
        opt.step()
        proj.detach()
        changes[where] = adapter.delta.detach().clone()
    assert _hack_promoting_fraction(adapter, basis, changes["grad"]) > 0.3
    assert _hack_promoting_fraction(adapter, basis, changes["update"]) < 1e-6
    expected = torch.zeros_like(changes["update"])
    expected[:2] = torch.tensor([0.4, -0.2]) * lr
    assert_close(changes["update"], expected, rtol=1e-5, atol=1e-9, name="update-mode step")


def _sequence_grads_basis(adapter, model, ids, k):
    """Per-module basis from paired differences of per-sequence gradients (hack = first half)."""
    n = ids.shape[0]
    with adapter.segment_grads(torch.arange(n).repeat_interleave(ids.shape[1]), n) as cap:
        model(ids, labels=ids).loss.backward()
    adapter.delta.grad = None
    half = n // 2
    return {
        name: difference_basis.paired_difference_basis(cap[name][:half], cap[name][half:], top_k=k)[
            0
        ]
        for name in adapter.names
    }


def _leak_per_step(adapter, model, basis, ids, where, steps):
    """Run AdamW with the projector attached; per step, the hack-promoting fraction of the
    parameter change |relu(-V Delta)| / |Delta| (mean over modules)."""
    with torch.no_grad():
        adapter.delta.zero_()
    opt = torch.optim.AdamW([adapter.delta], lr=1e-2, weight_decay=0.01)
    proj = vhack.Projector(adapter, basis, where=where).attach(opt) if where else None
    meter = vhack.Projector(adapter, basis, where="update")
    leaks = []
    for step in range(steps):
        opt.zero_grad()
        model(ids[step % 2 :: 2], labels=ids[step % 2 :: 2]).loss.backward()
        before = adapter.delta.detach().clone()
        opt.step()
        leaks.append(meter.measure(adapter.delta.detach() - before).cin_mean)
    if proj is not None:
        proj.detach()
    return leaks


@pytest.mark.slow
def test_update_mode_closes_the_adam_leak():
    """Grad mode: every gradient projected, yet Adam's moments and per-coordinate scaling leave a
    hack-promoting component in the parameter change. Update mode removes it at every step."""
    torch.manual_seed(0)
    model = vhack.models.tiny_model(seed=0)
    adapter = vhack.wrap(model, progress=False, use_cache=False)
    ids = torch.randint(0, 256, (8, 24), generator=torch.Generator().manual_seed(0))
    basis = _sequence_grads_basis(adapter, model, ids, k=3)
    leaks = {
        where: _leak_per_step(adapter, model, basis, ids, where, steps=6)
        for where in (None, "grad", "update")
    }
    grad_leak, update_leak = leaks["grad"], leaks["update"]
    print("Adam, hack-promoting fraction |relu(-V Delta)|/|Delta| of each step's change:")
    for where, values in leaks.items():  # shown with pytest -s (numbers in bench/PROJECT_NOTES.md)
        print(f"  {where or 'unprojected':>11}: " + " ".join(f"{x:.2e}" for x in values))
    assert min(grad_leak) > 1e-2  # measurable at every step
    assert max(update_leak) < 1e-5  # ~0 after every step (float32 rounding of delta)


def test_update_mode_restores_modules_with_a_nonfinite_update(adapter):
    basis = make_basis(adapter)
    opt = torch.optim.SGD([adapter.delta], lr=0.1)
    with torch.no_grad():
        adapter.delta.normal_(generator=torch.Generator().manual_seed(0))
    before = adapter.delta.detach().clone()
    grad = torch.ones(adapter.delta.numel())
    grad[int(adapter.offsets[1])] = float("inf")  # k_proj
    # "raise": the whole step is undone, delta is exactly its pre-step value
    proj = vhack.Projector(adapter, basis, where="update").attach(opt)
    adapter.delta.grad = grad.clone()
    with pytest.raises(
        RuntimeError,
        match=r"non-finite dS update in k_proj: nothing was projected and adapter.delta was "
        "restored to its value before the optimizer step",
    ):
        opt.step()
    assert torch.equal(adapter.delta.detach(), before)
    proj.detach()
    # "warn": the finite modules step (projected), the bad one keeps its pre-step values
    vhack.Projector(adapter, basis, where="update", on_nonfinite="warn").attach(opt)
    with pytest.warns(RuntimeWarning, match="k_proj; they keep their pre-step values"):
        opt.step()
    lo, hi = int(adapter.offsets[1]), int(adapter.offsets[2])
    assert torch.equal(adapter.delta[lo:hi], before[lo:hi])  # kept its pre-step value
    assert torch.isfinite(adapter.delta).all()
    assert not torch.equal(adapter.delta[:lo], before[:lo])


def test_attached_grad_mode_nonfinite_gradient_skips_the_step(adapter):
    """on_nonfinite='raise' in a hook: the optimizer step does not run, delta and its gradient
    are exactly as they were."""
    opt = torch.optim.AdamW([adapter.delta], lr=0.1)
    vhack.Projector(adapter, make_basis(adapter)).attach(opt)
    grad = torch.randn(adapter.delta.numel(), generator=torch.Generator().manual_seed(4))
    grad[-1] = float("nan")  # gate_proj: not even a projected module
    adapter.delta.grad = grad.clone()
    before = adapter.delta.detach().clone()
    with pytest.raises(RuntimeError, match="non-finite dS gradient in gate_proj"):
        opt.step()
    assert torch.equal(adapter.delta.detach(), before)
    assert torch.equal(adapter.delta.grad.nan_to_num(), grad.nan_to_num())


# ---- compatibility of a basis with the adapter ------------------------------------------------


def _fingerprinted(adapter, source, names=None):
    """A HackBasis over `names` (default all) of `adapter`, carrying `source`'s fingerprint."""
    from vhack.basis import adapter_fingerprint

    g = torch.Generator().manual_seed(5)
    names = names or adapter.names
    V = {n: random_orthonormal_rows(1, adapter.modules[n].rank, g).float() for n in names}
    meta = {"fingerprint": json.dumps(adapter_fingerprint(source)), "model": "toy"}
    return vhack.HackBasis(V, {n: torch.ones(1) for n in names}, meta)


def test_basis_of_another_model_is_refused(adapter):
    other = vhack.wrap(Toy(seed=1), use_cache=False, progress=False)  # same shapes, other weights
    basis = _fingerprinted(adapter, other)
    with pytest.raises(ValueError, match=r"extracted from another model \('toy'\).*q_proj: weight"):
        vhack.Projector(adapter, basis)
    with pytest.warns(UserWarning, match="used anyway: strict=False"):
        vhack.Projector(adapter, basis, strict=False)
    vhack.Projector(adapter, _fingerprinted(adapter, adapter))  # its own model: accepted


def test_partial_basis_needs_opt_in_and_is_reported(adapter):
    subset = {n: V for n, V in make_basis(adapter, skip=()).items() if n != "up_proj"}
    with pytest.raises(
        ValueError, match=r"covers 3 of the 4 wrapped modules; not covered: up_proj"
    ):
        vhack.Projector(adapter, subset)
    with pytest.warns(UserWarning, match=r"1 wrapped module\(s\) are not projected: up_proj"):
        proj = vhack.Projector(adapter, subset, partial=True)
    assert proj.unprojected == ["up_proj"] and proj.ks[2] == 0
    # a smaller model's basis (a prefix of the modules, with its own fingerprint) is refused too
    small = vhack.wrap(Toy(), targets=["q_proj", "k_proj"], use_cache=False, progress=False)
    with pytest.raises(ValueError, match="covers 2 of the 4 wrapped modules"):
        vhack.Projector(adapter, _fingerprinted(small, small))
    # modules an extracted basis dropped itself (noise floor) are not a partial match
    full = _fingerprinted(adapter, adapter)
    floored = vhack.HackBasis(
        {n: full.V(n) for n in full.names if n != "k_proj"},
        {n: full.sv(n) for n in full.names if n != "k_proj"},
        full.metadata,
    )
    assert vhack.Projector(adapter, floored).unprojected == []


@pytest.mark.interpreter
def test_projector_is_one_triton_launch(monkeypatch):
    from vhack.kernels import project as kernels

    launches = record_launches(monkeypatch, kernels, "_project_fused_kernel")
    adapter = vhack.wrap(Toy().to(DEVICE), use_cache=False, progress=False)
    basis = make_basis(adapter)
    grad = torch.randn(adapter.delta.numel(), generator=torch.Generator().manual_seed(9))
    grad = grad.to(DEVICE)
    adapter.delta.grad = grad.clone()
    proj = vhack.Projector(adapter, basis, backend="triton")
    launches.clear()
    stats = proj.project_()
    assert launches == [(len(adapter.names),)]
    expected, ref_stats = reference_projection(adapter, basis, grad)
    assert_close(adapter.delta.grad, expected, **TOL)
    assert_close(stats.raw, ref_stats, **TOL)


def test_statistics_window_skips_zero_gradient_steps_on_host_and_device(adapter):
    """ProjStatsWindow (the callback's) and mean_over_steps_with_gradient (the GRPO trainer's,
    on the device) average the same steps: a zero-gradient step is counted, not averaged, so
    nothing turns NaN; a NaN gradient stays visible."""
    from vhack.projstats import STAT_FIELDS, ProjStatsWindow, mean_over_steps_with_gradient

    proj = vhack.Projector(adapter, make_basis(adapter))
    grad = torch.randn(adapter.delta.numel(), generator=torch.Generator().manual_seed(4))
    steps = [proj.project_(grad.clone()), proj.project_(torch.zeros_like(grad))]
    assert steps[0].has_gradient and not steps[1].has_gradient
    assert math.isnan(steps[1].cin_mean)  # one step alone: undefined, not 0
    window = ProjStatsWindow()
    for stats in steps:
        window.add(stats)
    window.add(None)  # no gradient reached dS
    logged = window.pop()
    assert logged["vhack/skipped_steps"] == 2 and window.pop() == {}
    for field, value in steps[0].as_dict().items():
        assert logged["vhack/" + field] == pytest.approx(value, rel=1e-6), field
    means, skipped = mean_over_steps_with_gradient(torch.stack([s.summary() for s in steps]))
    assert int(skipped) == 1
    for field, value in zip(STAT_FIELDS, means.tolist(), strict=True):
        assert value == pytest.approx(logged["vhack/" + field], rel=1e-6), field
    bad = grad.clone()
    bad[0] = float("nan")
    window.add(vhack.Projector(adapter, make_basis(adapter), on_nonfinite="ignore").project_(bad))
    assert math.isnan(window.pop()["vhack/norm_before"])
