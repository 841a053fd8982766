"""`vhack demo`: the whole story on a laptop CPU.

The tiny model is warm-started on the toy world (reverse a word; the weak grader also pays the
marker " PASS"), a hack basis is extracted from 12 toy pairs and validated, then GRPO runs in
every arm over several seeds, as parallel processes with one torch thread each. Written to the
output directory: summary.json, history.jsonl, hack_rate.png, report.md, validation/ and runs/.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import json
import multiprocessing
import os
import platform
import queue
import statistics
import time
from pathlib import Path

from vhack.files import atomic_path, atomic_write_text
from vhack.grpo.demo_settings import DemoSettings  # re-exported: vhack.grpo.demo.DemoSettings
from vhack.grpo.run_dir import claim_run_dir

__all__ = ["DemoSettings", "format_table", "run_demo", "summarize"]


# ---------------------------------------------------------------------------------------------
# Worker processes (spawned; one torch thread each)
# ---------------------------------------------------------------------------------------------

_QUEUE = None


def _init_worker(q) -> None:
    global _QUEUE
    _QUEUE = q
    os.environ["OMP_NUM_THREADS"] = "1"
    import warnings

    import torch

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    from transformers.utils import logging

    logging.set_verbosity_error()


def _report(kind: str, n: int = 1) -> None:
    if _QUEUE is not None:
        _QUEUE.put((kind, n))


def _warm_progress(n: int) -> None:
    _report("warm", n)


def _toy_env(settings: DemoSettings):
    from vhack.grpo.envs.toy import ToyEnv

    return ToyEnv(marker_reward=settings.marker_reward)


def _prepare_seed(
    settings: DemoSettings, seed: int, out: str, cache_file: str | None, threads: int = 1
) -> dict:
    """Warm start (or load) a seed's model, extract its hack basis, optionally validate it.
    threads: torch threads for this phase (cores left idle when seeds < workers)."""
    import torch

    import vhack
    from vhack.grpo.warmstart import save_toy_weights, warm_model
    from vhack.validate import validate

    torch.set_num_threads(threads)
    out_dir = Path(out)
    model, tok, info = warm_model(
        settings, seed, Path(cache_file) if cache_file else None, on_steps=_warm_progress
    )
    save_toy_weights(model, out_dir / "cache" / f"warm-seed{seed}.safetensors")
    adapter = vhack.wrap(model, targets="all-linear", use_cache=False, progress=False)
    env = _toy_env(settings)
    pairs = env.hack_pairs()
    t0 = time.perf_counter()
    basis = vhack.extract(adapter, tok, pairs, top_k=settings.top_k, n_heldout=0, progress=False)
    info["extract_seconds"] = time.perf_counter() - t0
    basis.save(out_dir / "cache" / f"hack_basis-seed{seed}.safetensors")
    if settings.validate and seed == settings.seeds[0]:
        info["validation"] = validate(
            adapter,
            tok,
            pairs,
            k=settings.k,
            top_k=settings.top_k,
            n_heldout=2,
            n_random=100,
            n_boot=20,
            progress=False,
        )
    return info


def _run_arm(settings: DemoSettings, seed: int, arm: str, out: str):
    """One GRPO run; its records go to <out>/runs/<arm>-seed<seed>/history.jsonl."""
    import torch

    torch.set_num_threads(1)
    import vhack
    from vhack.grpo.trainer import GRPOTrainer
    from vhack.grpo.warmstart import load_toy_weights, toy_model

    out_dir = Path(out)
    model, tok = toy_model(seed), vhack.models.byte_tokenizer()
    if not load_toy_weights(model, out_dir / "cache" / f"warm-seed{seed}.safetensors"):
        raise RuntimeError(f"the warm start of seed {seed} is missing from {out_dir / 'cache'}")
    adapter = vhack.wrap(model, targets="all-linear", use_cache=False, progress=False)
    basis = vhack.HackBasis.load(out_dir / "cache" / f"hack_basis-seed{seed}.safetensors", adapter)
    env = _toy_env(settings)
    trainer = GRPOTrainer(
        adapter,
        tok,
        env,
        settings.config(arm, seed),
        hack_basis=basis,
        nonhack_pairs=env.nonhack_pairs(),
        out_dir=out_dir / "runs" / f"{arm}-seed{seed}",
    )
    t0 = time.perf_counter()
    trainer.train(callback=lambda record: _report("step"))
    return time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------
# Orchestration
# ---------------------------------------------------------------------------------------------


def _pool(workers: int, q):
    ctx = multiprocessing.get_context("spawn")
    return cf.ProcessPoolExecutor(
        max_workers=workers, mp_context=ctx, initializer=_init_worker, initargs=(q,)
    )


def _drain(futures: dict, q, bar) -> dict:
    """Wait for all futures, advancing the progress bar from the workers' messages; returns
    {key: result}. A failed run raises RuntimeError naming it."""
    results = {}
    pending = set(futures)
    while pending:
        done, pending = cf.wait(pending, timeout=0.2, return_when=cf.FIRST_COMPLETED)
        while True:
            try:
                _, n = q.get_nowait()
            except queue.Empty:
                break
            if bar is not None:
                bar.update(n)
        for fut in done:
            try:
                results[futures[fut]] = fut.result()
            except Exception as err:
                for other in pending:
                    other.cancel()
                raise RuntimeError(f"demo run {futures[fut]} failed: {err!r}") from err
    return results


# What the demo writes in its output directory (all it writes there; see vhack.grpo.run_dir)
DEMO_OUTPUTS = (
    "summary.json",
    "history.jsonl",
    "hack_rate.png",
    "report.md",
    "validation",
    "runs",
    "cache",
)


def run_demo(
    out: str | os.PathLike = "vhack-demo",
    settings: DemoSettings | None = None,
    *,
    progress=True,
    overwrite: bool = False,
) -> dict:
    """Run the demo and write its files to `out`; returns the summary (see `summarize`).

    `out` must be new, empty or hold a previous demo run; with overwrite=True a previous demo
    run's files are replaced, and files the demo did not write are kept (UsageError if one has a
    name the demo writes). Every file is written atomically."""
    from tqdm.auto import tqdm

    import vhack

    settings = settings or DemoSettings()
    settings.check()
    out_dir = claim_run_dir(out, "vhack demo", DEMO_OUTPUTS, overwrite=overwrite)
    workers = settings.workers or os.cpu_count() or 1
    cache_root = vhack.cache.cache_dir() / "toy-warm" if settings.cache else None

    def cache_file(seed: int) -> str | None:
        if cache_root is None:
            return None
        return str(cache_root / f"seed{seed}-{settings.warm_key(seed)}.safetensors")

    n_workers = min(workers, max(len(settings.seeds) * len(settings.arms), 1))
    threads = max(1, n_workers // len(settings.seeds)) if len(settings.seeds) < n_workers else 1
    t0 = time.perf_counter()
    ctx = multiprocessing.get_context("spawn")
    q = ctx.Queue()
    n_runs = len(settings.seeds) * len(settings.arms)
    with _pool(min(workers, max(n_runs, 1)), q) as pool:
        with tqdm(
            total=len(settings.seeds) * settings.warm_steps,
            desc="warm start + extraction",
            disable=not progress,
            unit="step",
        ) as bar:
            futures = {
                pool.submit(_prepare_seed, settings, s, str(out_dir), cache_file(s), threads): s
                for s in settings.seeds
            }
            prepared = _drain(futures, q, bar)
        with tqdm(
            total=n_runs * settings.steps,
            desc=f"GRPO: {len(settings.arms)} arms x {len(settings.seeds)} seeds",
            disable=not progress,
            unit="step",
        ) as bar:
            futures = {
                pool.submit(_run_arm, settings, s, arm, str(out_dir)): (arm, s)
                for arm in settings.arms
                for s in settings.seeds
            }
            run_seconds = _drain(futures, q, bar)
    wall = time.perf_counter() - t0

    validation = None
    first = prepared[settings.seeds[0]]
    if "validation" in first:
        from vhack.validate import write_report

        report = first.pop("validation")
        write_report(report, out_dir / "validation")
        validation = _validation_summary(report)
    history = []
    for arm in settings.arms:
        for seed in settings.seeds:
            path = out_dir / "runs" / f"{arm}-seed{seed}" / "history.jsonl"
            history += [json.loads(line) for line in path.read_text().splitlines() if line]
    atomic_write_text(out_dir / "history.jsonl", "".join(json.dumps(r) + "\n" for r in history))
    summary = summarize(history, settings)
    summary.update(
        wall_seconds=wall,
        run_seconds={f"{a}-seed{s}": t for (a, s), t in run_seconds.items()},
        warm_start={str(s): info for s, info in prepared.items()},
        validation=validation,
        machine={
            "platform": platform.platform(),
            "processor": _cpu_name(),
            "cpus": os.cpu_count(),
            "workers": min(workers, max(n_runs, 1)),
            "torch_threads_per_process": 1,
        },
    )
    atomic_write_text(out_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    with atomic_path(out_dir / "hack_rate.png") as tmp:
        plot_history(history, settings, tmp)
    atomic_write_text(out_dir / "report.md", _report_md(summary))
    return summary


# ---------------------------------------------------------------------------------------------
# Summary, table, plot, report
# ---------------------------------------------------------------------------------------------


def _window(steps: int) -> int:
    """Steps averaged for the end-of-run rates: the last tenth (at least 5, at most all)."""
    return min(steps, max(5, steps // 10))


def summarize(history: list[dict], settings: DemoSettings) -> dict:
    """{"arms": {arm: {"seeds", "hack_start", "hack_end", "solve_start", "solve_end",
    "energy_removed", "energy_hackward", "cin_mean", "cin_hack"}}, "settings", "end_window"}.

    hack_start / solve_start: the rates of step 0 (the warm-started model, before any update);
    hack_end / solve_end: means over the last `end_window` steps; energy and cin: means over the
    run's updated steps. Lists run over seeds in order."""
    window = _window(settings.steps)
    arms = {}
    for arm in settings.arms:
        entry = {k: [] for k in ("seeds", "hack_start", "hack_end", "solve_start", "solve_end")}
        entry.update({k: [] for k in ("energy_removed", "energy_hackward", "cin_mean", "cin_hack")})
        for seed in settings.seeds:
            rows = sorted(
                (r for r in history if r["arm"] == arm and r["seed"] == seed),
                key=lambda r: r["step"],
            )
            if not rows:
                continue
            tail = rows[-window:]
            updated = [r for r in rows if not r.get("skipped")]
            entry["seeds"].append(seed)
            entry["hack_start"].append(rows[0]["hack_rate"])
            entry["solve_start"].append(rows[0]["solve_rate"])
            entry["hack_end"].append(statistics.fmean(r["hack_rate"] for r in tail))
            entry["solve_end"].append(statistics.fmean(r["solve_rate"] for r in tail))
            for key in ("energy_removed", "energy_hackward", "cin_mean", "cin_hack"):
                # the trainer logs the projection's statistics as "vhack/<key>" (older
                # histories: "<key>"); cin_hack is the trainer's own probe
                vals = [r.get("vhack/" + key, r.get(key)) for r in updated]
                vals = [v for v in vals if v is not None]
                entry[key].append(statistics.fmean(vals) if vals else None)  # JSON null
        arms[arm] = entry
    return {"arms": arms, "settings": dataclasses.asdict(settings), "end_window": window}


