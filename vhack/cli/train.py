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
    add_options(p, common.ModelOptions, ("device", "dtype", "quiet"))


def load_policy(args):
    """(model, tokenizer) for --model: "toy" (the demo's warm-started tiny model), "tiny", a hub
    name or a local path."""
    import torch

    import vhack

    if args.model == "toy":
        from vhack.grpo.warmstart import warm_model

        settings = DemoSettings(marker_reward=args.marker_reward)
        cache = vhack.cache.cache_dir() / "toy-warm"
        path = cache / f"seed{args.seed}-{settings.warm_key(args.seed)}.safetensors"
        model, tok, _ = warm_model(settings, args.seed, path)
    else:
        try:
            model, tok = vhack.models.load(
                args.model, seed=args.seed, dtype=common.torch_dtype(args.dtype)
            )
        except OSError as err:
            raise UsageError(f"cannot load model {args.model!r}: {err}") from err
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device), tok


def run(args: argparse.Namespace) -> int:
    """GRPO on a wrapped model's dS in one arm, with checkpoints (dS, optimizer, RNG, step) every
    --checkpoint-every steps and --resume to continue a run exactly where it stopped."""
    from tqdm.auto import tqdm

    import vhack
    from vhack.grpo.envs import ENV_NAMES, get_env
    from vhack.grpo.trainer import GRPOTrainer, check_fits, latest_checkpoint
    from vhack.pairs import resolve_pairs

    # ---- everything that can be checked before loading anything ----
    if args.top_k >= 1 and args.k > args.top_k:  # as `vhack extract` / `validate` refuse it
        raise UsageError(
            f"--k {args.k}: only {args.top_k} axes per module are extracted; pass --k <= "
            f"{args.top_k} (or a larger --top-k)"
        )
    config = GRPOConfig(**{name: getattr(args, name) for name in GRPO_OPTIONS})
    if args.env not in ENV_NAMES:
        raise UsageError(f"unknown environment {args.env!r}; choose one of {', '.join(ENV_NAMES)}")
    if args.basis and not Path(args.basis).is_file():
        raise UsageError(f"--basis {args.basis}: no such file")
    out = Path(args.out)
    if args.resume:
        if latest_checkpoint(out) is None:
            raise UsageError(f"--resume: no checkpoint in {out}; start without --resume")
    elif (out / "history.jsonl").exists() and not args.overwrite:
        raise UsageError(
            f"{out} already holds a run; pass --resume to continue it, --overwrite to replace "
            "it, or another --out"
        )
    pairs = resolve_pairs(args.pairs) if args.pairs else None
    nonhack = resolve_pairs(args.nonhack_pairs) if args.nonhack_pairs else None

    env = get_env(args.env, **({"marker_reward": args.marker_reward} if args.env == "toy" else {}))
    try:
        model, tok = load_policy(args)
        check_fits(config, env, tok, model)
        adapter = vhack.wrap(model, targets=args.targets, progress=not args.quiet)
        if args.basis:
            try:
                basis = vhack.HackBasis.load(args.basis, adapter, k=config.k)
            except ValueError as err:
                raise UsageError(
                    f"--basis {args.basis}: {err}; a basis fits only the model it was extracted "
                    "from: extract one for this model (vhack extract) or omit --basis"
                ) from err
        else:
            basis_file = out / "hack_basis.safetensors"
            if args.resume and basis_file.exists():
                basis = vhack.HackBasis.load(basis_file, adapter)
            else:
                pairs = pairs or env.hack_pairs()
                if not pairs:
                    raise UsageError(
                        f"environment {env.name!r} has no hack pairs; pass --basis or --pairs"
                    )
                basis = vhack.extract(
                    adapter, tok, pairs, top_k=config.top_k, n_heldout=0, progress=False
                )
                out.mkdir(parents=True, exist_ok=True)
                basis.save(basis_file)
        if args.overwrite and not args.resume:
            (out / "history.jsonl").unlink(missing_ok=True)
        nonhack = nonhack or (env.nonhack_pairs() if hasattr(env, "nonhack_pairs") else None)
        teacher = getattr(env, "teacher_completion", None)
        if config.teacher_per_group and teacher is None:
            raise UsageError(f"--teacher-per-group: environment {env.name!r} has no teacher")
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
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
        t0 = time.perf_counter()
        bar = tqdm(
            total=config.steps,
            initial=trainer.global_step,
            desc=f"GRPO {config.arm}",
            disable=args.quiet,
            unit="step",
        )
        with bar:
            for record in trainer.steps():
                bar.update(1)
                bar.set_postfix(
                    reward=f"{record['reward']:.2f}",
                    hack=f"{record['hack_rate']:.2f}",
                    solve=f"{record['solve_rate']:.2f}",
                )
        import safetensors.torch

        final = out / "delta.safetensors"
        tmp = final.with_suffix(f".tmp{os.getpid()}")
        safetensors.torch.save_file({n: t.cpu() for n, t in adapter.state_dict().items()}, str(tmp))
        os.replace(tmp, final)
    finally:
        env.close()
    print(
        f"{config.steps} steps ({time.perf_counter() - t0:.1f} s); dS in {final}, log in "
        f"{out / 'history.jsonl'}"
    )
    return 0
