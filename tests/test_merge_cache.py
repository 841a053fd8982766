"""The merge cache of SVDLinear / Adapter.merged(): W_eff = W + U diag(dS) Vh is recomputed after
every way dS can change (each torch optimizer in its for-loop, foreach and fused variants, writes
through .data, in-place ops, loads), never from a stale dS, without a host sync in the forward.

"Fresh" means: every module's cached W_eff equals vhack.reference.merge_weight of the current dS
(float32, rtol 1e-5 / atol 1e-6: the same formula, summed in another order), and the wrapped
model's forward equals the factored reference backend, which never uses a cached weight (rtol/atol
1e-4 as in test_adapter.py: the dense and the factored forward differ by the SVD's float32
reconstruction error).
"""

import copy
import itertools
import pickle

import pytest
import torch
from helpers import assert_close
from torch import nn

import vhack
from vhack import ops, reference
from vhack.adapter import DeltaParameter

IDS = torch.tensor([[5, 100, 33, 7, 250, 12, 99, 1], [3, 3, 64, 200, 18, 77, 2, 256]])
VARIANTS = {
    "default": {},
    "for-loop": {"foreach": False},
    "foreach": {"foreach": True},
    "fused": {"fused": True},
}


def _merge_count(monkeypatch) -> list:
    """Counts calls of vhack.ops.merge_weight (they still run)."""
    calls = []
    real = ops.merge_weight
    monkeypatch.setattr(ops, "merge_weight", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def assert_fresh(adapter, name="merged weight"):
    """Every module's cached merged weight equals the reference merge of the current dS."""
    for mod_name, lin in adapter.modules.items():
        expected = reference.merge_weight(
            lin.U, lin.S, lin.delta_S.detach(), lin.Vh, base=lin.base_weight
        )
        assert_close(lin.merged_weight(), expected, rtol=1e-5, atol=1e-6, name=f"{name} {mod_name}")


def _model_output(model, x):
    with torch.no_grad():
        return model(x)


def _assert_forward_fresh(adapter, model, x, name="forward"):
    """The cached dense forward equals the factored reference forward (no cached weight)."""
    got = _model_output(model, x)
    with ops.use_backend("reference"):
        factored = _model_output(model, x)
    assert_close(got, factored, rtol=1e-4, atol=1e-4, name=name)


def _toy():
    """A two-Linear model (one with bias), wrapped; x [4, 6]."""
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 7, bias=True))
    for p in model.parameters():
        p.data = torch.randn(p.shape, generator=g)
    adapter = vhack.wrap(model, targets="all-linear", use_cache=False, progress=False)
    return model, adapter, torch.randn(4, 6, generator=g)


# ---- optimizers ----------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["for-loop", "foreach", "fused"])  # CPU default: for-loop
@pytest.mark.parametrize("opt_cls", [torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW])
def test_tiny_model_trains_with_every_optimizer_variant(tiny, opt_cls, variant):
    """The issue's reproduction: with fused AdamW the loss stayed constant while |dS| grew."""
    model, _ = tiny
    adapter = vhack.wrap(model, progress=False)
    kwargs = {"momentum": 0.9} if opt_cls is torch.optim.SGD else {}
    opt = opt_cls([adapter.delta], lr=1e-2, **kwargs, **VARIANTS[variant])
    losses = []
    for step in range(3):
        opt.zero_grad()
        loss = model(input_ids=IDS, labels=IDS).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
        assert adapter.delta.abs().max() > 0
        assert_fresh(adapter, name=f"step {step}")
    with torch.no_grad():
        after = model(input_ids=IDS, labels=IDS).loss.item()
        with ops.use_backend("reference"):
            factored = model(input_ids=IDS, labels=IDS).loss.item()
    losses.append(after)
    assert all(abs(b - a) > 1e-4 for a, b in itertools.pairwise(losses)), losses
    assert abs(after - factored) < 1e-4 * abs(factored), (after, factored)


