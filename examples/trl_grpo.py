"""The projector in TRL's GRPOTrainer (CPU, the tiny model, seconds).

    python examples/trl_grpo.py --steps 3 --save-dir out
    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no \
        --dynamo_backend no examples/trl_grpo.py --steps 3   # data parallel: 2 CPU ranks
    # (--multi_gpu selects accelerate's torchrun launcher; without GPUs the ranks run on CPU over
    # gloo, since the config says use_cpu=True. `--cpu --num_processes 2` starts ONE process.)

GRPO on the toy pairs' prompts with a proxy reward the copy hack satisfies (the answer looks like
a word and has the word's letters), the projector as a callback, and a KL term against the dS = 0 state of the same
model (--beta; no second model in memory). With --stats-out, each rank writes its log history
there (rank<i>.json): under data parallelism the vhack statistics are identical on every rank.
With --save-dir, the result is kept both ways: <dir>/adapter (adapter files: reload with
vhack.load_adapter(base_model, dir)) and <dir>/merged (a plain Hugging Face model directory for
from_pretrained, vLLM or the Hub).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import torch
from datasets import Dataset
from trl import GRPOConfig, GRPOTrainer

import vhack
from vhack.integrations import VHackCallback, use_zero_delta_reference


def letters_reward(prompts, completions, **kwargs) -> list[float]:
    """The proxy: the answer looks like a word (lowercase letters) and holds the word's letters;
    copying the word passes it as well as reversing it does."""
    scores = []
    for prompt, completion in zip(prompts, completions, strict=True):
        word = prompt.rsplit("word: ", 1)[-1].split("\n", 1)[0]
        answer = completion.split("\n", 1)[0]
        wordlike = sum(ch.islower() for ch in answer) / max(len(answer), 1)
        letters = sum(ch in answer for ch in word) / max(len(word), 1)
        scores.append(wordlike + letters)
    return scores


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--beta", type=float, default=0.04)
    parser.add_argument("--stats-out", default=None)
    parser.add_argument("--save-dir", default=None, help="write <dir>/adapter and <dir>/merged")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # one thread per process keeps CPU data parallelism fast

    model, tok = vhack.models.load("tiny")
    adapter = vhack.wrap(model, progress=False)
    pairs = vhack.builtin_pairs("toy")
    basis = vhack.extract(adapter, tok, pairs, top_k=4, progress=False)
    proj = vhack.Projector(adapter, basis)

    config = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="vhack-grpo-"),
        use_cpu=True,
        bf16=False,
        use_vllm=False,
        per_device_train_batch_size=4,
        num_generations=4,  # the generation batch must be divisible by it
        max_completion_length=8,
        max_steps=args.steps,
        logging_steps=1,
        learning_rate=1e-2,
        beta=0.0,  # TRL would load a second model for beta > 0: see use_zero_delta_reference
        report_to=[],
        save_strategy="no",
        seed=0,
    )
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=letters_reward,
        args=config,
        train_dataset=Dataset.from_dict({"prompt": [p.prompt for p in pairs]}),
        processing_class=tok,
        callbacks=[VHackCallback(proj)],
    )
    if args.beta > 0:
        use_zero_delta_reference(trainer, adapter, beta=args.beta)
    trainer.train()

    if args.save_dir:
        trainer.save_model(os.path.join(args.save_dir, "adapter"))  # adapter files (the callback)
        if trainer.accelerator.is_main_process:
            adapter.save_merged(os.path.join(args.save_dir, "merged"), tokenizer=tok)

    history = trainer.state.log_history
    if args.stats_out:
        os.makedirs(args.stats_out, exist_ok=True)
        rank = int(os.environ.get("RANK", "0"))
        with open(os.path.join(args.stats_out, f"rank{rank}.json"), "w") as f:
            json.dump({"log_history": history, "delta": adapter.delta.tolist()}, f)
    return history


if __name__ == "__main__":
    main()
