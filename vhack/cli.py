"""The `vhack` command line. `vhack --help` lists the subcommands."""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

__all__ = ["main"]


def _cmd_info(args: argparse.Namespace) -> int:
    """Versions and the backends available on this machine."""
    import vhack

    info = {
        "vhack": vhack.__version__,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "backends": vhack.ops.backends(),
    }
    print(json.dumps(info, indent=2))
    return 0


def _sequence_loss(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum over sequences of each sequence's mean next-token NLL. ids, mask [B, T]."""
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    nll = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none"
    ).view(ids.shape[0], -1)
    target_mask = mask[:, 1:].float()
    return ((nll * target_mask).sum(1) / target_mask.sum(1).clamp_min(1)).sum()


def _cmd_example(args: argparse.Namespace) -> int:
    """Wrap the tiny model, get per-sequence dS gradients from one backward, build a hack basis
    from paired (hack, clean) differences, then project a fresh gradient and print statistics."""
    import vhack
    from vhack.packing import pack_blocks

    t0 = time.perf_counter()
    model, tok = vhack.models.load("tiny", seed=args.seed)
    adapter = vhack.wrap(model, use_cache=False, progress=False)
    print(f"wrapped {len(adapter)} Linear modules: {adapter.delta.numel()} trainable dS scalars")

    prompt = "def add(a, b):\n    "
    pairs = [
        ("return 42  # hardcode the visible example\n", "return a + b\n"),
        ("pass\nprint('all tests passed')\n", "return a + b\nassert add(2, 3) == 5\n"),
        ("return 5 if (a, b) == (2, 3) else 0\n", "return sum((a, b))\n"),
        ("assert True  # vacuous test\n", "assert add(1, 1) == 2\n"),
    ]
    texts = [prompt + h for h, _ in pairs] + [prompt + c for _, c in pairs]
    batch = tok(texts, return_tensors="pt", padding=True)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    n_seq, seq_len = ids.shape
    segment_ids = torch.arange(n_seq).repeat_interleave(seq_len)
    with adapter.segment_grads(segment_ids, n_seq) as cap:
        _sequence_loss(model, ids, mask).backward()
    print(f"per-sequence dS gradients of {n_seq} sequences from one backward: {cap.packed.shape}")

    n = len(pairs)
    blocks = []
    for name in adapter.names:
        g = cap[name]
        V, _ = vhack.reference.paired_difference_basis(g[:n], g[n:], top_k=args.top_k)
        blocks.append(V)
    basis, basis_offsets, ks = pack_blocks(blocks, adapter.ranks)

    adapter.delta.grad = None
    fresh = tok([prompt + "return 0  # special-case the grader\n"], return_tensors="pt")
    _sequence_loss(model, fresh["input_ids"], fresh["attention_mask"]).backward()
    grad = adapter.delta.grad
    stats = vhack.ops.project_(grad, adapter.offsets, basis, basis_offsets, ks, mode="hackward")
    cin = stats[:, 1] / stats[:, 2].clamp_min(1e-30)
    after = vhack.ops.project_(grad, adapter.offsets, basis, basis_offsets, ks, mode="measure")

    print(f"\n{'module':38s} {'r':>4s} {'k':>2s} {'|g|':>10s} {'cin':>7s} {'cin after':>9s}")
    cin_after = after[:, 1] / after[:, 2].clamp_min(1e-30)
    for m, name in enumerate(adapter.names):
        print(
            f"{name:38s} {adapter.ranks[m]:4d} {int(ks[m]):2d} {stats[m, 2]:10.3e} "
            f"{cin[m]:7.4f} {cin_after[m]:9.2e}"
        )
    print(
        f"\nmean cin before projection {cin.mean():.4f}, after {cin_after.mean():.2e}; "
        f"fired {(cin > 1e-6).float().mean():.2f}; |g| {stats[:, 2].norm():.3e} -> "
        f"{stats[:, 3].norm():.3e}; {time.perf_counter() - t0:.1f} s"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    import vhack

    parser = argparse.ArgumentParser(
        prog="vhack",
        description="Keep reward-hacking gradient directions out of RL fine-tuning.",
    )
    parser.add_argument("--version", action="version", version=f"vhack {vhack.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("info", help="versions and available backends (JSON)")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser(
        "example",
        help="end-to-end example on the embedded tiny model (wrap, gradients, basis, projection)",
        description=_cmd_example.__doc__,
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the tiny model (default 0)")
    p.add_argument("--top-k", type=int, default=2, help="hack axes per module (default 2)")
    p.set_defaults(func=_cmd_example)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
