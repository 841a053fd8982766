"""The projector in a plain PyTorch training loop (CPU, the tiny model, seconds).

    python examples/plain_loop.py --steps 5

Fine-tunes dS toward the toy pairs' hack completions (the worst case: every gradient points
hack-ward) with the projector attached to the optimizer, and prints the statistics of every step.
"""

from __future__ import annotations

import argparse

import torch

import vhack


def main(argv: list[str] | None = None) -> list[dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--mode", default="hackward", choices=["hackward", "both", "measure"])
    args = parser.parse_args(argv)
    torch.manual_seed(0)

    model, tok = vhack.models.load("tiny")
    adapter = vhack.wrap(model, progress=False)
    pairs = vhack.builtin_pairs("toy")
    basis = vhack.extract(adapter, tok, pairs, top_k=4, progress=False)
    proj = vhack.Projector(adapter, basis, mode=args.mode)
    opt = torch.optim.AdamW([adapter.delta], lr=1e-2)
    proj.attach(opt)  # projects delta.grad inside every opt.step()

    texts = [p.prompt + p.hack for p in pairs]
    batch = tok(texts, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    model.train()
    history = []
    for step in range(1, args.steps + 1):
        opt.zero_grad()
        model(**batch, labels=labels).loss.backward()
        # (clip here if you want: attach() projects after anything you do before opt.step())
        opt.step()
        stats = proj.last_stats.as_dict()
        history.append(stats)
        print(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in stats.items()))
    return history


if __name__ == "__main__":
    main()
