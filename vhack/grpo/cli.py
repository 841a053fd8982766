"""The `vhack demo` and `vhack train` subcommands (registered by vhack/cli.py)."""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from vhack.errors import UsageError
from vhack.grpo.config import ARMS, GRPOConfig
from vhack.grpo.demo import DEMO_ARMS

__all__ = ["add_demo_parser", "add_train_parser"]


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None


def _name_list(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


# ---------------------------------------------------------------------------------------------
# vhack demo
# ---------------------------------------------------------------------------------------------


def _cmd_demo(args: argparse.Namespace) -> int:
    """Warm-start the tiny model on the toy world (reverse a word; the grader also pays the
    marker " PASS" and a held-out marker " DONE" that no hack pair contains), extract and
    validate a hack basis, then run GRPO in every arm over several seeds (parallel processes,
    one torch thread each) and evaluate each final policy on held-out prompts. Prints the
    verdict and the tables; writes summary.json, history.jsonl, hack_rate.png, tradeoff.png and
    report.md to --out."""
    from vhack.grpo.demo import DemoSettings, format_table, run_demo

    overrides = {
        key: value
        for key, value in (
            ("seeds", args.seeds),
            ("arms", args.arms),
            ("steps", args.steps),
            ("warm_steps", args.warm_steps),
            ("marker_reward", args.marker_reward),
            ("workers", args.workers),
        )
        if value is not None
    }
    if args.no_validate:
        overrides["validate"] = False
    if args.no_cache:
        overrides["cache"] = False
    settings = DemoSettings.quick(**overrides) if args.quick else DemoSettings(**overrides)
    settings.check()
    summary = run_demo(args.out, settings, progress=not args.quiet)
    print()
    print(format_table(summary))
    print(
        f"\nstart = step 0; end = mean of the last {summary['end_window']} steps; mean ± sd over "
        f"seeds {list(settings.seeds)}; held: end rate < {summary['held_below']} (k/n runs, "
        "Wilson 95 % interval). energy removed: fraction of |g|^2 the arm's projection removed; "
        "cin_hack: hack-ward cin of the gradient the optimizer received.\n"
    )
    print(summary["verdict"])
    out = Path(args.out)
    print(
        f"{summary['wall_seconds']:.0f} s; wrote {out / 'summary.json'}, {out / 'history.jsonl'}, "
        f"{out / 'hack_rate.png'}, {out / 'report.md'}"
    )
    return 0


def add_demo_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "demo",
        help="the toy reward-hacking world: GRPO hacks, the projector holds it down (CPU, minutes)",
        description=_cmd_demo.__doc__,
    )
    p.add_argument("--out", default="vhack-demo", help="output directory (default ./vhack-demo)")
    p.add_argument(
        "--quick", action="store_true", help="1 seed, arms vanilla and projected, 30 steps (CI)"
    )
    p.add_argument("--seeds", type=_int_list, default=None, help="e.g. 0,1,2 (default 0-7)")
    p.add_argument(
        "--arms",
        type=_name_list,
        default=None,
        help=f"comma-separated, from {','.join(ARMS)} (default {','.join(DEMO_ARMS)})",
    )
    p.add_argument("--steps", type=int, default=None, help="GRPO steps per run (default 100)")
    p.add_argument(
        "--warm-steps", type=int, default=None, help="SFT warm-start steps (default 400)"
    )
    p.add_argument(
        "--marker-reward",
        type=float,
        default=None,
        help="what the grader pays for ' PASS' or ' DONE' (1.2)",
    )
    p.add_argument(
        "--workers", type=int, default=None, help="processes (default and most: the CPU cores)"
    )
    p.add_argument("--no-validate", action="store_true", help="skip the basis validation tests")
    p.add_argument("--no-cache", action="store_true", help="do not reuse cached warm starts")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_demo)
    return p


# ---------------------------------------------------------------------------------------------
# vhack train
# ---------------------------------------------------------------------------------------------


