"""The `vhack` command line. `vhack --help` lists the subcommands.

Every user mistake (a bad number, a missing file, an unknown model or pair set, an unwritable
output) raises `vhack.errors.UsageError` before any work starts; `main` prints it as one line,
`vhack COMMAND: error: MESSAGE`, and returns 2. argparse's own errors get the same one-line form.

Adding a subcommand: write `_cmd_NAME(args) -> int` (its docstring is the --help description) and
register it in `build_parser` with `p = _add_command(sub, "NAME", _cmd_NAME, "one-line help")`
followed by its `p.add_argument(...)` calls; `--help` shows every default by itself.

`vhack extract` records in the basis metadata how it was made: "pairs" (the shipped set's name,
or the pair file's absolute path), "model_arg" (--model) and "model_seed" (--seed), so that
`vhack validate` finds the basis's own pairs and can name the flag that fixes a model mismatch.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from vhack.errors import UsageError

__all__ = ["build_parser", "main"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MAX_TOP_K = 12  # default ceiling of --top-k (the axes a dozen pairs can give)
HUB_TIMEOUT_S = 10.0  # one metadata request to the hub before a download is attempted


# ---------------------------------------------------------------------------------------------
# Parser: one-line errors, every default in --help, checked numbers
# ---------------------------------------------------------------------------------------------


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: ...)" to every option's help, except where the help text already says
    what the default is (options whose default is computed, e.g. "default: cuda when
    available")."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default is argparse.SUPPRESS:
            return text
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors are one line (`vhack COMMAND: error: ...`, exit 2) and whose
    help shows every default (subparsers inherit both)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _number(
    kind: type, lo: float, hi: float = math.inf, *, open_lo: bool = False, open_hi: bool = False
) -> Callable[[str], float]:
    """An argparse type: `kind` (int or float) within [lo, hi] (open ends where asked)."""
    left, right = "(" if open_lo else "[", ")" if open_hi or hi == math.inf else "]"
    what = (
        f"an integer >= {lo}"
        if kind is int and hi == math.inf
        else f"a {'number' if kind is float else 'integer'} in {left}{lo}, {hi}{right}"
    )

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        ok_lo = value > lo if open_lo else value >= lo
        ok_hi = value < hi if open_hi else value <= hi
        if not (math.isfinite(value) and ok_lo and ok_hi):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return value

    return parse


POSITIVE_INT = _number(int, 1)
NONNEGATIVE_INT = _number(int, 0)
FRACTION = _number(float, 0.0, 1.0)  # [0, 1]
BELOW_ONE = _number(float, 0.0, 1.0, open_hi=True)  # [0, 1)
POSITIVE_FLOAT = _number(float, 0.0, open_lo=True)


def _add_command(sub, name: str, func: Callable[[argparse.Namespace], int], help: str):
    """Register subcommand `name` running `func`; its docstring becomes the description."""
    p = sub.add_parser(name, help=help, description=func.__doc__)
    p.set_defaults(func=func)
    return p


def _warn(args: argparse.Namespace, message: str) -> None:
    """A loud warning on stderr: the command goes on, but the user should read this."""
    print(f"vhack {args.command}: WARNING: {message}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# Checks that run before any work
# ---------------------------------------------------------------------------------------------


def _check_writable(path: str | os.PathLike, flag: str, *, directory: bool) -> Path:
    """UsageError unless `path` can be written: a file (directory=False) that is not a directory,
    or a directory (directory=True) that is not a file, and the nearest existing ancestor is a
    directory where a file can actually be created (a probe file, so read-only file systems and
    permissions are caught for root too). Creates nothing that stays."""
    path = Path(path).expanduser()
    if path.exists():
        if directory and not path.is_dir():
            raise UsageError(f"{flag} {path}: exists and is not a directory")
        if not directory and path.is_dir():
            raise UsageError(
                f"{flag} {path}: is a directory; pass a file name, e.g. {path / 'basis.safetensors'}"
            )
    ancestor = path if directory else path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UsageError(f"{flag} {path}: {ancestor} is a file, not a directory")
    try:
        with tempfile.TemporaryFile(dir=ancestor):
            pass
    except OSError as err:
        raise UsageError(
            f"{flag} {path}: cannot write in {ancestor} ({err.strerror}); pass a writable location"
        ) from None
    if path.is_file() and not os.access(path, os.W_OK):
        raise UsageError(f"{flag} {path}: the existing file is not writable")
    return path


def _device(spec: str | None) -> torch.device:
    """--device, checked: the default is cuda when available, else cpu."""
    if spec is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise UsageError(f"--device {spec}: not a torch device; pass cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {spec}: no CUDA device is available here; pass --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {spec}: vhack runs on cpu or cuda")
    return device


def _pairs(spec: str):
    """The pairs of --pairs: a shipped set's name or a JSONL file."""
    from vhack.pairs import BUILTIN_PAIRSETS, builtin_pairs, load_pairs

    if spec in BUILTIN_PAIRSETS:
        return builtin_pairs(spec)
    path = Path(spec).expanduser()
    if not path.is_file():
        raise UsageError(
            f"--pairs {spec}: not a shipped pair set ({', '.join(sorted(BUILTIN_PAIRSETS))}) nor "
            "a JSONL file of {prompt, hack, clean} pairs"
        )
    try:
        return load_pairs(path)
    except (OSError, ValueError, TypeError) as err:
        raise UsageError(f"--pairs {spec}: {err}") from None


