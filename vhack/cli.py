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


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _wrapped(args: argparse.Namespace):
    """(model, tokenizer, adapter) for --model/--seed/--device/--dtype."""
    import vhack

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tok = vhack.models.load(args.model, seed=args.seed, dtype=DTYPES.get(args.dtype))
    model = model.to(device)
    return model, tok, vhack.wrap(model, progress=not args.quiet)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", default="tiny", help="'tiny' (embedded, offline), a hub name, or a local path"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the tiny model (default 0)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="model dtype")
    p.add_argument(
        "--pairs", default="coding", help="shipped pair set 'coding' or 'toy', or a JSONL file"
    )
    p.add_argument("--top-k", type=int, default=12, help="axes extracted per module (default 12)")
    p.add_argument("--tau-axis", type=float, default=0.0, help="zero axes with S_i/S_0 < tau")
    p.add_argument("--n-heldout", type=int, default=2, help="last pairs held out (default 2)")
    p.add_argument("--method", choices=("batched", "loop"), default="batched")
    p.add_argument("--batch-size", type=int, default=8, help="completions per backward")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _cmd_extract(args: argparse.Namespace) -> int:
    """Extract a hack basis from contrastive pairs and save it (safetensors, schema v2)."""
    import vhack
    from vhack.extract import basis_cache_path
    from vhack.pairs import resolve_pairs

    t0 = time.perf_counter()
    pairs = resolve_pairs(args.pairs)
    _, tok, adapter = _wrapped(args)
    basis = vhack.extract(
        adapter,
        tok,
        pairs,
        args.top_k,
        args.tau_axis,
        args.n_heldout,
        method=args.method,
        batch_size=args.batch_size,
        progress=not args.quiet,
    )
    out = args.out or basis_cache_path(adapter, pairs, args.top_k, args.tau_axis, args.n_heldout)
    path = basis.save(out)
    top5 = [
        float((basis.sv(n)[:5] ** 2).sum() / (basis.sv(n) ** 2).sum().clamp_min(1e-30))
        for n in basis.names
    ]
    print(
        f"hack basis of {len(basis)} modules (up to {max(basis.k(n) for n in basis.names)} axes, "
        f"{len(pairs) - args.n_heldout} training pairs) written to {path}\n"
        f"mean fraction of D's energy in the top 5 axes: {sum(top5) / len(top5):.3f}; "
        f"{time.perf_counter() - t0:.1f} s"
    )
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    """Run the five validation tests of a hack basis and write a JSON + markdown report and a
    plot."""
    import vhack
    from vhack.pairs import resolve_pairs
    from vhack.validate import load_samples, validate, write_report

    pairs = resolve_pairs(args.pairs)
    _, tok, adapter = _wrapped(args)
    basis = None
    if args.basis:
        basis = vhack.HackBasis.load(
            args.basis, adapter, k=args.k, drop_bottom_frac=args.drop_bottom_frac
        )
    report = validate(
        adapter,
        tok,
        pairs,
        basis,
        k=args.k,
        top_k=args.top_k,
        tau_axis=args.tau_axis,
        n_heldout=args.n_heldout,
        drop_bottom_frac=args.drop_bottom_frac,
        samples=load_samples(args.samples) if args.samples else None,
        n_random=args.n_random,
        n_boot=args.n_boot,
        seed=args.test_seed,
        method=args.method,
        batch_size=args.batch_size,
        progress=not args.quiet,
    )
    paths = write_report(report, args.out_dir)
    print(paths["md"].read_text())
    print("report: " + ", ".join(str(p) for p in paths.values()))
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

    p = sub.add_parser(
        "extract",
        help="extract a hack basis from contrastive pairs (safetensors, schema v2)",
        description=_cmd_extract.__doc__,
    )
    _add_model_args(p)
    p.add_argument(
        "--out", default=None, help="output file (default: the load_or_extract cache path)"
    )
    p.set_defaults(func=_cmd_extract)

    p = sub.add_parser(
        "validate",
        help="the five validation tests of a hack basis: report (JSON, markdown) and plot",
        description=_cmd_validate.__doc__,
    )
    _add_model_args(p)
    p.add_argument(
        "--basis", default=None, help="basis file to test (default: extract one from --pairs)"
    )
    p.add_argument("--k", type=int, default=5, help="axes per module used (default 5)")
    p.add_argument(
        "--drop-bottom-frac", type=float, default=0.0, help="pooled noise floor (e.g. 0.25)"
    )
    p.add_argument(
        "--samples",
        default=None,
        help="JSONL of {prompt, completion, label} for tests 1 and 4 (default: held-out pairs)",
    )
    p.add_argument("--n-random", type=int, default=100, help="random bases of the null (test 3)")
    p.add_argument("--n-boot", type=int, default=20, help="bootstrap resamples (test 5)")
    p.add_argument("--test-seed", type=int, default=0, help="seed of the resampling")
    p.add_argument("--out-dir", default="vhack-validation", help="where the report goes")
    p.set_defaults(func=_cmd_validate)
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
