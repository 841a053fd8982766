"""Data parallelism on 2 CPU processes (gloo): the sharded projection equals the single-process
projection (every mode, statistics included), DDP and FSDP2 training equal single-process training
on the concatenated batch, and shards that do not tile dS are refused on every rank."""

from __future__ import annotations

import pytest
import torch
from _dist import run_distributed

import vhack

pytestmark = [
    pytest.mark.slow,
    # the test basis leaves some modules out on purpose (statistics-only modules)
    pytest.mark.filterwarnings("ignore:partial basis:UserWarning"),
]

MODES = ("hackward", "both", "reverse", "measure")


def _wrapped(seed: int = 0):
    model = vhack.models.tiny_model(seed=seed)
    adapter = vhack.wrap(model, progress=False, use_cache=False)
    g = torch.Generator().manual_seed(seed + 1)
    basis = {}
    for i, (name, mod) in enumerate(adapter.modules.items()):
        if i % 5 == 3:
            continue  # modules without basis rows: statistics only
        q, _ = torch.linalg.qr(torch.randn(mod.rank, 1 + i % 3, generator=g, dtype=torch.float64))
        basis[name] = q.T.contiguous()
    return model, adapter, basis


def _close(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / (1 + |b|): relative for large values, absolute near zero."""
    err = (a.double() - b.double()).abs() / (1 + b.double().abs())
    return err.max().item() if err.numel() else 0.0


# ---- sharded projection --------------------------------------------------------------------------


def _sharded_worker(rank: int, world: int) -> dict:
    """Every check of the sharded projection in one launch: {case: errors or message}."""
    out = {}
    for cut in (300, 0):  # a split inside a module; rank 0 holding nothing
        out.update({(cut, *k): v for k, v in _sharded_errors(rank, cut).items()})
    for name, shards in BAD_SHARDS.items():
        out[name] = _bad_cover_message(rank, shards)
    return out


def _sharded_errors(rank: int, cut: int) -> dict:
    from vhack.integrations import ShardedProjector

    _, adapter, basis = _wrapped()
    R = adapter.delta.numel()
    cuts = [0, cut, R]
    lo, hi = cuts[rank], cuts[rank + 1]
    g = torch.Generator().manual_seed(7)
    full = torch.randn(R, generator=g)
    full[:40] *= 5  # unequal module norms
    errors = {}
    for mode in MODES:
        for preserve in (False, True):
            proj = vhack.Projector(
                adapter, basis, mode=mode, alpha=0.7, preserve_magnitude=preserve, partial=True
            )
            single = full.clone()
            expected = proj.project_(single)
            sharded = ShardedProjector(proj, (lo, hi))
            local = full[lo:hi].clone()
            got = sharded.project_(local)
            errors[mode, preserve] = (
                _close(local, single[lo:hi]),
                _close(got.raw, expected.raw),
                abs(got.cin_mean - expected.cin_mean),
                abs(got.fired - expected.fired),
            )
    # where="update": the change of dS over a step, projected on shards
    proj = vhack.Projector(adapter, basis, mode="hackward", where="update", partial=True)
    start = torch.randn(R, generator=g)
    change = torch.randn(R, generator=g)
    with torch.no_grad():
        adapter.delta.copy_(start)
        proj.snapshot()
        adapter.delta.add_(change)
    expected = proj.project_()
    single = adapter.delta.detach().clone()
    local = torch.nn.Parameter(start[lo:hi].clone())  # this rank's shard of a flat-sharded dS
    sharded = ShardedProjector(proj, (lo, hi), param=local)
    sharded.snapshot()
    with torch.no_grad():
        local.add_(change[lo:hi])
    got = sharded.project_()
    errors["update", False] = (
        _close(local.detach(), single[lo:hi]),
        _close(got.raw, expected.raw),
        abs(got.cin_mean - expected.cin_mean),
        0.0,
    )
    return errors


BAD_SHARDS = {"gap": [(0, 300), (400, None)], "overlap": [(0, 500), (300, None)]}


def _bad_cover_message(rank: int, shards) -> str:
    from vhack.integrations import ShardedProjector

    _, adapter, basis = _wrapped()
    shards = [(lo, adapter.delta.numel() if hi is None else hi) for lo, hi in shards]
    try:
        ShardedProjector(vhack.Projector(adapter, basis, partial=True), shards[rank])
    except ValueError as err:
        return str(err)
    return "no error"


@pytest.fixture(scope="module")
def sharded_runs(tmp_path_factory):
    return run_distributed(_sharded_worker, out_dir=tmp_path_factory.mktemp("sharded"))


def test_sharded_projection_equals_single_process(sharded_runs):
    cases = [k for k in sharded_runs[0] if k not in BAD_SHARDS]
    assert len(cases) == 2 * (2 * len(MODES) + 1)
    for rank, results in enumerate(sharded_runs):
        for case in cases:
            errs = results[case]
            assert max(errs) <= 1e-6, f"rank {rank} {case}: errors (values, raw, cin, fired) {errs}"


@pytest.mark.parametrize(("name", "words"), [("gap", "gap at element 300"), ("overlap", "overlap")])
def test_shards_that_do_not_tile_dS_are_refused_on_every_rank(sharded_runs, name, words):
    messages = [results[name] for results in sharded_runs]
    for message in messages:
        assert "do not tile the packed buffer" in message and words in message, message
    assert messages[0] == messages[1]


# ---- training: DDP and FSDP2 equal single-process training on the concatenated batch -------------

STEPS = 3


def _batches():
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, 256, (4, 12), generator=g) for _ in range(STEPS)]


def _train(model, adapter, proj, batches, step_grad) -> torch.Tensor:
    """SGD on dS, projecting every step; step_grad(batch) runs forward + backward (+ sync).

    SGD, not Adam: Adam's m / sqrt(v) turns a near-zero gradient element into a full +-lr step
    whose sign float32 summation order decides, so two correct runs can differ by ~lr there."""
    opt = torch.optim.SGD([adapter.delta], lr=1.0)
    model.train()
    for batch in batches:
        opt.zero_grad()
        step_grad(batch)
        proj.project_()
        opt.step()
    return adapter.delta.detach().clone()


def _single_process_delta(mode: str) -> torch.Tensor:
    model, adapter, basis = _wrapped()
    proj = vhack.Projector(adapter, basis, mode=mode, partial=True)
    return _train(
        model, adapter, proj, _batches(), lambda b: model(input_ids=b, labels=b).loss.backward()
    )


def _ddp(rank: int, world: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    model, adapter, basis = _wrapped()
    ddp = DDP(model)
    proj = vhack.Projector(adapter, basis, partial=True)  # unchanged: DDP averaged the grad

    def step(batch):
        half = batch.chunk(world)[rank]
        ddp(input_ids=half, labels=half).loss.backward()

    delta = _train(model, adapter, proj, _batches(), step)
    return {"delta": delta, "stats": proj.last_stats.raw.clone()}


def _fsdp2(rank: int, world: int, sharded: bool) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from vhack.integrations import ShardedProjector, all_reduce_grad

    model, adapter, basis = _wrapped()
    mesh = init_device_mesh("cpu", (world,))
    proj = vhack.Projector(adapter, basis, partial=True)
    if sharded:
        fully_shard(model, mesh=mesh)
        runner = ShardedProjector(proj)  # shard range read from the DTensor dS
    else:
        fully_shard(model, mesh=mesh, ignored_params={adapter.delta})
        runner = proj

    def step(batch):
        half = batch.chunk(world)[rank]
        model(input_ids=half, labels=half).loss.backward()
        if not sharded:
            all_reduce_grad(adapter)  # dS replicated: one collective for its flat gradient

    delta = _train(model, adapter, runner, _batches(), step)
    if sharded:
        delta = adapter.delta.full_tensor().detach().clone()
    return {"delta": delta, "stats": runner.last_stats.raw.clone()}


def _training_worker(rank: int, world: int) -> dict:
    """Each setup in one launch; a setup's failure is returned (as text), not raised, so the
    others still report."""
    import traceback

    out = {}
    for name, run in [
        ("ddp", lambda: _ddp(rank, world)),
        ("fsdp2-replicated", lambda: _fsdp2(rank, world, sharded=False)),
        ("fsdp2-sharded", lambda: _fsdp2(rank, world, sharded=True)),
    ]:
        try:
            out[name] = run()
        except Exception:
            out[name] = traceback.format_exc()
    return out


@pytest.fixture(scope="module")
def training_runs(tmp_path_factory):
    results = run_distributed(_training_worker, out_dir=tmp_path_factory.mktemp("training"))
    return results, _single_process_delta("hackward")


@pytest.mark.parametrize("setup", ["ddp", "fsdp2-replicated", "fsdp2-sharded"])
def test_training_equals_single_process_on_the_concatenated_batch(training_runs, setup):
    results, expected = training_runs
    assert expected.abs().max() > 1e-3  # dS moved
    for rank, runs in enumerate(results):
        r = runs[setup]
        assert not isinstance(r, str), f"rank {rank} failed:\n{r}"
        err = (r["delta"] - expected).abs().max().item()
        assert err < 1e-5, f"rank {rank}: dS differs from single-process training by {err}"
    a, b = (runs[setup]["stats"] for runs in results)
    assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)  # global statistics, identical on ranks


def test_sharded_projection_goes_through_the_ops_dispatch(tmp_path, monkeypatch):
    """ShardedProjector runs the Projector's projection (vhack.ops.project_ and its backend
    choice: Triton on CUDA, C++ on CPU), not a copy of the rule: a forced backend sees the call,
    and the result is the single-process projection's, exactly. One process, world size 1."""
    import torch.distributed as dist

    from vhack import reference
    from vhack.integrations import ShardedProjector

    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        _, adapter, basis = _wrapped()
        proj = vhack.Projector(adapter, basis, alpha=0.7, partial=True)
        sharded = ShardedProjector(proj, (0, adapter.delta.numel()))
        full = torch.randn(adapter.delta.numel(), generator=torch.Generator().manual_seed(2))
        calls = []
        oracle = reference.project_
        monkeypatch.setattr(
            reference, "project_", lambda *a, **k: calls.append(a[5]) or oracle(*a, **k)
        )
        with vhack.ops.use_backend("reference"):
            expected = full.clone()
            expected_stats = proj.project_(expected)
            got = full.clone()
            stats = sharded.project_(got)
        assert calls == ["hackward", "hackward"]  # the Projector's call, then the sharded one
        assert torch.equal(got, expected)
        assert torch.equal(stats.raw, expected_stats.raw)
    finally:
        dist.destroy_process_group()
