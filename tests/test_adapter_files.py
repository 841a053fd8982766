"""Keeping a trained adapter: adapter files (save_pretrained / vhack.load_adapter, fingerprint
checked), the merged export (save_merged -> from_pretrained), and base weights loaded into a wrapped
model after wrapping (load_state_dict, .data, copy_) recompute the SVD factors."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch

import vhack

X = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(3))


def _trained(seed: int = 0, dtype: torch.dtype = torch.float32):
    """(wrapped tiny model with a random nonzero dS, its adapter)."""
    model = vhack.models.tiny_model(seed=seed, dtype=dtype)
    adapter = vhack.wrap(model, progress=False, use_cache=False)
    with torch.no_grad():
        adapter.delta.normal_(0, 0.1, generator=torch.Generator().manual_seed(11))
    return model, adapter


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=X).logits


# ---- adapter files -------------------------------------------------------------------------


def test_save_pretrained_writes_only_dS_and_load_adapter_gives_the_same_logits(tmp_path):
    model, adapter = _trained()
    want = _logits(model)
    adapter.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["format"] == "vhack-adapter" and config["vhack_version"] == vhack.__version__
    assert config["targets"] == adapter.names and config["dtype"] == "float32"
    assert config["ranks"] == dict(zip(adapter.names, adapter.ranks, strict=True))
    assert "structure" in config["fingerprint"]
    tensors = safetensors.torch.load_file(str(tmp_path / "adapter_model.safetensors"))
    assert list(tensors) == adapter.names or sorted(tensors) == sorted(adapter.names)
    assert sum(t.numel() for t in tensors.values()) == adapter.delta.numel()  # no base weights

    base = vhack.models.tiny_model(seed=0)
    assert (_logits(base) - want).abs().max() > 1e-3  # dS matters
    loaded = vhack.load_adapter(base, tmp_path)
    assert isinstance(loaded, vhack.Adapter) and loaded.names == adapter.names
    torch.testing.assert_close(_logits(base), want, rtol=0, atol=1e-6)
    assert torch.equal(loaded.delta, adapter.delta)


def test_a_base_model_with_another_fingerprint_is_refused(tmp_path):
    _, adapter = _trained(seed=0)
    adapter.save_pretrained(tmp_path)
    other = vhack.models.tiny_model(seed=1)  # same architecture, other weights
    with pytest.raises(ValueError, match="trained on another base model") as err:
        vhack.load_adapter(other, tmp_path)
    assert "\n" not in str(err.value)
    assert not any(isinstance(m, vhack.SVDLinear) for m in other.modules())  # left unwrapped
    with pytest.warns(UserWarning, match="loaded anyway"):
        loaded = vhack.load_adapter(other, tmp_path, strict=False)
    assert torch.equal(loaded.delta, adapter.delta)


def test_load_pretrained_into_an_existing_adapter_and_bad_directories(tmp_path):
    from vhack.adapter_files import AdapterFileError

    model, adapter = _trained()
    adapter.save_pretrained(tmp_path / "a")
    fresh = vhack.wrap(vhack.models.tiny_model(seed=0), progress=False, use_cache=False)
    fresh.load_pretrained(tmp_path / "a")
    torch.testing.assert_close(_logits(fresh.model), _logits(model), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="already wrapped"):
        vhack.load_adapter(fresh.model, tmp_path / "a")
    other_targets = vhack.wrap(vhack.models.tiny_model(seed=0), ["q_proj"], progress=False)
    with pytest.raises(ValueError, match="other target modules"):
        other_targets.load_pretrained(tmp_path / "a")
    with pytest.raises(AdapterFileError, match="no adapter_config.json"):
        vhack.load_adapter(vhack.models.tiny_model(), tmp_path / "missing")
    (tmp_path / "peft").mkdir()
    (tmp_path / "peft" / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    with pytest.raises(AdapterFileError, match="not a vhack adapter"):
        vhack.load_adapter(vhack.models.tiny_model(), tmp_path / "peft")
    (tmp_path / "a" / "adapter_model.safetensors").write_bytes(b"garbage")
    with pytest.raises(AdapterFileError, match="cannot read it"):
        vhack.load_adapter(vhack.models.tiny_model(), tmp_path / "a")


# ---- merged export -------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_merged_is_a_plain_hf_directory_with_the_trained_weights(tmp_path, dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, adapter = _trained(dtype=dtype)
    want = _logits(model)
    adapter.save_merged(tmp_path, tokenizer=vhack.models.byte_tokenizer())
    stored = safetensors.torch.load_file(str(tmp_path / "model.safetensors"))
    assert not [k for k in stored if "base_weight" in k or "vhack" in k]
    assert set(stored) == set(vhack.models.tiny_model().state_dict())
    merged = adapter.merged_state_dict()
    assert all(torch.equal(stored[k], merged[k]) for k in stored)  # bit for bit
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=dtype)
    # bfloat16: the wrapped forward and the dense one round differently (one ulp of the logits)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(_logits(reloaded), want, rtol=0, atol=tol)
    assert AutoTokenizer.from_pretrained(tmp_path)("ab")["input_ids"] == [97, 98]
    assert any(isinstance(m, vhack.SVDLinear) for m in model.modules())  # model unchanged


# ---- base weights loaded after wrapping ---------------------------------------------------------


def _expected_after_loading_seed0(dS: torch.Tensor) -> torch.Tensor:
    """Logits of the seed-0 base model wrapped with dS: what every reload below must give."""
    adapter = vhack.wrap(vhack.models.tiny_model(seed=0), progress=False, use_cache=False)
    with torch.no_grad():
        adapter.delta.copy_(dS)
    return _logits(adapter.model)


def test_load_state_dict_of_a_wrapped_checkpoint_recomputes_the_factors():
    """The issue's scenario: a checkpoint with vhack names loaded into a model wrapped while its
    weights were still random (from_pretrained left them so): the factors follow the weights."""
    model, _ = _trained(seed=0)
    checkpoint = model.state_dict()  # *.base_weight, *.vhack_store.delta, the rest
    want = _logits(model)
    random_init = vhack.models.tiny_model(seed=1)
    vhack.wrap(random_init, progress=False, use_cache=False)
    result = random_init.load_state_dict(checkpoint)
    assert not result.missing_keys and not result.unexpected_keys  # "All keys matched"
    torch.testing.assert_close(_logits(random_init), want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("assign", [False, True])
def test_load_state_dict_of_a_plain_checkpoint_recomputes_the_factors(assign):
    base_sd = vhack.models.tiny_model(seed=0).state_dict()  # base names: *.weight
    model, adapter = _trained(seed=1)
    want = _expected_after_loading_seed0(adapter.delta.detach())
    result = model.load_state_dict(base_sd, strict=False, assign=assign)
    assert not result.unexpected_keys, result.unexpected_keys
    assert [k.split(".")[-1] for k in result.missing_keys] == ["delta"]  # dS kept
    torch.testing.assert_close(_logits(model), want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("how", ["copy_", "data", "data_alias"])
def test_writing_a_base_weight_in_place_recomputes_its_factors(how):
    base = vhack.models.tiny_model(seed=0)
    model, adapter = _trained(seed=1)
    # expected: the seed-1 model with seed-0 target weights, wrapped afterwards, same dS
    expected = vhack.models.tiny_model(seed=1)
    with torch.no_grad():
        for name in adapter.names:
            expected.get_submodule(name).weight.copy_(base.get_submodule(name).weight)
    expected_adapter = vhack.wrap(expected, progress=False, use_cache=False)
    with torch.no_grad():
        expected_adapter.delta.copy_(adapter.delta)
    want = _logits(expected)
    _logits(model)  # the merge cache is warm
    for name, lin in adapter.modules.items():
        weight = base.get_submodule(name).weight.detach()
        if how == "copy_":
            with torch.no_grad():
                lin.base_weight.copy_(weight)
        elif how == "data":
            lin.base_weight.data = weight.clone()
        else:  # a write no counter sees: refresh_factors() by hand, as documented
            lin.base_weight.data.copy_(weight)
            lin.refresh_factors()
    torch.testing.assert_close(_logits(model), want, rtol=0, atol=1e-5)


def test_an_unchanged_reload_keeps_the_factors():
    model, adapter = _trained()
    lin = next(iter(adapter.modules.values()))
    U = lin.U
    model.load_state_dict(model.state_dict())
    assert lin.U is U  # the same values: no new SVD