def _load_policy(args):
    """(model, tokenizer) for --model: "toy" (the demo's warm-started tiny model), "tiny", a hub
    name or a local path."""
    import torch

    import vhack

    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if args.model == "toy":
        from vhack.grpo.demo import DemoSettings
        from vhack.grpo.warmstart import warm_model

        settings = DemoSettings(marker_reward=args.marker_reward)
        cache = vhack.cache.cache_dir() / "toy-warm"
        path = cache / f"seed{args.seed}-{settings.warm_key(args.seed)}.safetensors"
        model, tok, _ = warm_model(settings, args.seed, path)
    else:
        try:
            model, tok = vhack.models.load(args.model, seed=args.seed, dtype=dtypes.get(args.dtype))
        except OSError as err:
            raise UsageError(f"cannot load model {args.model!r}: {err}") from err
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device), tok


def _cmd_train(args: argparse.Namespace) -> int:
    """GRPO on a wrapped model's dS in one arm, with checkpoints (dS, optimizer, RNG, step) every
    --checkpoint-every steps and --resume to continue a run exactly where it stopped."""
    from tqdm.auto import tqdm

    import vhack
    from vhack.grpo.envs import ENV_NAMES, get_env
    from vhack.grpo.trainer import GRPOTrainer, check_fits, latest_checkpoint
    from vhack.pairs import resolve_pairs

    # ---- everything that can be checked before loading anything ----
    config = GRPOConfig(
        arm=args.arm,
        steps=args.steps,
        prompts_per_step=args.prompts_per_step,
        num_generations=args.group_size,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        lr=args.lr,
        beta=args.beta,
        num_iterations=args.num_iterations,
        scale_rewards=args.scale_rewards,
        max_grad_norm=args.max_grad_norm,
        k=args.k,
        top_k=max(args.top_k, args.k),
        refresh_every=args.refresh_every,
        seed=args.seed,
        checkpoint_every=args.checkpoint_every,
        teacher_per_group=args.teacher_per_group,
    )
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
        model, tok = _load_policy(args)
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


def add_train_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "train",
        help="GRPO on a model's dS in one arm (checkpoints, resume); for GPUs and the toy world",
        description=_cmd_train.__doc__,
    )
    p.add_argument(
        "--model",
        default="toy",
        help="'toy' (the demo's warm-started tiny model, default), 'tiny', a hub name or a path",
    )
    p.add_argument("--env", default="toy", help="environment: toy (default) or code")
    p.add_argument(
        "--arm", default="projected", help=f"one of {', '.join(ARMS)} (default projected)"
    )
    p.add_argument("--basis", default=None, help="hack basis file (default: extract from pairs)")
    p.add_argument("--pairs", default=None, help="pairs to extract from (default: the env's)")
    p.add_argument("--nonhack-pairs", default=None, help="control pairs for arm nonhack-v")
    p.add_argument("--targets", default="all-linear", help="Linears to wrap (default all-linear)")
    p.add_argument("--out", default="vhack-train", help="run directory (default ./vhack-train)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    p.add_argument("--checkpoint-every", type=int, default=25, help="steps (0: never; default 25)")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--prompts-per-step", type=int, default=8)
    p.add_argument("--group-size", type=int, default=8, help="completions per prompt (>= 2)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: the env's")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--beta", type=float, default=0.0, help="KL weight (K3, to dS = 0)")
    p.add_argument("--num-iterations", type=int, default=1)
    p.add_argument("--scale-rewards", default="none", help="none (Dr.GRPO) or group (GRPO)")
    p.add_argument("--max-grad-norm", type=float, default=None)
    p.add_argument("--k", type=int, default=6, help="axes per module projected (default 6)")
    p.add_argument("--top-k", type=int, default=6, help="axes extracted per module (default 6)")
    p.add_argument("--refresh-every", type=int, default=25, help="arm refresh: steps between")
    p.add_argument("--marker-reward", type=float, default=1.2, help="toy env: marker reward")
    p.add_argument(
        "--teacher-per-group",
        type=int,
        default=0,
        help="completions per group taken from the env's hacking teacher; logs cin_s / cin_t",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (real models)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_train)
    return p