def _optimizer_cases():
    """(name, factory) for every torch.optim optimizer that trains a 1-D float32 Parameter, in
    each implementation torch offers for it on CPU."""
    cases = []
    for name in sorted(torch.optim.__all__):
        cls = getattr(torch.optim, name)
        if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
            continue
        if name in ("SparseAdam", "Optimizer", "Muon"):  # sparse grads / 2-D parameters only
            continue
        for variant, kwargs in VARIANTS.items():
            try:
                cls([nn.Parameter(torch.zeros(2))], **kwargs)
            except (TypeError, ValueError, RuntimeError):
                continue  # this optimizer has no such implementation
            cases.append(pytest.param(cls, kwargs, id=f"{name}-{variant}"))
    return cases


@pytest.mark.parametrize(("opt_cls", "kwargs"), _optimizer_cases())
def test_every_torch_optimizer_step_refreshes_the_merge(opt_cls, kwargs):
    model, adapter, x = _toy()
    if opt_cls is torch.optim.LBFGS:
        kwargs = {**kwargs, "lr": 0.5}
    opt = opt_cls([adapter.delta], **kwargs)

    def closure():
        opt.zero_grad()
        loss = model(x).square().mean()
        loss.backward()
        return loss

    for _ in range(2):
        before = adapter.delta.detach().clone()
        opt.step(closure)
        assert not torch.equal(adapter.delta.detach(), before)  # the optimizer changed dS
        assert_fresh(adapter)
        _assert_forward_fresh(adapter, model, x)


def test_custom_optimizer_writing_through_data_and_raw_fused_kernel():
    """Old-style optimizers (p.data.add_) and ones calling a fused kernel directly, inside step."""

    class OldStyleSGD(torch.optim.Optimizer):
        def __init__(self, params, lr):
            super().__init__(params, {"lr": lr})

        @torch.no_grad()
        def step(self, closure=None):
            for group in self.param_groups:
                for p in group["params"]:
                    d = p.data  # a DeltaParameter ticks here, but even a plain .data path works:
                    d.add_(p.grad, alpha=-group["lr"])

    class RawFusedSGD(torch.optim.Optimizer):
        def __init__(self, params, lr):
            super().__init__(params, {"lr": lr})

        @torch.no_grad()
        def step(self, closure=None):
            for group in self.param_groups:
                params = [p for p in group["params"] if p.grad is not None]
                torch._fused_sgd_(
                    params,
                    [p.grad for p in params],
                    [],
                    weight_decay=0.0,
                    momentum=0.0,
                    lr=group["lr"],
                    dampening=0.0,
                    nesterov=False,
                    maximize=False,
                    is_first_step=False,
                )

    for opt_cls in (OldStyleSGD, RawFusedSGD):
        model, adapter, x = _toy()
        opt = opt_cls([adapter.delta], lr=0.1)
        for _ in range(2):
            opt.zero_grad()
            model(x).square().mean().backward()
            version = adapter.delta._version
            opt.step()
            assert adapter.delta.abs().max() > 0
            if opt_cls is RawFusedSGD:
                assert adapter.delta._version == version  # invisible to the version counter
            assert_fresh(adapter, name=opt_cls.__name__)
            _assert_forward_fresh(adapter, model, x, name=opt_cls.__name__)


# ---- direct writes --------------------------------------------------------------------------------


def _writes(adapter):
    """Functions writing dS in each way a user can write it directly (named after the way)."""
    lin = next(iter(adapter.modules.values()))
    lo, hi = 0, lin.rank  # the first module packed

    def data_add():
        adapter.delta.data.add_(0.1)

    def data_slice():
        adapter.delta.data[lo:hi].fill_(0.3)

    def data_copy():
        adapter.delta.data.copy_(torch.linspace(-0.2, 0.2, adapter.delta.numel()))

    def data_assign():
        adapter.delta.data = torch.full_like(adapter.delta.detach(), 0.05)

    def no_grad_inplace():
        with torch.no_grad():
            adapter.delta.mul_(-2.0)

    def inference_mode_inplace():
        with torch.inference_mode():
            adapter.delta.add_(0.01)

    def view_inplace():
        with torch.no_grad():
            lin.delta_S.copy_(torch.linspace(0.0, 0.1, hi - lo))

    def detached_inplace():
        adapter.delta.detach().sub_(0.02)

    return [
        data_add,
        data_slice,
        data_copy,
        data_assign,
        no_grad_inplace,
        inference_mode_inplace,
        view_inplace,
        detached_inplace,
    ]