def _pairs_origin(spec: str) -> str:
    """What the basis metadata records as its pair set: the name, or the file's absolute path."""
    from vhack.pairs import BUILTIN_PAIRSETS

    return spec if spec in BUILTIN_PAIRSETS else str(Path(spec).expanduser().resolve())


def _check_pairs(pairs, top_k: int, tau_axis: float, n_heldout: int) -> None:
    """vhack.extract's own argument checks (pair count, duplicates, ...) as UsageErrors."""
    from vhack.extract import check_extract_args

    try:
        check_extract_args(pairs, top_k, tau_axis, n_heldout)
    except (TypeError, ValueError) as err:
        raise UsageError(f"{err} (--pairs / --n-heldout)") from None


def _top_k(requested: int | None, n_train: int) -> int:
    """--top-k: by default min(MAX_TOP_K, n_train); more than n_train is an error, because
    D = G_hack - G_clean has at most n_train non-zero singular values (no silent cap)."""
    if requested is None:
        return min(MAX_TOP_K, n_train)
    if requested > n_train:
        raise UsageError(
            f"--top-k {requested}: the {n_train} training pairs give at most {n_train} axes per "
            f"module (rank of D = G_hack - G_clean); pass --top-k <= {n_train} or add pairs"
        )
    return requested


def _hub_offline() -> bool:
    """True when the user asked Hugging Face libraries to stay offline."""
    from huggingface_hub import constants

    flags = (os.environ.get(v, "") for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return constants.HF_HUB_OFFLINE or any(f.upper() in ("1", "ON", "YES", "TRUE") for f in flags)


def _model_source(spec: str) -> tuple[str, bool]:
    """(what to pass to from_pretrained, local_files_only) for a --model other than "tiny".

    A local directory must hold a config.json. Anything else must be a valid hub name: offline
    (HF_HUB_OFFLINE=1) it must already be in the local Hugging Face cache; online, one metadata
    request (HUB_TIMEOUT_S) decides before anything downloads: an unknown name fails at once, and
    an unreachable hub falls back to the cache or fails with the reason, instead of transformers'
    retry loop (about 30 s per file on a machine without network).
    """
    from huggingface_hub import model_info, try_to_load_from_cache
    from huggingface_hub.errors import GatedRepoError, HFValidationError, RepositoryNotFoundError
    from huggingface_hub.utils import validate_repo_id

    howto = "pass 'tiny', a directory holding a transformers model (config.json), or a hub name"
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UsageError(f"--model {spec}: is a file; {howto}")
        if not (path / "config.json").is_file():
            raise UsageError(f"--model {spec}: the directory holds no config.json; {howto}")
        return str(path), True
    try:
        validate_repo_id(spec)
    except HFValidationError:
        raise UsageError(f"--model {spec}: no such model directory or hub name; {howto}") from None
    cached = isinstance(try_to_load_from_cache(spec, "config.json"), str)
    if _hub_offline():
        if cached:
            return spec, True
        raise UsageError(
            f"--model {spec}: no such model directory or hub name in the local Hugging Face cache "
            "(HF_HUB_OFFLINE is set, so nothing is downloaded); download it where the hub is "
            f"reachable, or {howto}"
        )
    try:
        model_info(spec, timeout=HUB_TIMEOUT_S)
    except GatedRepoError:
        raise UsageError(
            f"--model {spec}: a gated hub model; accept its license on the hub and log in "
            "(hf auth login)"
        ) from None
    except RepositoryNotFoundError:
        raise UsageError(f"--model {spec}: no such model directory or hub name; {howto}") from None
    except Exception as err:  # no network, proxy, DNS, timeout: the hub cannot say
        if cached:
            return spec, True
        raise UsageError(
            f"--model {spec}: no such model directory, not in the local Hugging Face cache, and "
            f"the hub is unreachable ({type(err).__name__}: {err}); {howto}"
        ) from None
    return spec, False


def _load_model(spec: str, seed: int, dtype: torch.dtype | None):
    """(model in eval mode, tokenizer) of --model; see `_model_source` for names and paths."""
    import vhack

    if spec == "tiny":
        return vhack.models.load("tiny", seed=seed, dtype=dtype)
    source, local_only = _model_source(spec)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"dtype": dtype} if dtype is not None else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(source, local_files_only=local_only, **kwargs)
        tok = AutoTokenizer.from_pretrained(source, local_files_only=local_only)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UsageError(
            f"--model {spec}: cannot load a causal LM and its tokenizer: {first}"
        ) from None
    return model.eval(), tok


