"""The projector in a Hugging Face Trainer: one callback (CPU, the tiny model, seconds).

    python examples/hf_trainer.py --steps 4

Causal-LM fine-tuning of dS on the toy pairs' hack completions; `vhack/cin_mean`, `vhack/fired`
and `vhack/energy_removed` appear in the Trainer's logs (console, report_to, log_history). With
--output-dir, the trained adapter is saved there at the end (`trainer.save_model`: with the callback,
adapter_config.json + adapter_model.safetensors; reload with vhack.load_adapter(base_model, dir)).
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from transformers import Trainer, TrainingArguments

import vhack
from vhack.integrations import VHackCallback


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--output-dir", default=None)
    args = parser.parse_args(argv)

    model, tok = vhack.models.load("tiny")
    adapter = vhack.wrap(model, progress=False)
    pairs = vhack.builtin_pairs("toy")
    basis = vhack.extract(adapter, tok, pairs, top_k=4, progress=False)
    proj = vhack.Projector(adapter, basis)

    rows = []
    for p in pairs:
        ids = torch.tensor(tok(p.prompt + p.hack)["input_ids"])
        rows.append({"input_ids": ids, "labels": ids})

    def collate(batch):
        width = max(len(r["input_ids"]) for r in batch)
        ids = torch.full((len(batch), width), tok.pad_token_id)
        for i, r in enumerate(batch):
            ids[i, : len(r["input_ids"])] = r["input_ids"]
        return {"input_ids": ids, "labels": ids.masked_fill(ids == tok.pad_token_id, -100)}

    training_args = TrainingArguments(
        output_dir=args.output_dir or tempfile.mkdtemp(prefix="vhack-trainer-"),
        per_device_train_batch_size=4,
        max_steps=args.steps,
        logging_steps=1,
        learning_rate=1e-2,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
    )
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=rows,
        data_collator=collate,
        callbacks=[VHackCallback(proj)],  # projects after the Trainer's clipping, every step
    )
    trainer.train()
    if args.output_dir:
        trainer.save_model(args.output_dir)  # the adapter files, not the base model
    return trainer.state.log_history


if __name__ == "__main__":
    main()