def test_direct_writes_are_seen():
    model, adapter, x = _toy()
    for write in _writes(adapter):
        _model_output(model, x)  # caches the merge of the current dS
        before = adapter.delta.detach().clone()
        write()
        assert not torch.equal(adapter.delta.detach(), before), write.__name__
        assert_fresh(adapter, name=write.__name__)
        _assert_forward_fresh(adapter, model, x, name=write.__name__)


def test_load_state_dict_is_seen(tiny):
    model, _ = tiny
    adapter = vhack.wrap(model, progress=False)
    with torch.no_grad():
        adapter.delta.normal_(0, 0.05, generator=torch.Generator().manual_seed(3))
    saved = adapter.state_dict()
    saved_model = {k: v.clone() for k, v in model.state_dict().items()}
    expected = model(input_ids=IDS).logits.detach()
    for load in (
        lambda: adapter.load_state_dict(saved),
        lambda: model.load_state_dict(saved_model),
        lambda: model.load_state_dict(saved_model, assign=True),
    ):
        with torch.no_grad():
            adapter.delta.zero_()
        model(input_ids=IDS)  # caches the merge of dS = 0
        load()
        assert_fresh(adapter)
        assert_close(model(input_ids=IDS).logits, expected, rtol=1e-6, atol=1e-6, name="logits")


def test_invalidate_after_a_write_the_cache_cannot_see():
    """A .data alias kept from before is the documented case for adapter.invalidate()."""
    model, adapter, x = _toy()
    alias = adapter.delta.data
    _model_output(model, x)
    alias.add_(0.25)
    adapter.invalidate()
    assert_fresh(adapter)
    _assert_forward_fresh(adapter, model, x)


def test_update_mode_projection_between_step_and_forward_is_seen():
    """Projector(where="update").project_() writes the projected dS through .data after the step;
    a forward between the step and the projection must not keep the unprojected weight."""
    model, adapter, x = _toy()
    g = torch.Generator().manual_seed(1)
    basis = {
        n: torch.linalg.qr(torch.randn(r, 2, generator=g))[0].T.contiguous()
        for n, r in zip(adapter.names, adapter.ranks, strict=True)
    }
    projector = vhack.Projector(adapter, basis, mode="both", where="update")
    opt = torch.optim.AdamW([adapter.delta], lr=0.1, fused=True)
    model(x).square().mean().backward()
    projector.snapshot()
    opt.step()
    _model_output(model, x)  # caches the unprojected step
    unprojected = adapter.delta.detach().clone()
    projector.project_()
    assert not torch.allclose(adapter.delta.detach(), unprojected)
    assert_fresh(adapter)
    _assert_forward_fresh(adapter, model, x)


# ---- cost: still a cache, and no host sync -----------------------------------------------------------


def test_cache_merges_once_per_step(monkeypatch):
    model, adapter, x = _toy()
    opt = torch.optim.AdamW([adapter.delta], lr=0.1, fused=True)
    calls = _merge_count(monkeypatch)
    for step in range(1, 4):
        for _ in range(3):  # gradient accumulation: three micro-batches per optimizer step
            model(x).square().mean().backward()
        with torch.no_grad():
            model(x)  # e.g. the old-policy log-probs at the same dS
        with adapter.merged():
            model(x)
        opt.step()
        opt.zero_grad()
        # step 1 runs at dS = 0 (the base weight, no merge); then one merge per module per step
        assert len(calls) == (step - 1) * len(adapter), (step, len(calls))


SYNCS = ("__bool__", "item", "tolist", "cpu", "nonzero", "numpy", "__int__", "__float__", "equal")


