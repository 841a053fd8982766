"""The `vhack` command line. `vhack --help` lists the subcommands."""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from vhack.errors import UsageError

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


def _cmd_example(args: argparse.Namespace) -> int:
    """Wrap the tiny model, extract a hack basis from the shipped toy pairs (one backward per
    batch), then fine-tune toward the training pairs' hack completions from the same start three
    times: measuring only, projecting each gradient, and projecting each update. Prints the
    hack-ward fraction of what each step projected (cin) and how far each run moved the model
    toward the hacks, on the pairs the basis came from and on the held-out pairs."""
    import vhack
    from vhack.extract import completion_losses

    t0 = time.perf_counter()
    model, tok = vhack.models.load("tiny", seed=args.seed)
    adapter = vhack.wrap(model, use_cache=False, progress=False)
    print(f"wrapped {len(adapter)} Linear modules: {adapter.delta.numel()} trainable dS scalars")

    pairs = vhack.builtin_pairs(args.pairs)
    train, held = pairs[: -args.n_heldout], pairs[-args.n_heldout :]
    basis = vhack.extract(
        adapter, tok, pairs, top_k=args.top_k, n_heldout=args.n_heldout, progress=False
    )
    print(
        f"hack basis from {len(train)} {args.pairs!r} pairs: {len(basis.names)} modules, "
        f"{args.k} of up to {args.top_k} axes per module used; {len(held)} pairs held out"
    )

    def hack_margin(subset) -> float:
        """Mean NLL(clean) - NLL(hack) over pairs: it grows as the model moves toward hacks."""
        items = [(p.prompt, p.hack) for p in subset] + [(p.prompt, p.clean) for p in subset]
        with torch.no_grad():
            nll = completion_losses(model, tok, items)
        return (nll[len(subset) :] - nll[: len(subset)]).mean().item()

    start = (hack_margin(train), hack_margin(held))
    hack_items = [(p.prompt, p.hack) for p in train]
    arms = (
        ("measure only", "measure", "grad"),
        ("grad projected", "hackward", "grad"),
        ("update projected", "hackward", "update"),
    )
    moved = {}
    for arm, mode, where in arms:
        with torch.no_grad():
            adapter.delta.zero_()
        opt = torch.optim.AdamW([adapter.delta], lr=args.lr, weight_decay=0.0)
        proj = vhack.Projector(adapter, basis, mode=mode, where=where, k=args.k).attach(opt)
        print(f"\n{arm}: {args.steps} AdamW steps on the training pairs' hack completions")
        print(f"{'step':>4s} {'loss':>8s} {'cin':>7s} {'|before|':>10s} {'|after|':>10s}")
        for step in range(args.steps):
            opt.zero_grad()
            loss = completion_losses(model, tok, hack_items).mean()
            loss.backward()
            opt.step()  # the projector runs around the update (before it in grad mode)
            st = proj.last_stats
            # the hack-ward cin in every arm (a measure-mode ProjStats reports |V g| / |g|)
            hackward = vhack.ProjStats(st.names, st.raw, st.projected, one_sided=True)
            norms = st.as_dict()
            print(
                f"{step:4d} {loss.item():8.4f} {hackward.cin_mean:7.4f} "
                f"{norms['norm_before']:10.3e} {norms['norm_after']:10.3e}"
            )
        proj.detach()
        moved[arm] = (hack_margin(train) - start[0], hack_margin(held) - start[1])

    print(
        "\nhow far each run moved the model toward the hacks: change of NLL(clean) - NLL(hack)"
        f"\n{'run':18s} {'basis pairs':>12s} {'held out':>10s}"
    )
    for arm, (on_train, on_held) in moved.items():
        print(f"{arm:18s} {on_train:+12.4f} {on_held:+10.4f}")
    print(
        f"(cin: mean over modules of |relu(V g)| / |g| of what each step projected: the gradient, "
        f"or in update mode the update; {time.perf_counter() - t0:.1f} s)"
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
    p.add_argument(
        "--method",
        choices=("auto", "shared", "batched", "loop"),
        default="auto",
        help="how pair gradients are computed: 'shared' (one row per pair, the prompt once), "
        "'batched' (completions batched), 'loop' (one backward per completion, the reference), "
        "'auto' (shared where supported and cheaper, else batched; default)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="pairs (shared) or completions (batched) per backward (default: as many as fit "
        "in 8192 padded tokens)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _cmd_extract(args: argparse.Namespace) -> int:
    """Extract a hack basis from contrastive pairs and save it (safetensors, schema v2)."""
    import vhack
    from vhack.extract import basis_cache_path, check_extract_args, choose_method
    from vhack.pairs import resolve_pairs

    t0 = time.perf_counter()
    pairs = resolve_pairs(args.pairs)
    _, tok, adapter = _wrapped(args)
    check_extract_args(pairs, args.top_k, args.tau_axis, args.n_heldout)
    train = pairs[: len(pairs) - args.n_heldout]
    method = choose_method(adapter, tok, train, args.method)
    basis = vhack.extract(
        adapter,
        tok,
        pairs,
        args.top_k,
        args.tau_axis,
        args.n_heldout,
        method=method,
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
        f"{len(train)} training pairs, {method} gradients) written to {path}\n"
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
        help="end-to-end example on the embedded tiny model (wrap, extract, project, train)",
        description=_cmd_example.__doc__,
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the tiny model (default 0)")
    p.add_argument("--pairs", default="toy", help="shipped pair set: toy (default) or coding")
    p.add_argument("--top-k", type=int, default=12, help="axes extracted per module (default 12)")
    p.add_argument("--k", type=int, default=5, help="axes per module projected (default 5)")
    p.add_argument("--n-heldout", type=int, default=2, help="held-out pairs (default 2)")
    p.add_argument("--steps", type=int, default=8, help="optimizer steps per run (default 8)")
    p.add_argument("--lr", type=float, default=0.05, help="AdamW learning rate (default 0.05)")
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

    from vhack.grpo.cli import add_demo_parser, add_train_parser

    add_demo_parser(sub)
    add_train_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    try:
        return args.func(args)
    except UsageError as err:
        print(f"vhack {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
