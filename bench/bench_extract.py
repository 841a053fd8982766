"""Hack-basis extraction time: shared (one row per pair, the prompt once, one backward per batch of
pairs), batched (one backward per batch of completions) and auto vs loop (one backward per
completion), on the same model and pairs.

    python bench/bench_extract.py                      # tiny model, CPU, both shipped pair sets
    python bench/bench_extract.py --device cuda --model Qwen/Qwen3-0.6B --dtype bfloat16
    python bench/bench_extract.py --smoke              # seconds; what the test suite runs

Times a whole `vhack.extract` call (gradients, SVDs, orientation) per method and batch size (pairs
per backward for shared, completions for batched), checks that every method gives the loop's
differences D = G_hack - G_clean, and prints PASS/MISS against the target speedup of the best
non-loop setting over the loop (5x), and which method "auto" picked. Writes JSON to --out-dir and a
PNG plot beside it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

import vhack
from vhack.extract import DEFAULT_BATCH_TOKENS, choose_method, encode_many, pair_differences
from vhack.pairs import resolve_pairs

TARGET_SPEEDUP = 5.0
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def bench_pairset(
    adapter, tok, name: str, pairs, batch_sizes, pair_batch_sizes, n_heldout, device, reps
) -> list:
    train = pairs[: len(pairs) - n_heldout]
    items = [(p.prompt, p.hack) for p in train] + [(p.prompt, p.clean) for p in train]
    tokens = sum(len(ids) for ids, _ in encode_many(tok, items))
    # Same differences from every method (float32 summation order aside).
    loop_D = pair_differences(adapter, tok, train, method="loop", progress=False)
    auto = choose_method(adapter, tok, train, "auto")
    rows = []
    # batch size None: as many rows as fit in DEFAULT_BATCH_TOKENS padded tokens (the default).
    settings = [("loop", 1)] + [("batched", b) for b in [*batch_sizes, None]]
    settings += [("shared", b) for b in [*pair_batch_sizes, None]] + [("auto", None)]
    for method, batch_size in settings:
        got = pair_differences(
            adapter, tok, train, method=method, batch_size=batch_size, progress=False
        )
        rel = ((got - loop_D).norm() / loop_D.norm()).item()

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
                "auto_picks": auto if method == "auto" else "",
                "completions": 2 * len(train),
                "tokens": tokens,
                **t,
                "diff_rel_vs_loop": rel,
            }
        )
    loop_ms = rows[0]["median_ms"]
    for row in rows:
        row["speedup_vs_loop"] = loop_ms / row["median_ms"]
        row["setting"] = _label(row)
    return rows


COLORS = {"loop": "tab:gray", "batched": "tab:blue", "shared": "tab:green", "auto": "tab:orange"}


def _label(row: dict) -> str:
    if row["method"] == "loop":
        return "loop"
    if row["method"] == "auto":
        return f"auto ({row['auto_picks']})"
    if row["batch_size"] is None:
        return f"{row['method']} <={DEFAULT_BATCH_TOKENS} tok"
    unit = "pairs" if row["method"] == "shared" else "compl."
    return f"{row['method']} {row['batch_size']} {unit}"


def plot(rows: list, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = list(dict.fromkeys(r["pairset"] for r in rows))
    fig, axes = plt.subplots(1, len(sets), figsize=(5 * len(sets), 3.8), squeeze=False)
    for ax, name in zip(axes[0], sets, strict=True):
        sub = [r for r in rows if r["pairset"] == name]
        labels = [_label(r) for r in sub]
        ms = [r["median_ms"] for r in sub]
        err = [
            [r["median_ms"] - r["p20_ms"] for r in sub],
            [r["p80_ms"] - r["median_ms"] for r in sub],
        ]
        colors = [COLORS[r["method"]] for r in sub]
        bars = ax.bar(labels, ms, yerr=err, color=colors)
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
        ax.tick_params(axis="x", labelrotation=45, labelsize=7)
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
    parser.add_argument(
        "--batch-sizes",
        default="4,8",
        help="completions per backward (batched), besides the default",
    )
    parser.add_argument(
        "--pair-batch-sizes", default="2,5", help="pairs per backward (shared), besides the default"
    )
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
    pair_batch_sizes = [int(b) for b in args.pair_batch_sizes.split(",")]
    reps = args.reps
    n_heldout = 2
    if args.smoke:
        names, batch_sizes, pair_batch_sizes, reps = ["toy"], [4], [2], 1
    rows = []
    for name in names:
        pairs = resolve_pairs(name)
        if args.smoke:
            pairs, n_heldout = pairs[:4], 2
        rows += bench_pairset(
            adapter, tok, name, pairs, batch_sizes, pair_batch_sizes, n_heldout, args.device, reps
        )

    common.print_table(
        rows,
        [
            "pairset",
            "setting",
            "completions",
            "tokens",
            "median_ms",
            "p20_ms",
            "p80_ms",
            "speedup_vs_loop",
            "diff_rel_vs_loop",
        ],
    )
    verdicts = {}
    for name in names:
        sub = [r for r in rows if r["pairset"] == name]
        best = max((r for r in sub if r["method"] != "loop"), key=lambda r: r["speedup_vs_loop"])
        auto = next(r for r in sub if r["method"] == "auto")
        verdicts[name] = "PASS" if best["speedup_vs_loop"] >= TARGET_SPEEDUP else "MISS"
        print(
            f"{name}: best {_label(best)} {best['speedup_vs_loop']:.2f}x, auto ({auto['auto_picks']}) "
            f"{auto['speedup_vs_loop']:.2f}x (target {TARGET_SPEEDUP:g}x): {verdicts[name]}"
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
        f"vhack.extract: shared, batched and auto vs loop, {args.model} on {env['device']}",
    )
    print(f"wrote {path} and {path.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
