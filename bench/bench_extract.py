"""Hack-basis extraction time: batched (one backward per batch of completions, per-segment dS
reduction) vs loop (one backward per completion), on the same model and pairs.

    python bench/bench_extract.py                      # tiny model, CPU, both shipped pair sets
    python bench/bench_extract.py --device cuda --model Qwen/Qwen3-0.6B --dtype bfloat16
    python bench/bench_extract.py --smoke              # seconds; what the test suite runs

Times a whole `vhack.extract` call (gradients, SVDs, orientation) per method and batch size, checks
that both methods give the same gradients, and prints PASS/MISS against the target speedup of the
best batched setting over the loop (5x). Writes JSON to --out-dir and a PNG plot beside it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

import vhack
from vhack.extract import encode, pair_gradients
from vhack.pairs import resolve_pairs

TARGET_SPEEDUP = 5.0
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _tokens(tok, pairs) -> int:
    return sum(len(encode(tok, p.prompt, c)[0]) for p in pairs for c in (p.hack, p.clean))


def bench_pairset(adapter, tok, name: str, pairs, batch_sizes, n_heldout, device, reps) -> list:
    train = pairs[: len(pairs) - n_heldout]
    # Same gradients from both methods (float32 summation order aside).
    loop_h, _ = pair_gradients(adapter, tok, train, method="loop", progress=False)
    rows = []
    settings = [("loop", 1)] + [("batched", b) for b in batch_sizes]
    for method, batch_size in settings:
        got_h, _ = pair_gradients(
            adapter, tok, train, method=method, batch_size=batch_size, progress=False
        )
        rel = ((got_h - loop_h).norm() / loop_h.norm()).item()

        def run(method=method, batch_size=batch_size):
            vhack.extract(
                adapter,
                tok,
                pairs,
                n_heldout=n_heldout,
                method=method,
                batch_size=batch_size,
                progress=False,
            )

        t = common.time_ms(run, device, warmup=1, reps=reps, min_time_s=0.0)
        rows.append(
            {
                "pairset": name,
                "method": method,
                "batch_size": batch_size,
                "completions": 2 * len(train),
                "tokens": _tokens(tok, train),
                **t,
                "grad_rel_diff_vs_loop": rel,
            }
        )
    loop_ms = rows[0]["median_ms"]
    for row in rows:
        row["speedup_vs_loop"] = loop_ms / row["median_ms"]
    return rows


def plot(rows: list, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = list(dict.fromkeys(r["pairset"] for r in rows))
    fig, axes = plt.subplots(1, len(sets), figsize=(5 * len(sets), 3.8), squeeze=False)
    for ax, name in zip(axes[0], sets, strict=True):
        sub = [r for r in rows if r["pairset"] == name]
        labels = [r["method"] if r["method"] == "loop" else f"batch {r['batch_size']}" for r in sub]
        ms = [r["median_ms"] for r in sub]
        err = [
            [r["median_ms"] - r["p20_ms"] for r in sub],
            [r["p80_ms"] - r["median_ms"] for r in sub],
        ]
        bars = ax.bar(labels, ms, yerr=err, color=["tab:gray"] + ["tab:blue"] * (len(sub) - 1))
        for bar, r in zip(bars, sub, strict=True):
            ax.annotate(
                f"{r['speedup_vs_loop']:.2f}x",
                (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                ha="center",
                va="bottom",
                fontsize=8,
            )
        ax.set_title(f"{name}: {sub[0]['completions']} completions, {sub[0]['tokens']} tokens")
        ax.set_ylabel("extract() time [ms]")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--model", default="tiny", help="'tiny', a hub name or a local path")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None)
    parser.add_argument("--pairs", default="coding,toy", help="comma-separated pair sets/files")
    parser.add_argument("--batch-sizes", default="4,8,20")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, seconds")
    parser.add_argument("--out-dir", default=str(common.RESULTS_DIR))
    parser.add_argument("--note", default="", help="free text stored with the results")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tok = vhack.models.load(args.model, dtype=DTYPES.get(args.dtype))
    adapter = vhack.wrap(model.to(args.device), progress=False)
    names = args.pairs.split(",")
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    reps = args.reps
    n_heldout = 2
    if args.smoke:
        names, batch_sizes, reps = ["toy"], [4], 1
    rows = []
    for name in names:
        pairs = resolve_pairs(name)
        if args.smoke:
            pairs, n_heldout = pairs[:4], 2
        rows += bench_pairset(adapter, tok, name, pairs, batch_sizes, n_heldout, args.device, reps)

    common.print_table(
        rows,
        [
            "pairset",
            "method",
            "batch_size",
            "completions",
            "tokens",
            "median_ms",
            "p20_ms",
            "p80_ms",
            "speedup_vs_loop",
            "grad_rel_diff_vs_loop",
        ],
    )
    verdicts = {}
    for name in names:
        best = max(
            r["speedup_vs_loop"] for r in rows if r["pairset"] == name and r["method"] == "batched"
        )
        verdicts[name] = "PASS" if best >= TARGET_SPEEDUP else "MISS"
        print(
            f"{name}: best batched speedup {best:.2f}x (target {TARGET_SPEEDUP:g}x): {verdicts[name]}"
        )

    env = common.environment(args.device)
    env["model"] = args.model
    common.RESULTS_DIR = Path(args.out_dir)
    notes = f"target speedup {TARGET_SPEEDUP:g}x; verdicts {verdicts}. {args.note}".strip()
    path = common.write_results(
        "bench_extract" + ("-smoke" if args.smoke else ""), env, rows, notes
    )
    plot(
        rows,
        path.with_suffix(".png"),
        f"vhack.extract batched vs loop, {args.model} on {env['device']}",
    )
    print(f"wrote {path} and {path.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