def _wrapped(args: argparse.Namespace, device: torch.device):
    """(model, tokenizer, adapter) for --model/--seed/--dtype on `device`."""
    import vhack

    model, tok = _load_model(args.model, args.seed, DTYPES.get(args.dtype))
    model = model.to(device)
    return model, tok, vhack.wrap(model, progress=not args.quiet)


# ---------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------


def _cmd_info(args: argparse.Namespace) -> int:
    """Versions, the backends available on this machine, and the disk cache."""
    import vhack
    from vhack.cache import cache_dir, svd_cache_enabled
    from vhack.sandbox import probe as sandbox_probe

    root = cache_dir()
    svd = root / "svd"
    info = {
        "vhack": vhack.__version__,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "backends": vhack.ops.backends(),
        "cache": {
            "dir": str(root),
            "svd_cache": svd_cache_enabled(),
            "svd_bytes": sum(f.stat().st_size for f in svd.glob("*.safetensors")),
        },
        "sandbox": sandbox_probe().to_dict(),  # isolation for untrusted code (vhack.sandbox)
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
    from vhack.lm import completion_losses

    pairs = _pairs(args.pairs)
    _check_pairs(pairs, 1, 0.0, args.n_heldout)
    train, held = pairs[: len(pairs) - args.n_heldout], pairs[len(pairs) - args.n_heldout :]
    top_k = _top_k(args.top_k, len(train))
    if args.k > top_k:
        raise UsageError(f"--k {args.k}: only {top_k} axes per module are extracted (--top-k)")

    t0 = time.perf_counter()
    model, tok = vhack.models.load("tiny", seed=args.seed)
    adapter = vhack.wrap(model, use_cache=False, progress=False)
    print(f"wrapped {len(adapter)} Linear modules: {adapter.delta.numel()} trainable dS scalars")
    basis = vhack.extract(
        adapter, tok, pairs, top_k=top_k, n_heldout=args.n_heldout, progress=False
    )
    print(
        f"hack basis from {len(train)} {args.pairs!r} pairs: {len(basis.names)} modules, "
        f"{args.k} of up to {top_k} axes per module used; {len(held)} pairs held out"
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


def _cmd_extract(args: argparse.Namespace) -> int:
    """Extract a hack basis from contrastive pairs and save it (safetensors, schema v2)."""
    import vhack
    from vhack.cache import cache_dir
    from vhack.extract import basis_cache_path, choose_method

    t0 = time.perf_counter()
    if args.out is not None:
        _check_writable(args.out, "--out", directory=False)
    else:
        _check_writable(cache_dir() / "bases", "--out (default: the vhack cache)", directory=True)
    device = _device(args.device)
    pairs = _pairs(args.pairs)
    _check_pairs(pairs, 1, args.tau_axis, args.n_heldout)
    train = pairs[: len(pairs) - args.n_heldout]
    top_k = _top_k(args.top_k, len(train))
    _, tok, adapter = _wrapped(args, device)
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
        pairs=_pairs_origin(args.pairs), model_arg=args.model, model_seed=str(args.seed)
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


def _read_basis(spec: str):
    """The --basis file as a HackBasis on the CPU (no model needed), or a UsageError."""
    import vhack
    from vhack.basis import BasisFileError

    try:
        return vhack.HackBasis.load(spec)
    except (FileNotFoundError, BasisFileError) as err:
        raise UsageError(f"--basis {spec}: {err}") from None


def _basis_pairs(args: argparse.Namespace, stored) -> tuple[list, str | None]:
    """(pairs, note) to validate a stored basis on: --pairs if given (a loud warning when they
    are not the basis's own), else the basis's own pair set, found from its metadata (the note
    says which)."""
    from vhack.pairs import BUILTIN_PAIRSETS, pairset_hash, resolve_pairs

    want = stored.metadata["pairset_hash"]
    origin = stored.metadata.get("pairs")
    if args.pairs is not None:
        pairs = _pairs(args.pairs)
        if pairset_hash(pairs) != want:
            _warn(
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


def _load_basis(args: argparse.Namespace, stored, adapter):
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


def _cmd_validate(args: argparse.Namespace) -> int:
    """Run the five validation tests of a hack basis and write a JSON + markdown report and a
    plot. With --basis, the pairs, held-out split and extraction settings come from the basis's
    metadata (the pair set it was extracted from) unless given."""
    from vhack.validate import load_samples, validate, write_report

    _check_writable(args.out_dir, "--out-dir", directory=True)
    device = _device(args.device)
    stored, note = None, None
    if args.basis is not None:
        stored = _read_basis(args.basis)
        for flag, value in (("--top-k", args.top_k), ("--tau-axis", args.tau_axis)):
            if value is not None:
                raise UsageError(
                    f"{flag} sets how validate extracts a basis itself; with --basis the file's "
                    f"own axes are tested: drop {flag}"
                )
        pairs, note = _basis_pairs(args, stored)
        n_heldout = int(stored.metadata["n_heldout"])
        if args.n_heldout is not None and args.n_heldout != n_heldout:
            _warn(
                args,
                f"--n-heldout {args.n_heldout}, but the basis held out its last {n_heldout} "
                "pairs: the held-out tests now include pairs the basis was extracted from",
            )
            n_heldout = args.n_heldout
        top_k, tau_axis = int(stored.metadata["top_k"]), float(stored.metadata["tau_axis"])
        _check_pairs(pairs, top_k, tau_axis, n_heldout)
        rows = max(stored.k(n) for n in stored.names)
        if args.k > rows:
            raise UsageError(
                f"--k {args.k}: the basis stores at most {rows} axes per module; pass --k <= {rows}"
            )
    else:
        pairs = _pairs(args.pairs or "coding")
        n_heldout = 2 if args.n_heldout is None else args.n_heldout
        tau_axis = 0.0 if args.tau_axis is None else args.tau_axis
        _check_pairs(pairs, 1, tau_axis, n_heldout)
        top_k = _top_k(args.top_k, len(pairs) - n_heldout)
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
    _, tok, adapter = _wrapped(args, device)
    basis = _load_basis(args, stored, adapter) if stored is not None else None
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


# ---------------------------------------------------------------------------------------------
# build_parser / main
# ---------------------------------------------------------------------------------------------


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default="tiny",
        help="'tiny' (embedded, offline), a local model directory, or a hub name (offline with "
        "HF_HUB_OFFLINE=1: then only names already in the Hugging Face cache)",
    )
    p.add_argument("--seed", type=NONNEGATIVE_INT, default=0, help="seed of the tiny model")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default=None,
        help="model dtype (default: the model's own; float32 for tiny)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_extraction_args(p: argparse.ArgumentParser, *, from_basis: bool) -> None:
    """--pairs, --top-k, --tau-axis, --n-heldout, --method, --batch-size. from_basis: the
    defaults of --pairs/--top-k/--tau-axis/--n-heldout come from a --basis file when given."""
    basis_first = "the basis's own when --basis is given, else " if from_basis else ""
    p.add_argument(
        "--pairs",
        default=None if from_basis else "coding",
        help="shipped pair set 'coding' or 'toy', or a JSONL file"
        + (f" (default: {basis_first}coding)" if from_basis else ""),
    )
    p.add_argument(
        "--top-k",
        type=POSITIVE_INT,
        default=None,
        help=f"axes extracted per module, at most the number of training pairs (default: "
        f"{'unused with --basis, else ' if from_basis else ''}as many as the training pairs "
        f"allow, at most {MAX_TOP_K})",
    )
    p.add_argument(
        "--tau-axis",
        type=FRACTION,
        default=None if from_basis else 0.0,
        help="zero axes with S_i/S_0 < tau"
        + (" (default: unused with --basis, else 0)" if from_basis else ""),
    )
    p.add_argument(
        "--n-heldout",
        type=NONNEGATIVE_INT,
        default=None if from_basis else 2,
        help="last pairs held out" + (f" (default: {basis_first}2)" if from_basis else ""),
    )
    p.add_argument(
        "--method",
        choices=("auto", "shared", "batched", "loop"),
        default="auto",
        help="how pair gradients are computed: 'shared' (one row per pair, the prompt once), "
        "'batched' (completions batched), 'loop' (one backward per completion, the reference), "
        "'auto' (shared where supported and cheaper, else batched)",
    )
    p.add_argument(
        "--batch-size",
        type=POSITIVE_INT,
        default=None,
        help="pairs (shared) or completions (batched) per backward (default: as many as fit "
        "in 8192 padded tokens)",
    )


def build_parser() -> argparse.ArgumentParser:
    import vhack

    parser = _Parser(
        prog="vhack",
        description="Keep reward-hacking gradient directions out of RL fine-tuning.",
    )
    parser.add_argument("--version", action="version", version=f"vhack {vhack.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    _add_command(
        sub, "info", _cmd_info, "versions, backends, sandbox isolation and the disk cache (JSON)"
    )

    p = _add_command(
        sub,
        "example",
        _cmd_example,
        "end-to-end example on the embedded tiny model (wrap, extract, project, train)",
    )
    p.add_argument("--seed", type=NONNEGATIVE_INT, default=0, help="seed of the tiny model")
    p.add_argument("--pairs", choices=("toy", "coding"), default="toy", help="shipped pair set")
    p.add_argument(
        "--top-k",
        type=POSITIVE_INT,
        default=None,
        help=f"axes extracted per module (default: as many as the training pairs allow, at most "
        f"{MAX_TOP_K})",
    )
    p.add_argument("--k", type=POSITIVE_INT, default=5, help="axes per module projected")
    p.add_argument("--n-heldout", type=POSITIVE_INT, default=2, help="held-out pairs")
    p.add_argument("--steps", type=POSITIVE_INT, default=8, help="optimizer steps per run")
    p.add_argument("--lr", type=POSITIVE_FLOAT, default=0.05, help="AdamW learning rate")

    p = _add_command(
        sub,
        "extract",
        _cmd_extract,
        "extract a hack basis from contrastive pairs (safetensors, schema v2)",
    )
    _add_model_args(p)
    _add_extraction_args(p, from_basis=False)
    p.add_argument(
        "--out",
        default=None,
        help="output file (default: the load_or_extract cache path of this model, pair set and "
        "--top-k)",
    )

    p = _add_command(
        sub,
        "validate",
        _cmd_validate,
        "the five validation tests of a hack basis: report (JSON, markdown) and plot",
    )
    _add_model_args(p)
    _add_extraction_args(p, from_basis=True)
    p.add_argument(
        "--basis", default=None, help="basis file to test (default: extract one from --pairs)"
    )
    p.add_argument("--k", type=POSITIVE_INT, default=5, help="axes per module used")
    p.add_argument(
        "--drop-bottom-frac", type=BELOW_ONE, default=0.0, help="pooled noise floor (e.g. 0.25)"
    )
    p.add_argument(
        "--samples",
        default=None,
        help="JSONL of {prompt, completion, label} for tests 1 and 4 (default: held-out pairs)",
    )
    p.add_argument(
        "--n-random", type=POSITIVE_INT, default=100, help="random bases of the null (test 3)"
    )
    p.add_argument("--n-boot", type=POSITIVE_INT, default=20, help="bootstrap resamples (test 5)")
    p.add_argument("--test-seed", type=NONNEGATIVE_INT, default=0, help="seed of the resampling")
    p.add_argument("--out-dir", default="vhack-validation", help="where the report goes")

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
