"""With VHackCallback, Trainer/TRL checkpoints and save_model hold the adapter files (not the base
weights); resume_from_checkpoint continues identically; a TRL run saved both ways (adapter files,
merged directory) reloads in a fresh process with the same logits; PEFT is refused clearly."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip(
    "accelerate", reason="the Trainer needs accelerate (pip install 'vhack-kernels[trl]')"
)

from _integrations import wrapped as _wrapped
from test_integrations_callback import _args, _Tokens
from transformers import Trainer

import vhack
from vhack.errors import UsageError
from vhack.integrations import VHackCallback

ROOT = Path(__file__).resolve().parents[1]
ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors"}


def _trainer(tmp_path, max_steps=4, **args):
    model, adapter, basis = _wrapped()
    trainer = Trainer(
        model=model,
        args=_args(
            tmp_path,
            max_steps=max_steps,
            save_strategy="steps",
            save_steps=2,
            logging_steps=1,
            **args,
        ),
        train_dataset=_Tokens(),
        processing_class=vhack.models.byte_tokenizer(),
        callbacks=[VHackCallback(vhack.Projector(adapter, basis))],
    )
    return trainer, adapter


def test_checkpoints_and_save_model_hold_the_adapter_files_and_resume_identically(tmp_path):
    trainer, adapter = _trainer(tmp_path / "run")
    trainer.train()
    whole = adapter.delta.detach().clone()
    checkpoint = tmp_path / "run" / "checkpoint-2"
    files = {p.name for p in checkpoint.iterdir()}
    assert files >= ADAPTER_FILES, files
    assert not [f for f in files if f.startswith(("model", "pytorch_model"))], files
    assert "optimizer.pt" in files and "trainer_state.json" in files
    trainer.save_model(tmp_path / "final")
    final = {p.name for p in (tmp_path / "final").iterdir()}
    assert final >= ADAPTER_FILES and "tokenizer.json" in final
    assert not [f for f in final if f.endswith(".safetensors") and f.startswith("model")]

    # the saved adapter reloads onto a fresh base model
    base = vhack.models.tiny_model(seed=0)
    vhack.load_adapter(base, tmp_path / "final")
    x = torch.randint(0, 256, (1, 8))
    torch.testing.assert_close(base(input_ids=x).logits, trainer.model(input_ids=x).logits)

    # resume from step 2 in a new trainer on a fresh wrapped model: the same dS at step 4
    resumed, resumed_adapter = _trainer(tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 4
    torch.testing.assert_close(resumed_adapter.delta.detach(), whole, rtol=0, atol=0)


ROUND_TRIP = """
import json, sys, torch, vhack
from transformers import AutoModelForCausalLM
adapter_dir, merged_dir, x = sys.argv[1], sys.argv[2], torch.tensor(json.loads(sys.argv[3]))
base = vhack.models.tiny_model(seed=0)
vhack.load_adapter(base, adapter_dir)
merged = AutoModelForCausalLM.from_pretrained(merged_dir)
with torch.no_grad():
    out = [base(input_ids=x).logits.tolist(), merged(input_ids=x).logits.tolist()]
print(json.dumps(out))
"""


def test_trl_run_saved_both_ways_reloads_in_a_fresh_process(tmp_path):
    pytest.importorskip("trl", reason="TRL is not installed (pip install 'vhack-kernels[trl]')")
    from test_integrations_trl import _grpo

    model, adapter, basis = _wrapped()
    callbacks = [VHackCallback(vhack.Projector(adapter, basis))]
    trainer = _grpo(
        tmp_path / "run", model, callbacks, max_steps=2, save_strategy="steps", save_steps=2
    )
    trainer.train()
    assert adapter.delta.abs().max() > 1e-3  # it trained
    checkpoint = tmp_path / "run" / "checkpoint-2"  # TRL's own checkpoint holds the adapter files
    assert {p.name for p in checkpoint.iterdir()} >= ADAPTER_FILES
    assert not list(checkpoint.glob("model*.safetensors"))
    trainer.save_model(str(tmp_path / "adapter"))
    assert {p.name for p in (tmp_path / "adapter").iterdir()} >= ADAPTER_FILES
    adapter.save_merged(tmp_path / "merged", tokenizer=trainer.processing_class)
    x = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = model(input_ids=x).logits
    proc = subprocess.run(
        [sys.executable, "-c", ROUND_TRIP, str(checkpoint), str(tmp_path / "merged"),
         json.dumps(x.tolist())],
        cwd=ROOT, capture_output=True, text=True, timeout=180,
        env={**__import__("os").environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    from_adapter, from_merged = (torch.tensor(t) for t in json.loads(proc.stdout.splitlines()[-1]))
    torch.testing.assert_close(from_adapter, want, rtol=0, atol=1e-5)
    torch.testing.assert_close(from_merged, want, rtol=0, atol=1e-5)


# ---- PEFT ---------------------------------------------------------------------------------------


class _LoraLinear(torch.nn.Module):
    """Stands in for a PEFT LoRA layer: the check looks at the defining package, as for peft's."""

    __module__ = "peft.tuners.lora.layer"

    def __init__(self, base: torch.nn.Linear) -> None:
        super().__init__()
        self.base_layer = base
        self.lora_A = torch.nn.Linear(base.in_features, 2, bias=False)

    def forward(self, x):
        return self.base_layer(x)


def test_vhack_on_a_peft_model_is_refused_clearly():
    model = vhack.models.tiny_model()
    attn = model.model.layers[0].self_attn
    attn.q_proj = _LoraLinear(attn.q_proj)
    with pytest.raises(ValueError, match="is a PEFT model .* does not combine with PEFT"):
        vhack.wrap(model, progress=False)


def test_peft_on_a_vhack_model_is_refused_by_the_callback(tmp_path):
    model, adapter, basis = _wrapped()
    model.lm_head = _LoraLinear(model.lm_head)  # LoRA on a module vhack did not wrap
    with pytest.raises(UsageError, match="PEFT on a vhack-wrapped model is not supported"):
        Trainer(
            model=model,
            args=_args(tmp_path),
            train_dataset=_Tokens(),
            callbacks=[VHackCallback(vhack.Projector(adapter, basis))],
        )


def test_with_the_real_peft_library(tmp_path):
    import peft  # a dev dependency: the README's test command installs it

    lora = peft.get_peft_model(
        vhack.models.tiny_model(), peft.LoraConfig(target_modules=["q_proj"])
    )
    with pytest.raises(ValueError, match="is a PEFT model"):
        vhack.wrap(lora, progress=False)
    model, adapter, basis = _wrapped()
    on_vhack = peft.get_peft_model(model, peft.LoraConfig(target_modules=["lm_head"]))
    with pytest.raises(UsageError, match="PEFT on a vhack-wrapped model is not supported"):
        Trainer(
            model=on_vhack,
            args=_args(tmp_path),
            train_dataset=_Tokens(),
            callbacks=[VHackCallback(vhack.Projector(adapter, basis))],
        )