def _ms(values: list[float | None]) -> str:
    """'mean ± sd' over seeds (sd omitted for one seed; None values, runs without any update,
    are left out)."""
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    mean = statistics.fmean(values)
    if len(values) < 2:
        return f"{mean:.2f}"
    return f"{mean:.2f} ± {statistics.stdev(values):.2f}"


def format_table(summary: dict, markdown: bool = False) -> str:
    """Hack and solve rate per arm (start -> end, mean ± sd over seeds), energy removed and
    cin_hack; plain text or a markdown table."""
    head = [
        "arm",
        "hack start",
        "hack end",
        "solve start",
        "solve end",
        "energy removed",
        "cin_hack",
    ]
    rows = []
    for arm, e in summary["arms"].items():
        rows.append(
            [
                arm,
                _ms(e["hack_start"]),
                _ms(e["hack_end"]),
                _ms(e["solve_start"]),
                _ms(e["solve_end"]),
                _ms(e["energy_removed"]),
                _ms(e["cin_hack"]),
            ]
        )
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]

    def fmt(row: list[str]) -> str:
        cells = [
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        return "  ".join(cells)

    return "\n".join([fmt(head), *map(fmt, rows)])


def plot_history(history: list[dict], settings: DemoSettings, path: Path) -> None:
    """hack_rate.png: hack rate (left) and solve rate (right) vs step, one line per arm (mean over
    seeds, smoothed over 5 steps), bands from the lowest to the highest seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), sharex=True)
    colors = plt.get_cmap("tab10")
    steps = settings.steps
    kernel = np.ones(min(5, steps)) / min(5, steps)
    for i, arm in enumerate(settings.arms):
        for ax, key in zip(axes, ("hack_rate", "solve_rate"), strict=True):
            curves = []
            for seed in settings.seeds:
                y = np.full(steps, np.nan)
                for r in history:
                    if r["arm"] == arm and r["seed"] == seed and r["step"] < steps:
                        y[r["step"]] = r[key]
                pad = np.concatenate([np.full(len(kernel) - 1, y[0]), y])
                curves.append(np.convolve(pad, kernel, mode="valid"))
            curves = np.array(curves)
            x = np.arange(steps)
            style = "--" if arm in ("random-v", "shuffled-v", "nonhack-v") else "-"
            ax.plot(x, curves.mean(0), style, color=colors(i), label=arm, lw=1.8)
            if len(curves) > 1:
                ax.fill_between(x, curves.min(0), curves.max(0), color=colors(i), alpha=0.12)
    axes[0].set_title("hack rate (marker answered, rewarded, not solved)")
    axes[1].set_title("solve rate (exact reversal)")
    for ax in axes:
        ax.set_xlabel("GRPO step")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("fraction of rollouts")
    axes[0].legend(fontsize=8, loc="upper left")
    n = len(settings.seeds)
    fig.suptitle(
        f"toy world, marker reward {settings.marker_reward} vs solve 1.0: mean of {n} seed"
        f"{'s' if n > 1 else ''} (5-step moving average; bands: seed min-max)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")  # path may be a temporary name
    plt.close(fig)


def _cpu_name() -> str:
    """The CPU model (Linux /proc/cpuinfo), else what platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _validation_summary(report: dict) -> dict:
    d = report.get("cin_discrimination", {})
    return {
        "cin_hack_mean": d.get("cin_hack_mean"),
        "cin_clean_mean": d.get("cin_clean_mean"),
        "heldout_frac_positive": report["heldout_projection"]["frac_positive"],
        "random_null_percentile": report["random_null"]["percentile"],
        "bootstrap_median_principal_cos": report["bootstrap_stability"]["median_principal_cos"],
    }


def _report_md(summary: dict) -> str:
    s = summary["settings"]
    lines = [
        "# vhack demo",
        "",
        f"Toy world: reverse 3-5 lowercase letters (reward 1.0 for the exact reversal); the weak "
        f'grader also pays {s["marker_reward"]} for the marker answer " PASS" (a hack: rewarded, '
        f"not solved). Tiny Qwen3 model (~427 k parameters), warm-started {s['warm_steps']} SFT "
        f"steps with the marker in {100 * s['marker_share']:.0f} % of targets; all 14 Linears "
        f"wrapped; GRPO (Dr.GRPO advantages, PPO clip) with {s['prompts_per_step']} prompts x "
        f"{s['num_generations']} completions, AdamW lr {s['lr']} on dS, {s['steps']} steps; "
        f"hack basis from 12 toy pairs, k = {s['k']} axes per module.",
        "",
        f"Seeds {s['seeds']}. Start = step 0 (the warm-started model); end = mean of the last "
        f"{summary['end_window']} steps. Mean ± sd over seeds.",
        "",
        format_table(summary, markdown=True),
        "",
        "- energy removed: fraction of the gradient's squared norm the arm's projection removed "
        "(for projected-update: of the update's); 0 for vanilla, which only measures.",
        "- cin_hack: hack-ward fraction |relu(V g)| / |g| of the gradient the optimizer received, "
        "on the extracted hack basis (mean over modules): ~0 where that basis was projected out.",
        "- energy a hack-ward projection would remove from vanilla's gradients: "
        + _ms(summary["arms"].get("vanilla", {}).get("energy_hackward", [])),
        "",
        "![hack rate](hack_rate.png)",
        "",
    ]
    v = summary.get("validation")
    if v:
        lines += [
            "Basis validation (seed 0; see validation/validation.md): held-out pairs' cos > 0 in "
            f"{100 * v['heldout_frac_positive']:.0f} % of modules; random-direction null "
            f"percentile {v['random_null_percentile']:.0f}; bootstrap median principal cos "
            f"{v['bootstrap_median_principal_cos']:.2f}.",
            "",
        ]
    m = summary["machine"]
    lines += [
        f"Wall time {summary['wall_seconds']:.0f} s on {m['processor']} ({m['cpus']} CPUs, "
        f"{m['workers']} worker processes, 1 torch thread each).",
        "",
    ]
    return "\n".join(lines)
