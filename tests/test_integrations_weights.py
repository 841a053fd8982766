"""Merged dense weights under the base model's names (and TRL's vLLM sync sending them, with a
stand-in for the vLLM client), and the dS = 0 reference."""

from __future__ import annotations

import copy

import pytest
import torch
from _integrations import wrapped as _wrapped

import vhack
from vhack.integrations import (
    ZeroDeltaReference,
    merged_named_parameters,
    merged_state_dict,
    patch_vllm_sync,
)


def _trained(seed: int = 0):
    model, adapter, _ = _wrapped(seed)
    with torch.no_grad():
        adapter.delta.normal_(0, 0.1, generator=torch.Generator().manual_seed(9))
    _, dense_adapter = copy.deepcopy((model, adapter))
    dense = dense_adapter.merge()  # a plain dense model with W_eff written into its Linears
    return model, adapter, dense


def test_merged_weights_equal_the_dense_model_under_its_names():
    _, adapter, dense = _trained()
    expected = dense.state_dict()
    got = merged_state_dict(adapter)
    assert list(got) == list(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, rtol=1e-6, atol=1e-6, msg=name)
    named = list(merged_named_parameters(adapter))
    assert [n for n, _ in named] == [n for n, _ in dense.named_parameters()]


@pytest.mark.parametrize("mode", ["server", "colocate"])
def test_vllm_weight_sync_sends_the_merged_dense_weights(mode):
    pytest.importorskip("trl", reason="TRL is not installed (pip install 'vhack-kernels[trl]')")
    from types import SimpleNamespace

    from accelerate import Accelerator
    from trl.generation.vllm_generation import VLLMGeneration

    class Engine:  # stands in for vLLM: the server's client, or the colocated LLM's model
        def __init__(self) -> None:
            self.received, self.metadata, self.resets = {}, None, 0

        def update_named_params(self, metadata, params):  # VLLMClient (server mode)
            self.metadata = [m[0] for m in metadata]
            self.load_weights(params)

        def load_weights(self, params):  # the vLLM model's load_weights (colocate mode)
            for name, tensor in params:
                self.received[name] = tensor.clone()

        def reset_prefix_cache(self):
            self.resets += 1

    class Generation(VLLMGeneration):
        def _init_vllm(self):  # no vLLM here: the stand-in takes its place
            self.engine = Engine()
            self.vllm_client = self.engine
            runner = SimpleNamespace(model_runner=SimpleNamespace(model=self.engine))
            self.llm = SimpleNamespace(
                llm_engine=SimpleNamespace(model_executor=SimpleNamespace(driver_worker=runner)),
                reset_prefix_cache=self.engine.reset_prefix_cache,
            )

    model, adapter, dense = _trained()
    generation = Generation(model, Accelerator(cpu=True), vhack.models.byte_tokenizer(), mode)
    patch_vllm_sync(generation, adapter)
    generation.sync_weights()  # TRL's own sync code
    engine = generation.engine
    expected = dict(dense.named_parameters())
    assert list(engine.received) == list(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(engine.received[name], tensor.detach(), msg=name)
    assert engine.resets == 1
    if mode == "server":
        assert engine.metadata == list(expected)

    with pytest.raises(ValueError, match="does not drive the wrapped model"):
        patch_vllm_sync(generation, _wrapped(1)[1])


def test_zero_delta_reference_is_the_base_model():
    model, adapter, _ = _trained()
    base = vhack.models.tiny_model(seed=0)
    reference = ZeroDeltaReference(adapter)
    x = torch.randint(0, 256, (2, 9))
    want = base(input_ids=x).logits
    assert (model(input_ids=x).logits - want).abs().max() > 1e-3  # dS != 0 changes the model
    torch.testing.assert_close(reference(input_ids=x).logits, want, rtol=0, atol=1e-6)
    assert list(reference.parameters()) == []
    reference.eval()
    model.train()
    assert model.training  # the reference never touches the policy's mode


def test_vllm_sync_patch_refuses_a_trl_whose_sync_it_cannot_replace():
    from vhack.errors import UsageError

    model, adapter, _ = _trained()

    class Trl10Generation:  # TRL 1.0 to 1.10: sync_weights walks model.named_parameters() inline
        def __init__(self, model) -> None:
            self.model = model

        def sync_weights(self):
            for _name, _param in self.model.named_parameters():
                pass

    with pytest.raises(UsageError, match=r"no _iter_named_params.*TRL >=1.11"):
        patch_vllm_sync(Trl10Generation(model), adapter)

    class Bypassing(Trl10Generation):  # the method exists, but the sync does not read it
        def _iter_named_params(self):
            yield from self.model.named_parameters()

    with pytest.raises(UsageError, match=r"does not read _iter_named_params"):
        patch_vllm_sync(Bypassing(model), adapter)

    class SharedWeights(Bypassing):  # a colocate mode where vLLM reads the model's own weights
        share_weights = True

        def sync_weights(self):
            return list(self._iter_named_params())

    with pytest.raises(UsageError, match=r"share_weights=True"):
        patch_vllm_sync(SharedWeights(model), adapter)
    generation = SharedWeights(model)
    generation.share_weights = False
    patch_vllm_sync(generation, adapter)  # supported: the sync reads the patched iterator
    names = [n for n, _ in generation.sync_weights()]
    assert names == [n for n, _ in vhack.models.tiny_model().named_parameters()]
