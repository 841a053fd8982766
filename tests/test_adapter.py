"""vhack.wrap / Adapter / SVDLinear on the tiny offline model."""

import copy

import pytest
import safetensors.torch
import torch
from helpers import assert_close
from torch import nn

import vhack
from vhack import ops, reference

IDS = torch.tensor([[5, 100, 33, 7, 250, 12, 99, 1], [3, 3, 64, 200, 18, 77, 2, 256]])


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _randomize_delta(adapter, scale=0.05, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        adapter.delta.copy_(scale * torch.randn(adapter.delta.shape, generator=g))


def test_wrap_default_targets_and_packing(tiny):
    model, _ = tiny
    adapter = vhack.wrap(model)
    suffixes = {n.rsplit(".", 1)[-1] for n in adapter.names}
    assert suffixes == set(vhack.DEFAULT_TARGETS)
    assert len(adapter) == 7 * model.config.num_hidden_layers
    assert adapter.delta.dtype == torch.float32 and adapter.delta.requires_grad
    assert adapter.offsets.dtype == torch.int64 and adapter.offsets[-1] == adapter.delta.numel()
    for m, (name, mod) in enumerate(adapter.modules.items()):
        assert isinstance(model.get_submodule(name), vhack.SVDLinear)
        lo, hi = int(adapter.offsets[m]), int(adapter.offsets[m + 1])
        assert hi - lo == mod.rank == min(mod.in_features, mod.out_features)
        assert mod.delta_S.data_ptr() == adapter.delta[lo:hi].data_ptr()  # a view, not a copy
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == [f"{adapter.names[0]}.vhack_store.delta"]


def test_svd_reconstructs_weight(tiny):
    model, _ = tiny
    adapter = vhack.wrap(model)
    for name, mod in adapter.modules.items():
        W = mod.U @ torch.diag(mod.S) @ mod.Vh
        assert_close(W, mod.base_weight, rtol=1e-4, atol=1e-6, name=name)
        assert_close(mod.U.T @ mod.U, torch.eye(mod.rank), rtol=0, atol=1e-5, name=f"{name} U")


def test_identity_at_zero_delta(tiny):
    model, _ = tiny
    base = _logits(model)
    vhack.wrap(model)
    diff = (_logits(model) - base).abs().max().item()
    assert diff <= 1e-5, diff
    assert diff == 0.0  # the dS = 0 path is the base weight itself


def test_delta_changes_output_and_gradient_matches_reference(tiny):
    model, _ = tiny
    adapter = vhack.wrap(model)
    base = _logits(model)
    _randomize_delta(adapter)
    assert (_logits(model) - base).abs().max() > 1e-3

    name, lin = next(iter(adapter.modules.items()))
    x = torch.randn(3, 5, lin.in_features)
    gy = torch.randn(3, 5, lin.out_features)
    lin(x).backward(gy)
    lo, hi = lin._span
    expected = reference.delta_grad(x, gy, lin.U, lin.Vh)
    assert_close(adapter.delta.grad[lo:hi], expected, rtol=1e-4, atol=1e-6, name=name)
    assert adapter.delta.grad[:lo].abs().sum() == 0 and adapter.delta.grad[hi:].abs().sum() == 0


def test_model_gradient_equals_reference_backend_gradient(tiny):
    """The dense-forward path and the eager factored reference give the same dS gradient."""
    model, _ = tiny
    adapter = vhack.wrap(model)
    _randomize_delta(adapter, scale=0.02)
    grads = {}
    for backend in ("torch", "reference"):
        adapter.delta.grad = None
        with ops.use_backend(backend):
            model(input_ids=IDS, labels=IDS).loss.backward()
        grads[backend] = adapter.delta.grad.clone()
    assert_close(grads["torch"], grads["reference"], rtol=1e-3, atol=1e-6, name="dS grad")


def test_gradient_is_exact_at_zero_delta(tiny):
    """At dS = 0 the forward bypasses to the base weight, yet dS keeps its gradient."""
    model, _ = tiny
    adapter = vhack.wrap(model)
    model(input_ids=IDS, labels=IDS).loss.backward()
    at_zero = adapter.delta.grad.clone()
    adapter.delta.grad = None
    with ops.use_backend("reference"):
        model(input_ids=IDS, labels=IDS).loss.backward()
    assert at_zero.abs().max() > 0
    assert_close(at_zero, adapter.delta.grad, rtol=1e-3, atol=1e-6, name="dS grad at 0")


def test_unwrap_round_trip_restores_base_exactly(tiny):
    model, _ = tiny
    model.lm_head.weight.requires_grad_(False)  # a user's own freezing must survive
    before = copy.deepcopy(model.state_dict())
    grads_before = {n: p.requires_grad for n, p in model.named_parameters()}
    modules_before = dict(model.named_modules())
    base = _logits(model)
    adapter = vhack.wrap(model)
    _randomize_delta(adapter)
    restored = adapter.unwrap()
    assert restored is model
    assert dict(model.named_modules()).keys() == modules_before.keys()
    for name, module in model.named_modules():
        assert module is modules_before[name]
    assert model.state_dict().keys() == before.keys()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads_before
    assert torch.equal(_logits(model), base)
    with pytest.raises(RuntimeError, match="unwrapped"):
        adapter.state_dict()
    vhack.wrap(model)  # wrapping again works after unwrap


def test_merge_equals_wrapped_forward(tiny):
    model, _ = tiny
    adapter = vhack.wrap(model)
    _randomize_delta(adapter)
    wrapped = _logits(model)
    with ops.use_backend("reference"):
        factored = _logits(model)
    adapter.merge()
    assert not any(isinstance(m, vhack.SVDLinear) for m in model.modules())
    merged = _logits(model)
    assert_close(merged, wrapped, rtol=1e-5, atol=1e-5, name="merge() vs wrapped")
    assert_close(merged, factored, rtol=1e-4, atol=1e-4, name="merge() vs factored reference")


def test_merged_context_caches_until_delta_changes(tiny, monkeypatch):
    model, _ = tiny
    adapter = vhack.wrap(model)
    calls = []
    real_merge = ops.merge_weight
    monkeypatch.setattr(ops, "merge_weight", lambda *a, **k: calls.append(1) or real_merge(*a, **k))
    with adapter.merged():
        _logits(model)
    assert calls == []  # dS = 0: the base weight itself, no merge
    _randomize_delta(adapter)
    expected = _logits(model)
    n = len(calls)
    assert n == len(adapter)
    with adapter.merged():
        got = _logits(model)
        _logits(model)
    assert len(calls) == n  # nothing changed, nothing re-merged
    assert_close(got, expected, rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        adapter.delta.mul_(2.0)
    with adapter.merged():
        _logits(model)
    assert len(calls) == 2 * n
    lin = next(iter(adapter.modules.values()))
    expected_w = reference.merge_weight(lin.U, lin.S, lin.delta_S, lin.Vh, lin.base_weight)
    assert_close(lin.weight, expected_w, rtol=1e-6, atol=1e-7)


def test_nn_linear_compatibility(tiny):
    model, _ = tiny
    original = model.model.layers[0].mlp.down_proj
    adapter = vhack.wrap(model)
    lin = adapter.modules["model.layers.0.mlp.down_proj"]
    assert (lin.in_features, lin.out_features) == (original.in_features, original.out_features)
    assert lin.bias is None and lin.weight.shape == original.weight.shape
    assert lin.weight is lin.base_weight.detach() or torch.equal(lin.weight, original.weight)
    assert not lin.weight.requires_grad
    with pytest.raises(AttributeError, match="read-only"):
        lin.weight = nn.Parameter(torch.zeros(1))


def test_bias_and_all_linear_targets():
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3, bias=True))
    x = torch.randn(4, 6)
    with torch.no_grad():
        base = model(x)
    adapter = vhack.wrap(model, targets="all-linear", use_cache=False)
    assert adapter.names == ["0", "2"]
    with torch.no_grad():
        assert torch.equal(model(x), base)
    _randomize_delta(adapter, scale=0.3)
    y = model(x)
    y.sum().backward()
    assert adapter.delta.grad is not None and adapter.modules["2"].bias is not None