def test_forward_after_a_step_makes_no_host_sync(tiny, monkeypatch):
    """Deciding whether to re-merge reads host counters only: no tensor reaches the host."""
    model, _ = tiny
    adapter = vhack.wrap(model, progress=False)
    opt = torch.optim.AdamW([adapter.delta], lr=1e-2, fused=True)
    model(input_ids=IDS, labels=IDS).loss.backward()
    opt.step()
    xs = {n: torch.randn(3, lin.in_features) for n, lin in adapter.modules.items()}
    calls = _merge_count(monkeypatch)
    synced = []

    def forbid(name):
        def call(*args, **kwargs):
            synced.append(name)
            raise AssertionError(f"host sync: Tensor.{name} in the forward")

        return call

    with monkeypatch.context() as m:
        for name in SYNCS:
            m.setattr(torch.Tensor, name, forbid(name))
        m.setattr(torch, "equal", forbid("torch.equal"))
        m.setattr(torch, "is_nonzero", forbid("torch.is_nonzero"))
        outs = {n: lin(xs[n]) for n, lin in adapter.modules.items()}  # re-merges: fresh dS
        with adapter.merged():
            merged_outs = {n: lin(xs[n]) for n, lin in adapter.modules.items()}
    assert synced == []
    assert len(calls) == len(adapter)  # every module re-merged after the step, once
    for n, lin in adapter.modules.items():
        W = reference.merge_weight(lin.U, lin.S, lin.delta_S.detach(), lin.Vh, base=lin.base_weight)
        assert_close(outs[n], xs[n] @ W.T, rtol=1e-5, atol=1e-5, name=n)
        assert_close(merged_outs[n], xs[n] @ W.T, rtol=1e-5, atol=1e-5, name=n)


def test_merged_context_sees_the_latest_step(tiny):
    model, _ = tiny
    adapter = vhack.wrap(model, progress=False)
    opt = torch.optim.AdamW([adapter.delta], lr=1e-2, fused=True)
    for _ in range(2):
        with adapter.merged(), torch.no_grad():
            model(input_ids=IDS)  # a generation pass caches the merge
        model(input_ids=IDS, labels=IDS).loss.backward()
        opt.step()
        opt.zero_grad()
        with adapter.merged(), torch.no_grad():
            generated = model(input_ids=IDS).logits
        with ops.use_backend("reference"), torch.no_grad():
            factored = model(input_ids=IDS).logits
        assert_close(generated, factored, rtol=1e-4, atol=1e-4, name="merged() after a step")


# ---- the packed Parameter -------------------------------------------------------------------------


def test_delta_parameter_is_a_parameter_and_survives_copies():
    model, adapter, _ = _toy()
    assert isinstance(adapter.delta, nn.Parameter) and isinstance(adapter.delta, DeltaParameter)
    assert repr(adapter.delta).startswith("Parameter containing:")
    assert type(adapter.delta * 2) is torch.Tensor  # ops return plain tensors
    for copied in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        store = next(m for m in copied.modules() if hasattr(m, "delta"))
        assert type(store.delta) is DeltaParameter
        assert store.delta.requires_grad
        lin = next(m for m in copied.modules() if isinstance(m, vhack.SVDLinear))
        store.delta.data.add_(0.1)
        expected = reference.merge_weight(
            lin.U, lin.S, lin.delta_S.detach(), lin.Vh, base=lin.base_weight
        )
        assert_close(lin.merged_weight(), expected, rtol=1e-5, atol=1e-6, name="copy")


@pytest.mark.slow
def test_torch_compile_trains_without_recompiling_every_step(caplog):
    """Under torch.compile the cache check runs eagerly: its integer key changes every step and,
    traced, would be guarded on and recompiled until dynamo's recompile limit."""
    import logging

    model, adapter, x = _toy()
    opt = torch.optim.AdamW([adapter.delta], lr=0.1, fused=True)
    compiled = torch.compile(model, backend="aot_eager")
    with caplog.at_level(logging.WARNING, logger="torch._dynamo"):
        for _ in range(10):
            opt.zero_grad()
            y = compiled(x)
            y.square().mean().backward()
            opt.step()
            with ops.use_backend("reference"):
                factored = model(x)
            assert_close(compiled(x), factored, rtol=1e-4, atol=1e-4, name="compiled forward")
    assert "recompile_limit" not in caplog.text
