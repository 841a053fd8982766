"""`vhack validate`: the five validation tests of a hack basis, as a report and a plot."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from vhack.cli import _common as common
from vhack.cli._options import BELOW_ONE, NONNEGATIVE_INT, POSITIVE_INT, add_options
from vhack.cli.extract import EXTRACT_TYPES
from vhack.errors import UsageError
from vhack.extract_config import EXTRACT_TOP_K, ExtractConfig

HELP = "the five validation tests of a hack basis: report (JSON, markdown) and plot"


@dataclass
class ValidateOptions:
    basis: str | None = field(
        default=None, metadata={"help": "basis file to test (default: extract one from --pairs)"}
    )
    k: int = field(default=5, metadata={"help": "axes per module used"})
    drop_bottom_frac: float = field(
        default=0.0, metadata={"help": "pooled noise floor (e.g. 0.25)"}
    )
    samples: str | None = field(
        default=None,
        metadata={
            "help": "JSONL of {prompt, completion, label} for tests 1 and 4 (default: held-out "
            "pairs)"
        },
    )
    n_random: int = field(default=100, metadata={"help": "random bases of the null (test 3)"})
    n_boot: int = field(default=20, metadata={"help": "bootstrap resamples (test 5)"})
    test_seed: int = field(default=0, metadata={"help": "seed of the resampling"})
    out_dir: str = field(default="vhack-validation", metadata={"help": "where the report goes"})


# with --basis, these come from the basis file
FROM_BASIS = {
    "pairs": "shipped pair set 'coding' or 'toy', or a JSONL file (default: the basis's own "
    f"when --basis is given, else {ExtractConfig.pairs})",
    "top_k": "axes extracted per module, at most the number of training pairs (default: unused "
    f"with --basis, else as many as the training pairs allow, at most {EXTRACT_TOP_K})",
    "tau_axis": "zero axes with S_i/S_0 < tau (default: unused with --basis, else "
    f"{ExtractConfig.tau_axis:g})",
    "n_heldout": "last pairs held out (default: the basis's own when --basis is given, else "
    f"{ExtractConfig.n_heldout})",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_options(p, common.ModelOptions, types={"seed": NONNEGATIVE_INT})
    add_options(
        p,
        ExtractConfig,
        types=EXTRACT_TYPES,
        defaults=dict.fromkeys(FROM_BASIS),
        helps=FROM_BASIS,
    )
    add_options(
        p,
        ValidateOptions,
        types={
            "k": POSITIVE_INT,
            "drop_bottom_frac": BELOW_ONE,
            "n_random": POSITIVE_INT,
            "n_boot": POSITIVE_INT,
            "test_seed": NONNEGATIVE_INT,
        },
    )


def read_basis(spec: str):
    """The --basis file as a HackBasis on the CPU (no model needed), or a UsageError."""
    import vhack
    from vhack.basis import BasisFileError
    from vhack.projector import check_basis_rows

    try:
        basis = vhack.HackBasis.load(spec)
        check_basis_rows(basis)  # what a Projector would refuse is not validated either
    except (FileNotFoundError, BasisFileError, ValueError) as err:
        raise UsageError(f"--basis {spec}: {err}") from None
    return basis


def basis_pairs(args: argparse.Namespace, stored) -> tuple[list, str | None]:
    """(pairs, note) to validate a stored basis on: --pairs if given (a loud warning when they
    are not the basis's own), else the basis's own pair set, found from its metadata (the note
    says which)."""
    from vhack.pairs import BUILTIN_PAIRSETS, pairset_hash, resolve_pairs

    want = stored.metadata["pairset_hash"]
    origin = stored.metadata.get("pairs")
    if args.pairs is not None:
        pairs = common.read_pairs(args.pairs)
        if pairset_hash(pairs) != want:
            common.warn(
                args,
                f"--pairs {args.pairs} are not the pairs this basis was extracted from "
                f"({origin or 'pair-set hash ' + want}); its held-out tests may then run on "
                "the basis's training pairs or on unrelated ones. Drop --pairs to use the "
                "basis's own.",
            )
        return pairs, None
    candidates = [origin] if origin else []
    candidates += [name for name in sorted(BUILTIN_PAIRSETS) if name != origin]
    for spec in candidates:
        try:
            pairs = resolve_pairs(spec)
        except (OSError, ValueError, TypeError):
            continue
        if pairset_hash(pairs) == want:
            return pairs, f"pairs: {spec} (the pair set the basis was extracted from)"
    where = f" (recorded as {origin}, now missing or changed)" if origin else ""
    raise UsageError(
        f"--basis {args.basis}: its pair set{where} is not found (pair-set hash {want}, neither "
        f"of the shipped sets); pass it with --pairs FILE"
    )


def load_basis(args: argparse.Namespace, stored, adapter):
    """HackBasis.load of --basis into the wrapped model, a model mismatch as a UsageError that
    names the flags the basis was extracted with."""
    import vhack

    try:
        return vhack.HackBasis.load(
            args.basis, adapter, k=args.k, drop_bottom_frac=args.drop_bottom_frac
        )
    except ValueError as err:
        if "mismatch" not in str(err):
            raise
    meta = stored.metadata
    given = f"--model {args.model}" + (f" --seed {args.seed}" if args.model == "tiny" else "")
    if "model_arg" in meta:
        made = f"--model {meta['model_arg']}"
        if meta["model_arg"] == "tiny":
            made += f" --seed {meta.get('model_seed', '0')}"
        fix = f"it was extracted with {made}: pass {made}"
        if meta["model_arg"] == args.model == "tiny":
            fix = f"it was extracted with {made}: pass --seed {meta.get('model_seed', '0')}"
    else:
        fix = (
            f"its metadata names the model {meta.get('model', '?')!r}: pass that --model (for "
            "the tiny model, the --seed it was extracted with)"
        )
    raise UsageError(
        f"--basis {args.basis}: extracted from another model than {given} (weights or module "
        f"shapes differ); {fix}"
    )


def run(args: argparse.Namespace) -> int:
    """Run the five validation tests of a hack basis and write a JSON + markdown report and a
    plot. With --basis, the pairs, held-out split and extraction settings come from the basis's
    metadata (the pair set it was extracted from) unless given."""
    from vhack.validate import load_samples, validate, write_report

    common.check_writable(args.out_dir, "--out-dir", directory=True)
    device = common.check_device(args.device)
    stored, note = None, None
    if args.basis is not None:
        stored = read_basis(args.basis)
        for flag, value in (("--top-k", args.top_k), ("--tau-axis", args.tau_axis)):
            if value is not None:
                raise UsageError(
                    f"{flag} sets how validate extracts a basis itself; with --basis the file's "
                    f"own axes are tested: drop {flag}"
                )
        pairs, note = basis_pairs(args, stored)
        n_heldout = int(stored.metadata["n_heldout"])
        if args.n_heldout is not None and args.n_heldout != n_heldout:
            common.warn(
                args,
                f"--n-heldout {args.n_heldout}, but the basis held out its last {n_heldout} "
                "pairs: the held-out tests now include pairs the basis was extracted from",
            )
            n_heldout = args.n_heldout
        top_k, tau_axis = int(stored.metadata["top_k"]), float(stored.metadata["tau_axis"])
        common.check_pairs(pairs, top_k, tau_axis, n_heldout)
        rows = max(stored.k(n) for n in stored.names)
        if args.k > rows:
            raise UsageError(
                f"--k {args.k}: the basis stores at most {rows} axes per module; pass --k <= {rows}"
            )
    else:
        pairs = common.read_pairs(args.pairs or ExtractConfig.pairs)
        n_heldout = ExtractConfig.n_heldout if args.n_heldout is None else args.n_heldout
        tau_axis = ExtractConfig.tau_axis if args.tau_axis is None else args.tau_axis
        common.check_pairs(pairs, 1, tau_axis, n_heldout)
        top_k = common.choose_top_k(args.top_k, len(pairs) - n_heldout)
        if args.k > top_k:
            raise UsageError(
                f"--k {args.k}: only {top_k} axes per module are extracted; pass --k <= {top_k} "
                "(or a larger --top-k)"
            )
    samples = None
    if args.samples is not None:
        try:
            samples = load_samples(args.samples)
        except (OSError, ValueError) as err:
            raise UsageError(f"--samples {args.samples}: {err}") from None

    if note:
        print(note)
    _, tok, adapter = common.load_wrapped(args, device)
    basis = load_basis(args, stored, adapter) if stored is not None else None
    report = validate(
        adapter,
        tok,
        pairs,
        basis,
        k=args.k,
        top_k=top_k,
        tau_axis=tau_axis,
        n_heldout=n_heldout,
        drop_bottom_frac=args.drop_bottom_frac,
        samples=samples,
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