def test_all_linear_skips_lm_head(tiny):
    model, _ = tiny
    adapter = vhack.wrap(model, targets="all-linear")
    assert "lm_head" not in adapter.names and len(adapter) == 14


def test_explicit_targets_by_suffix_and_full_name(tiny):
    model, _ = tiny
    adapter = vhack.wrap(model, targets=["q_proj", "model.layers.1.mlp.down_proj"])
    assert adapter.names == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.1.self_attn.q_proj",
        "model.layers.1.mlp.down_proj",
    ]


def test_svd_cache_is_hit_on_second_wrap(tiny, tmp_path, monkeypatch):
    model, _ = tiny
    adapter = vhack.wrap(model, cache_dir=tmp_path)
    U0 = adapter.modules[adapter.names[0]].U.clone()
    adapter.unwrap()
    assert len(list((tmp_path / "svd").glob("*.safetensors"))) == len(adapter)

    def no_svd(*args, **kwargs):
        raise AssertionError("SVD recomputed despite the cache")

    monkeypatch.setattr(torch.linalg, "svd", no_svd)
    again = vhack.wrap(model, cache_dir=tmp_path)
    assert torch.equal(again.modules[again.names[0]].U, U0)


def test_damaged_svd_cache_is_recomputed(tiny, tmp_path):
    model, _ = tiny
    vhack.wrap(model, cache_dir=tmp_path, targets=["model.layers.0.mlp.up_proj"]).unwrap()
    (path,) = (tmp_path / "svd").glob("*.safetensors")
    path.write_bytes(b"not a safetensors file")
    with pytest.warns(UserWarning, match="recomputing the SVD of cache file"):
        adapter = vhack.wrap(model, cache_dir=tmp_path, targets=["model.layers.0.mlp.up_proj"])
    assert torch.equal(_logits(model), _logits(adapter.unwrap()))


