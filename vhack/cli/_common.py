"""What the commands share: the model options, argument checks that run before any work, and
model loading. Imports torch only inside the functions that need it."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from vhack.errors import UsageError
from vhack.extract_config import EXTRACT_TOP_K
from vhack.threads import SMALL_MODEL_PARAMS, ThreadChoice, choose_threads, is_small_model

DTYPES = ("bfloat16", "float16", "float32")  # --dtype: names of torch dtypes
HUB_TIMEOUT_S = 10.0  # one metadata request to the hub before a download is attempted
TINY_MODELS = ("tiny", "toy")  # --model names of the embedded tiny model (about 0.1 M parameters)


@dataclass
class ModelOptions:
    """The model a command loads (--model, --seed, --device, --dtype) and --quiet."""

    model: str = field(
        default="tiny",
        metadata={
            "help": "'tiny' (embedded, offline), a local model directory, or a hub name (offline "
            "with HF_HUB_OFFLINE=1: then only names already in the Hugging Face cache)"
        },
    )
    seed: int = field(default=0, metadata={"help": "seed of the tiny model"})
    device: str | None = field(
        default=None, metadata={"help": "cpu or cuda (default: cuda when available)"}
    )
    dtype: str | None = field(
        default=None,
        metadata={
            "help": "model dtype (default: the model's own; float32 for tiny)",
            "choices": DTYPES,
        },
    )
    quiet: bool = field(default=False, metadata={"help": "no progress bars"})
    threads: int | None = field(
        default=None,
        metadata={
            "help": "torch CPU threads (default: 1 for a model under "
            f"{SMALL_MODEL_PARAMS // 10**6} M parameters, else the cores this process may use; "
            "OMP_NUM_THREADS or MKL_NUM_THREADS, when set, is kept)"
        },
    )


def apply_threads(args: argparse.Namespace, model=None) -> ThreadChoice:
    """Set torch's CPU threads for this command (vhack.threads): --threads, else the environment's
    OMP_NUM_THREADS / MKL_NUM_THREADS, else by the model's size. Call it before loading (model
    None: the tiny models are known to be small, any other model gets the cores) and again with
    the loaded model (counted)."""
    import torch

    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads {args.threads}: pass a positive number of threads")
    if model is not None:
        small = is_small_model(sum(p.numel() for p in model.parameters()))
    else:
        small = getattr(args, "model", "tiny") in TINY_MODELS
    choice = choose_threads(small, requested=args.threads)
    if choice.source in ("auto", "--threads"):  # an environment setting is torch's already
        torch.set_num_threads(choice.threads)
    return choice


def torch_dtype(name: str | None):
    """The torch dtype of a --dtype name (None: None)."""
    import torch

    return None if name is None else getattr(torch, name)


def warn(args: argparse.Namespace, message: str) -> None:
    """A loud warning on stderr: the command goes on, but the user should read this."""
    print(f"vhack {args.command}: WARNING: {message}", file=sys.stderr)


def check_writable(path: str | os.PathLike, flag: str, *, directory: bool) -> Path:
    """UsageError unless `path` can be written: a file (directory=False) that is not a directory,
    or a directory (directory=True) that is not a file, and the nearest existing ancestor is a
    directory where a file can actually be created (a probe file, so read-only file systems and
    permissions are caught for root too). Creates nothing that stays."""
    path = Path(path).expanduser()
    if path.exists():
        if directory and not path.is_dir():
            raise UsageError(f"{flag} {path}: is a file, not a directory")
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


def check_device(spec: str | None):
    """--device, checked: the default is cuda when available, else cpu."""
    import torch

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


def read_pairs(spec: str):
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


def pairs_origin(spec: str) -> str:
    """What the basis metadata records as its pair set: the name, or the file's absolute path."""
    from vhack.pairs import BUILTIN_PAIRSETS

    return spec if spec in BUILTIN_PAIRSETS else str(Path(spec).expanduser().resolve())


def check_pairs(pairs, top_k: int, tau_axis: float, n_heldout: int) -> None:
    """vhack.extract's own argument checks (pair count, duplicates, ...) as UsageErrors."""
    from vhack.extract import check_extract_args

    try:
        check_extract_args(pairs, top_k, tau_axis, n_heldout)
    except (TypeError, ValueError) as err:
        raise UsageError(f"{err} (--pairs / --n-heldout)") from None


def choose_top_k(requested: int | None, n_train: int) -> int:
    """--top-k: by default min(EXTRACT_TOP_K, n_train); more than n_train is an error, because
    D = G_hack - G_clean has at most n_train non-zero singular values (no silent cap)."""
    if requested is None:
        return min(EXTRACT_TOP_K, n_train)
    if requested > n_train:
        raise UsageError(
            f"--top-k {requested}: the {n_train} training pairs give at most {n_train} axes per "
            f"module (rank of D = G_hack - G_clean); pass --top-k <= {n_train} or add pairs"
        )
    return requested


def hub_offline() -> bool:
    """True when the user asked Hugging Face libraries to stay offline."""
    from huggingface_hub import constants

    flags = (os.environ.get(v, "") for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return constants.HF_HUB_OFFLINE or any(f.upper() in ("1", "ON", "YES", "TRUE") for f in flags)


def model_source(spec: str) -> tuple[str, bool]:
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
    if hub_offline():
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


def load_model(spec: str, seed: int, dtype):
    """(model in eval mode, tokenizer) of --model; see `model_source` for names and paths."""
    import vhack

    if spec == "tiny":
        return vhack.models.load("tiny", seed=seed, dtype=dtype)
    source, local_only = model_source(spec)
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


def load_wrapped(args: argparse.Namespace, device):
    """(model, tokenizer, adapter) for --model/--seed/--dtype on `device`."""
    import vhack

    apply_threads(args)
    model, tok = load_model(args.model, args.seed, torch_dtype(args.dtype))
    apply_threads(args, model)
    model = model.to(device)
    return model, tok, vhack.wrap(model, progress=not args.quiet)
