"""`vhack train`: GRPO on a model's dS in one arm, with checkpoints and --resume.

The GRPO options are GRPOConfig's fields (vhack/grpo/config.py), with its defaults except where
TRAIN_DEFAULTS says; the run's own options (model, environment, files) are TrainRun's.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from vhack.cli import _common as common
from vhack.cli._options import add_options
from vhack.errors import UsageError
from vhack.grpo.config import GRPOConfig
from vhack.grpo.demo_settings import DemoSettings

HELP = "GRPO on a model's dS in one arm (checkpoints, resume); for GPUs and the toy world"

# GRPOConfig fields that are options (in this order); the others keep GRPOConfig's defaults
GRPO_OPTIONS = (
    "arm",
    "steps",
    "prompts_per_step",
    "num_generations",
    "max_new_tokens",
    "temperature",
    "lr",
    "beta",
    "num_iterations",
    "scale_rewards",
    "max_grad_norm",
    "k",
    "top_k",
    "refresh_every",
    "teacher_per_group",
    "seed",
    "checkpoint_every",
)
# where `vhack train` defaults differ from GRPOConfig's (a run of the projected arm, resumable)
TRAIN_DEFAULTS = {"arm": "projected", "checkpoint_every": 25}


@dataclass
class TrainRun:
    model: str = field(
        default="toy",
        metadata={
            "help": "'toy' (the demo's warm-started tiny model), 'tiny', a hub name or a path"
        },
    )
    env: str = field(default="toy", metadata={"help": "environment: toy or code"})
    basis: str | None = field(
        default=None, metadata={"help": "hack basis file (default: extract from --pairs)"}
    )
    pairs: str | None = field(
        default=None, metadata={"help": "pairs to extract from (default: the environment's)"}
    )
    nonhack_pairs: str | None = field(
        default=None,
        metadata={"help": "control pairs for arm nonhack-v (default: the environment's)"},
    )
    targets: str = field(default="all-linear", metadata={"help": "Linears to wrap"})
    out: str = field(default="vhack-train", metadata={"help": "run directory"})
    resume: bool = field(default=False, metadata={"help": "continue from the newest checkpoint"})
    overwrite: bool = field(default=False, metadata={"help": "replace a run already in --out"})
    marker_reward: float = field(
        default=DemoSettings.marker_reward, metadata={"help": "toy environment: marker reward"}
    )


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_options(p, TrainRun)
    add_options(p, GRPOConfig, GRPO_OPTIONS, defaults=TRAIN_DEFAULTS)
    add_options(p, common.ModelOptions, ("device", "dtype", "quiet", "threads"))


def load_policy(args, device):
    """(model, tokenizer) for --model: "toy" (the demo's warm-started tiny model), "tiny", a hub
    name or a local path, on `device`."""
    import vhack

    common.apply_threads(args)  # before the toy model's warm start
    if args.model == "toy":
        from vhack.grpo.warmstart import warm_model

        settings = DemoSettings(marker_reward=args.marker_reward)
        cache = vhack.cache.cache_dir() / "toy-warm"
        path = cache / f"seed{args.seed}-{settings.warm_key(args.seed)}.safetensors"
        model, tok, _ = warm_model(settings, args.seed, path)
    else:
        model, tok = common.load_model(args.model, args.seed, common.torch_dtype(args.dtype))
    common.apply_threads(args, model)
    return model.to(device), tok


def parse_targets(spec: str) -> str | list[str]:
    """--targets: "all-linear" or comma-separated module names / name suffixes."""
    if spec == "all-linear":
        return spec
    names = [t.strip() for t in spec.split(",")]
    if not spec.strip() or any(not t or any(c.isspace() for c in t) for t in names):
        raise UsageError(
            f"--targets {spec!r}: pass all-linear or comma-separated module names, e.g. "
            "q_proj,v_proj"
        )
    return names


def read_basis(spec: str, k: int):
    """--basis, read and checked (file, format, the Projector's row checks, k rows) without a
    model: a UsageError names the problem."""
    import vhack
    from vhack.projector import check_basis_rows

    if not os.path.lexists(spec):
        raise UsageError(f"--basis {spec}: no such file")
    try:
        basis = vhack.HackBasis.load(spec)
        rows = min(basis.k(n) for n in basis.names)
        if k > rows:
            raise ValueError(f"it stores {rows} axes per module; pass --k <= {rows}")
        check_basis_rows(basis, k)
    except (OSError, ValueError) as err:
        raise UsageError(f"--basis {spec}: {err}") from None
    return basis


def file_digest(path: str | os.PathLike) -> str:
    """16 hex digits of a file's content (what a resumed run compares for --basis)."""
    import hashlib

    with open(path, "rb") as f:
        return hashlib.file_digest(f, "blake2b").hexdigest()[:16]


# what `vhack train` records in run.json besides GRPOConfig; a resume must agree on all of it
RUN_FIELDS = ("model", "env", "targets", "marker_reward", "dtype", "basis", "pairs", "nonhack")
# GRPOConfig fields a resumed run may change (how long it runs, how often it checkpoints)
RESUMABLE = ("steps", "checkpoint_every")


def check_resume(out: Path, record: dict) -> None:
    """UsageError naming every field of this run that differs from the run in `out`'s
    run.json (a run written before run.json existed is compared by its checkpoint's config)."""
    path = out / "run.json"
    if not path.is_file():
        return
    try:
        theirs = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UsageError(
            f"--resume: {path} cannot be read ({err}); start without --resume"
        ) from None
    differ = []
    for key in RUN_FIELDS:
        if record["run"].get(key) != theirs.get("run", {}).get(key):
            differ.append(
                (f"--{key.replace('_', '-')}", theirs["run"].get(key), record["run"][key])
            )
    for key, value in record["config"].items():
        if key not in RESUMABLE and theirs.get("config", {}).get(key) != value:
            differ.append((key, theirs.get("config", {}).get(key), value))
    if differ:
        shown = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in differ)
        raise UsageError(
            f"--resume: {out} holds a run with other settings ({shown}); pass the run's own "
            "settings, or --overwrite (without --resume) to start a new run there"
        )


def run(args: argparse.Namespace) -> int:
    """GRPO on a wrapped model's dS in one arm, with checkpoints (dS, optimizer, RNG, step) every
    --checkpoint-every steps and --resume to continue a run exactly where it stopped. A resume
    must use the run's settings (only --steps and --checkpoint-every may change); --overwrite
    removes the old run's files (checkpoints, history, dS) before a new run starts."""
    from tqdm.auto import tqdm

    import vhack
    from vhack.files import atomic_path, atomic_write_text
    from vhack.grpo.checkpoint import latest_checkpoint, remove_run_files, remove_stale
    from vhack.grpo.envs import ENV_NAMES, get_env
    from vhack.grpo.trainer import GRPOTrainer, check_fits
    from vhack.pairs import pairset_hash

    # ---- everything that can be checked before loading anything ----
    if args.top_k >= 1 and args.k > args.top_k:  # as `vhack extract` / `validate` refuse it
        raise UsageError(
            f"--k {args.k}: only {args.top_k} axes per module are extracted; pass --k <= "
            f"{args.top_k} (or a larger --top-k)"
        )
    config = GRPOConfig(**{name: getattr(args, name) for name in GRPO_OPTIONS})
    if args.env not in ENV_NAMES:
        raise UsageError(f"unknown environment {args.env!r}; choose one of {', '.join(ENV_NAMES)}")
    if args.model == "toy" and args.dtype not in (None, "float32"):
        raise UsageError(f"--dtype {args.dtype}: --model toy runs in float32; omit --dtype")
    targets = parse_targets(args.targets)
    if args.resume and args.overwrite:
        raise UsageError("--resume continues the run in --out, --overwrite replaces it: pick one")
    out = common.check_writable(args.out, "--out", directory=True)
    device = common.check_device(args.device)
    basis = read_basis(args.basis, config.k) if args.basis else None
    pairs = common.read_pairs(args.pairs) if args.pairs else None
    nonhack = common.read_pairs(args.nonhack_pairs) if args.nonhack_pairs else None
    holds_run = latest_checkpoint(out) is not None or any(
        (out / name).exists() for name in ("history.jsonl", "run.json", "delta.safetensors")
    )
    if args.resume:
        if latest_checkpoint(out) is None:
            raise UsageError(f"--resume: no checkpoint in {out}; start without --resume")
    elif holds_run and not args.overwrite:
        raise UsageError(
            f"{out} already holds a run; pass --resume to continue it, --overwrite to replace "
            "it, or another --out"
        )
    env = get_env(args.env, **({"marker_reward": args.marker_reward} if args.env == "toy" else {}))
    try:
        basis_file = out / "hack_basis.safetensors"
        if basis is None:  # extracted from these (or reloaded from the run, extracted from them)
            pairs = pairs or env.hack_pairs()
            if not pairs:
                raise UsageError(
                    f"environment {env.name!r} has no hack pairs; pass --basis or --pairs"
                )
            common.check_pairs(pairs, config.top_k, 0.0, 0)
            if config.top_k > len(pairs):  # D has at most len(pairs) non-zero singular values
                raise UsageError(
                    f"--top-k {config.top_k}: {len(pairs)} pairs give at most {len(pairs)} axes "
                    f"per module; pass --top-k <= {len(pairs)} (and --k <= it) or add pairs"
                )
        teacher = getattr(env, "teacher_completion", None)
        if config.teacher_per_group and teacher is None:
            raise UsageError(f"--teacher-per-group: environment {env.name!r} has no teacher")
        record = {
            "config": config.to_dict(),
            "run": {
                "model": args.model,
                "env": args.env,
                "targets": args.targets,
                "marker_reward": args.marker_reward if args.env == "toy" else None,
                "dtype": args.dtype,
                "basis": file_digest(args.basis) if args.basis else None,
                "pairs": pairset_hash(pairs) if pairs and basis is None else None,
                "nonhack": pairset_hash(nonhack) if nonhack else None,
            },
        }
        if args.resume:
            check_resume(out, record)

        # ---- the work ----
        model, tok = load_policy(args, device)
        check_fits(config, env, tok, model)
        try:
            adapter = vhack.wrap(model, targets=targets, progress=not args.quiet)
        except (ValueError, TypeError) as err:
            if "target" not in str(err):  # e.g. a NaN weight: not the flag's fault
                raise
            raise UsageError(f"--targets {args.targets}: {err}") from None
        if basis is not None:
            try:
                basis = vhack.HackBasis.load(args.basis, adapter, k=config.k)
            except ValueError as err:
                raise UsageError(
                    f"--basis {args.basis}: {err}; a basis fits only the model it was extracted "
                    "from: extract one for this model (vhack extract) or omit --basis"
                ) from err
        elif args.resume and basis_file.exists():
            basis = vhack.HackBasis.load(basis_file, adapter)
        else:
            basis = vhack.extract(
                adapter, tok, pairs, top_k=config.top_k, n_heldout=0, progress=False
            )
        out.mkdir(parents=True, exist_ok=True)
        remove_stale(out)  # temp files and .tmp checkpoints of a killed run
        if args.overwrite:  # the old run's checkpoints and history go before the new run writes
            remove_run_files(out)
        if not (args.resume and basis_file.exists()) and args.basis is None:
            basis.save(basis_file)
        nonhack = nonhack or (env.nonhack_pairs() if hasattr(env, "nonhack_pairs") else None)
        trainer = GRPOTrainer(
            adapter,
            tok,
            env,
            config,
            hack_basis=basis,
            nonhack_pairs=nonhack,
            out_dir=out,
            teacher=teacher,
        )
        if args.resume:
            trainer.load_checkpoint(out)
        atomic_write_text(out / "config.json", json.dumps(config.to_dict(), indent=2) + "\n")
        atomic_write_text(out / "run.json", json.dumps(record, indent=2) + "\n")
        t0 = time.perf_counter()
        bar = tqdm(
            total=config.steps,
            initial=trainer.global_step,
            desc=f"GRPO {config.arm}",
            disable=args.quiet,
            unit="step",
        )
        with bar:
            for step in trainer.steps():
                bar.update(1)
                bar.set_postfix(
                    reward=f"{step['reward']:.2f}",
                    hack=f"{step['hack_rate']:.2f}",
                    solve=f"{step['solve_rate']:.2f}",
                )
        import safetensors.torch

        final = out / "delta.safetensors"
        with atomic_path(final) as tmp:
            safetensors.torch.save_file(
                {n: t.cpu() for n, t in adapter.state_dict().items()}, str(tmp)
            )
    finally:
        env.close()
    print(
        f"{config.steps} steps ({time.perf_counter() - t0:.1f} s); dS in {final}, log in "
        f"{out / 'history.jsonl'}"
    )
    return 0