def test_state_dict_round_trip_through_safetensors(tiny, tmp_path):
    model, _ = tiny
    adapter = vhack.wrap(model)
    _randomize_delta(adapter)
    sd = adapter.state_dict()
    assert list(sd) == adapter.names
    safetensors.torch.save_file(sd, str(tmp_path / "delta.safetensors"))
    expected = _logits(model)
    with torch.no_grad():
        adapter.delta.zero_()
    adapter.load_state_dict(safetensors.torch.load_file(str(tmp_path / "delta.safetensors")))
    assert torch.equal(_logits(model), expected)


def test_training_step_updates_only_delta(tiny):
    model, _ = tiny
    adapter = vhack.wrap(model)
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(3):
        opt.zero_grad()
        loss = model(input_ids=IDS, labels=IDS).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert adapter.delta.abs().max() > 0
    assert len(frozen) == len(list(model.parameters())) - 1
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    # after the step the cached merge is refreshed: dense forward == factored reference forward
    with ops.use_backend("reference"):
        factored = _logits(model)
    assert_close(_logits(model), factored, rtol=1e-4, atol=1e-4)


def test_segment_grads_from_one_backward(tiny):
    model, _ = tiny
    adapter = vhack.wrap(model)
    _randomize_delta(adapter, scale=0.02)
    B, T = IDS.shape
    seg = torch.arange(B).repeat_interleave(T)
    losses = [model(input_ids=IDS[b : b + 1], labels=IDS[b : b + 1]).loss for b in range(B)]
    with adapter.segment_grads(seg) as cap:
        out = model(input_ids=IDS).logits
        nll = nn.functional.cross_entropy(
            out[:, :-1].reshape(-1, out.shape[-1]), IDS[:, 1:].reshape(-1), reduction="none"
        )
        nll.view(B, -1).mean(1).sum().backward()
    assert cap.packed.shape == (B, adapter.delta.numel())
    assert_close(cap.packed.sum(0), adapter.delta.grad, rtol=1e-4, atol=1e-7, name="sum")
    for b in range(B):
        (g,) = torch.autograd.grad(losses[b], adapter.delta)
        assert_close(cap.packed[b], g, rtol=1e-3, atol=1e-7, name=f"segment {b}")
    name = adapter.names[3]
    assert cap[name].shape == (B, adapter.modules[name].rank)
    assert adapter._store.capture is None


def test_dtype_moves_keep_float32_state(tiny):
    model, _ = tiny
    adapter = vhack.wrap(model)
    _randomize_delta(adapter)
    before = adapter.delta.detach().clone()
    model.to(torch.bfloat16)
    lin = next(iter(adapter.modules.values()))
    assert lin.U.dtype == torch.bfloat16 and lin.S.dtype == torch.float32
    assert adapter.delta.dtype == torch.float32 and torch.equal(adapter.delta.detach(), before)
    out = model(input_ids=IDS).logits
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


# ---- bad input: a clear error, and nothing changed -------------------------------------------------


def _snapshot(model):
    return (
        {n: type(m) for n, m in model.named_modules()},
        {n: p.requires_grad for n, p in model.named_parameters()},
    )


def test_targets_matching_nothing(tiny):
    model, _ = tiny
    snap = _snapshot(model)
    with pytest.raises(ValueError, match=r"matched no module.*q_proj"):
        vhack.wrap(model, targets=["attention.query"])
    with pytest.raises(ValueError, match=r"\['nope'\] matched no module"):
        vhack.wrap(model, targets=["q_proj", "nope"])
    assert _snapshot(model) == snap


