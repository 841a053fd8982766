"""`vhack extract`: a hack basis from contrastive pairs, saved as a file.

It records in the basis metadata how it was made: "pairs" (the shipped set's name, or the pair
file's absolute path), "model_arg" (--model) and "model_seed" (--seed), so that `vhack validate`
finds the basis's own pairs and can name the flag that fixes a model mismatch.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field

from vhack.cli import _common as common
from vhack.cli._options import FRACTION, NONNEGATIVE_INT, POSITIVE_INT, add_options
from vhack.extract_config import ExtractConfig

HELP = "extract a hack basis from contrastive pairs (safetensors, schema v2)"

# checked argparse types of the extraction options (shared with `vhack validate`)
EXTRACT_TYPES = {
    "top_k": POSITIVE_INT,
    "tau_axis": FRACTION,
    "n_heldout": NONNEGATIVE_INT,
    "batch_size": POSITIVE_INT,
}


@dataclass
class ExtractOutput:
    out: str | None = field(
        default=None,
        metadata={
            "help": "output file (default: the load_or_extract cache path of this model, pair "
            "set and --top-k)"
        },
    )


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_options(p, common.ModelOptions, types={"seed": NONNEGATIVE_INT})
    add_options(p, ExtractConfig, types=EXTRACT_TYPES)
    add_options(p, ExtractOutput)


def run(args: argparse.Namespace) -> int:
    """Extract a hack basis from contrastive pairs and save it (safetensors, schema v2)."""
    import vhack
    from vhack.cache import cache_dir
    from vhack.extract import basis_cache_path, choose_method

    t0 = time.perf_counter()
    if args.out is not None:
        common.check_writable(args.out, "--out", directory=False)
    else:
        common.check_writable(
            cache_dir() / "bases", "--out (default: the vhack cache)", directory=True
        )
    device = common.check_device(args.device)
    pairs = common.read_pairs(args.pairs)
    common.check_pairs(pairs, 1, args.tau_axis, args.n_heldout)
    train = pairs[: len(pairs) - args.n_heldout]
    top_k = common.choose_top_k(args.top_k, len(train))
    _, tok, adapter = common.load_wrapped(args, device)
    method = choose_method(adapter, tok, train, args.method)
    basis = vhack.extract(
        adapter,
        tok,
        pairs,
        top_k,
        args.tau_axis,
        args.n_heldout,
        method=method,
        batch_size=args.batch_size,
        progress=not args.quiet,
    )
    basis.metadata.update(
        pairs=common.pairs_origin(args.pairs), model_arg=args.model, model_seed=str(args.seed)
    )
    out = args.out or basis_cache_path(adapter, pairs, top_k, args.tau_axis, args.n_heldout)
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
