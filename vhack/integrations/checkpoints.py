"""Trainer checkpoints of a wrapped model hold the adapter files, not the base model.

The Trainer saves `model.save_pretrained(...)`: for a wrapped model that is every base weight
under vhack's internal names (`*.base_weight`, `*.vhack_store.delta`), which `from_pretrained`
cannot read back, and the full base model in every checkpoint for a few MB of dS.
`install_adapter_checkpoints(trainer, adapter)` (called by `VHackCallback`) replaces, on that
trainer instance only:

- `_save` (what `save_model`, every checkpoint and `push_to_hub` use): writes
  `adapter.save_pretrained(dir)` (adapter_config.json + adapter_model.safetensors), the
  tokenizer / processing class and training_args.bin, as the Trainer would, but no model weights;
- `_load_from_checkpoint` (`train(resume_from_checkpoint=...)`) and `_load_best_model`
  (`load_best_model_at_end`): a directory with vhack adapter files loads dS into the adapter
  (fingerprint-checked); any other checkpoint goes to the Trainer's own code.

The optimizer, scheduler, RNG and trainer state files are the Trainer's own, so resuming
continues exactly as before.
"""

from __future__ import annotations

import os

import torch

import vhack
from vhack.adapter_files import is_adapter_dir

__all__ = ["install_adapter_checkpoints"]

TRAINING_ARGS_NAME = "training_args.bin"  # transformers.trainer.TRAINING_ARGS_NAME
_MARK = "_vhack_adapter_checkpoints"


def install_adapter_checkpoints(trainer, adapter: vhack.Adapter) -> None:
    """Make `trainer` save and resume the adapter files of `adapter` (see the module docstring).
    Idempotent; stays installed after training, so a later `trainer.save_model()` writes adapter
    files too."""
    if getattr(trainer, _MARK, None) is adapter:
        return
    original_load = type(trainer)._load_from_checkpoint
    original_best = type(trainer)._load_best_model

    def _save(output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir if output_dir is not None else trainer.args.output_dir
        if not trainer.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        adapter.save_pretrained(output_dir)
        tokenizer = trainer.processing_class
        if tokenizer is None:
            tokenizer = getattr(trainer.data_collator, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.save_pretrained(output_dir)
        torch.save(trainer.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _load_from_checkpoint(resume_from_checkpoint: str, model=None) -> None:
        if is_adapter_dir(resume_from_checkpoint):
            adapter.load_pretrained(resume_from_checkpoint)
        else:
            original_load(trainer, resume_from_checkpoint, model)

    def _load_best_model() -> None:
        best = trainer.state.best_model_checkpoint
        if best is not None and is_adapter_dir(best):
            adapter.load_pretrained(best)
        else:
            original_best(trainer)

    trainer._save = _save
    trainer._load_from_checkpoint = _load_from_checkpoint
    trainer._load_best_model = _load_best_model
    setattr(trainer, _MARK, adapter)