def test_target_that_is_not_linear(tiny):
    model, _ = tiny
    snap = _snapshot(model)
    with pytest.raises(TypeError, match="Qwen3MLP, not an nn.Linear"):
        vhack.wrap(model, targets=["mlp"])
    with pytest.raises(TypeError, match="targets must be"):
        vhack.wrap(model, targets=[3])
    assert _snapshot(model) == snap


def test_wrapping_twice(tiny):
    model, _ = tiny
    vhack.wrap(model)
    with pytest.raises(ValueError, match="already wrapped"):
        vhack.wrap(model)


def test_unsupported_dtype_leaves_model_untouched(tiny):
    model, _ = tiny
    layer = model.model.layers[1].mlp.up_proj
    layer.weight = nn.Parameter(layer.weight.detach().to(torch.int8), requires_grad=False)
    snap = _snapshot(model)
    with pytest.raises(TypeError, match=r"up_proj: weight dtype torch.int8 is not supported"):
        vhack.wrap(model)
    assert _snapshot(model) == snap


def test_load_state_dict_rejects_mismatch_without_writing(tiny):
    model, _ = tiny
    adapter = vhack.wrap(model)
    _randomize_delta(adapter)
    before = adapter.delta.detach().clone()
    sd = adapter.state_dict()
    missing = dict(sd)
    missing.pop(adapter.names[0])
    with pytest.raises(ValueError, match="missing"):
        adapter.load_state_dict(missing)
    with pytest.raises(ValueError, match="unexpected.*extra"):
        adapter.load_state_dict({**sd, "extra": torch.zeros(3)})
    bad = {
        n: torch.zeros(t.numel() + (1 if i == len(sd) - 1 else 0))
        for i, (n, t) in enumerate(sd.items())
    }
    with pytest.raises(ValueError, match="wrong dS shapes"):
        adapter.load_state_dict(bad)
    assert torch.equal(adapter.delta.detach(), before)


def test_segment_grads_bad_ids(tiny):
    model, _ = tiny
    adapter = vhack.wrap(model)
    with pytest.raises(TypeError, match="int64"), adapter.segment_grads(torch.zeros(3)):
        pass


def test_segment_grads_backward_after_the_block(tiny):
    model, _ = tiny
    adapter = vhack.wrap(model)
    seg = torch.arange(2).repeat_interleave(IDS.shape[1])
    with adapter.segment_grads(seg) as cap:
        loss = model(input_ids=IDS, labels=IDS).loss
    assert cap.packed.abs().sum() == 0  # nothing before the backward
    loss.backward()
    assert cap.packed.abs().sum() > 0
    assert_close(cap.packed.sum(0), adapter.delta.grad, rtol=1e-4, atol=1e-7, name="sum")
    adapter.delta.grad = None
    model(input_ids=IDS, labels=IDS).loss.backward()  # outside: a plain backward again
    assert adapter.delta.grad.abs().sum() > 0


def test_base_bypasses_delta_and_merged_state_dict_is_the_dense_model(tiny):
    """adapter.base() runs the base model whatever dS holds (the KL reference), nests with
    merged(); merged_state_dict() equals merge() then state_dict(), without changing the model."""
    model, tok = tiny
    ids = tok(["TASK: reverse abc ->"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        want = model(ids).logits.clone()
    adapter = vhack.wrap(model, progress=False)
    with torch.no_grad():
        adapter.delta.normal_(generator=torch.Generator().manual_seed(0)).mul_(0.05)
    adapter.invalidate()
    with torch.no_grad():
        moved = model(ids).logits
        with adapter.base():
            base = model(ids).logits
        with adapter.merged(), adapter.base():
            nested = model(ids).logits
        with adapter.merged():
            with adapter.base():
                pass
            merged = model(ids).logits
    assert not torch.allclose(moved, want, atol=1e-4)
    assert torch.equal(base, want) and torch.equal(nested, want)
    assert_close(merged, moved, rtol=1e-4, atol=1e-4)  # the outer block's weights came back
    dense = adapter.merged_state_dict()
    delta = adapter.delta.detach().clone()
    adapter.merge()
    expected = model.state_dict()
    assert list(dense) == list(expected)
    for name, tensor in expected.items():
        assert_close(dense[name], tensor, rtol=1e-5, atol=1e-6, name=name)
    assert delta.abs().sum() > 0
