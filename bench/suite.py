"""The benchmark suite behind `vhack bench`: run the projection, SVD-linear and extraction scripts
on one device, one after the other, then write one summary (JSON and PNG) of their ratios, compared
with the newest stored result of the same benchmark on the same device in bench/results/.

Each script runs in its own process, as `python bench/<script>.py ... --out-dir OUT`, and writes its
own JSON and plot there as it always has; it imports the vhack that runs `vhack bench` (its
directory goes first on PYTHONPATH). TRITON_INTERPRET is removed from their environment: the
interpreter is a correctness tool, never timed; on CPU the scripts time the CPU providers.

The summary, OUT/bench[-quick]-<device>-<date>.json:
  env          device, versions and date (from the scripts' own files), threads, load
  benchmarks   per benchmark: its result file, exit status, seconds, the load average before and
               after, and "ratios": a flat {name: value} of what it measured against its
               reference (the eager loop, dense nn.Linear, the per-completion loop) and against
               torch.compile where that ran
  comparison   per benchmark: the stored file it was compared with, and per ratio (now, stored,
               now / stored); none when bench/results holds no result of that device

    vhack bench [--quick] [--device cpu|cuda] [--only project,svd_linear,extract] [--out-dir DIR]
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
# name -> (script, the name its result files start with)
BENCHMARKS = {
    "project": ("bench_project.py", "project"),
    "svd_linear": ("bench_svd_linear.py", "bench_svd_linear"),
    "extract": ("bench_extract.py", "bench_extract"),
}


@dataclass
class SuiteOptions:
    """What `vhack bench` asks for (its --help documents each)."""

    device: str
    quick: bool
    only: tuple[str, ...]
    out_dir: Path
    ks: tuple[int, ...]
    reps: int | None
    threads: int | None
    compare: bool
    compile: bool = True


# ---- running the scripts --------------------------------------------------------------------


def script_args(name: str, opts: SuiteOptions) -> list[str]:
    """The command-line arguments of benchmark `name` for these options."""
    args = ["--device", opts.device, "--out-dir", str(opts.out_dir)]
    if opts.quick:
        args.append("--smoke")
    if name == "project":
        args += ["--ks", ",".join(str(k) for k in opts.ks)]
    if name in ("project", "svd_linear") and not opts.compile:
        args.append("--no-compile")
    if opts.reps is not None:
        args += ["--reps", str(opts.reps)]
    return args


def script_env(threads: int | None) -> dict[str, str]:
    """The scripts' environment: the running vhack first on PYTHONPATH, no TRITON_INTERPRET, and
    OMP_NUM_THREADS when threads are given."""
    import vhack

    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    root = str(Path(vhack.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def load_average() -> float | None:
    """The 1-minute load average (None where the OS has none)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def run_script(name: str, opts: SuiteOptions, bench_dir: Path) -> dict:
    """Run one benchmark, its output passed through; returns its record (file, rc, seconds, load)."""
    script = bench_dir / BENCHMARKS[name][0]
    cmd = [sys.executable, str(script), *script_args(name, opts)]
    print(f"\n== {name}: {' '.join(cmd[1:])}", flush=True)
    record: dict = {"command": cmd[1:], "load_before": load_average()}
    t0 = time.perf_counter()
    lines = []
    with subprocess.Popen(
        cmd,
        env=script_env(opts.threads),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
    ) as proc:
        for line in proc.stdout:
            print(line, end="", flush=True)
            lines.append(line)
    record.update(rc=proc.returncode, wall_s=time.perf_counter() - t0, load_after=load_average())
    written = re.findall(r"wrote (\S+\.json)", "".join(lines))
    if proc.returncode == 0 and written:
        record["file"] = written[-1]
    else:
        record["error"] = "".join(lines[-15:]).strip() or f"exit status {proc.returncode}"
    return record


# ---- what each benchmark measured, as ratios --------------------------------------------------


def project_ratios(data: dict) -> dict[str, float]:
    """Per k and provider: speedup over the eager loop, over the best torch.compile of it (when
    compiled), and time over the bytes-moved floor (all cold, after the cache flush)."""
    out = {}
    rows = [r for r in data["rows"] if "net_ms" in r]
    for k in sorted({r["k"] for r in rows}, reverse=True):
        sub = [r for r in rows if r["k"] == k]
        compiled = [r["net_ms"] for r in sub if r["provider"].startswith("compiled")]
        for r in sub:
            key = f"k={k}/{r['provider']}"
            out[f"{key}/vs_eager"] = r["speedup_vs_eager"]
            if compiled:
                out[f"{key}/vs_compiled"] = min(compiled) / r["net_ms"]
            # the floor measured by a streaming pass in the same run (bench_project since
            # 2026-12-03); older files hold only the bandwidth estimate, under x_floor
            out[f"{key}/x_bytes_floor"] = r.get("x_stream_floor", r.get("x_floor"))
    return out


def svd_linear_ratios(data: dict) -> dict[str, float]:
    """Per shape: SVDLinear over dense (forward, forward+backward; the merge excluded, and
    amortised per tokens/step), the eager factored path (and its torch.compile, when run) over
    SVDLinear, and the FLOP floor of forward+backward over dense (fwd + dX + dS against fwd + dX +
    dW FLOPs: (2 + r (d_in + d_out) / (d_in d_out)) / 3)."""
    summary = next(r["summary"] for r in data["rows"] if r.get("phase") == "summary")
    out = {}
    for shape, s in summary.items():
        if shape.startswith("_"):
            continue
        for key in ("fwd_ratio", "train_ratio", "eager_speedup", "fused_train_ratio",
                    "compiled_speedup", "merge_over_fwd"):  # fmt: skip
            if s.get(key) is not None:
                out[f"{shape}/{key}"] = s[key]
        out[f"{shape}/train_flop_floor"] = (2 + s["ds_floor_vs_dw"]) / 3
        for a in s["amortised"]:
            for key in ("fwd_ratio", "train_ratio", "eager_speedup"):
                out[f"{shape}/{a['tokens_per_step']} tokens per step/{key}"] = a[key]
    return out


def extract_ratios(data: dict) -> dict[str, float]:
    """Per pair set and setting: speedup of vhack.extract over the per-completion loop."""
    return {f"{r['pairset']}/{r['setting']}/vs_loop": r["speedup_vs_loop"] for r in data["rows"]}


RATIOS = {"project": project_ratios, "svd_linear": svd_linear_ratios, "extract": extract_ratios}


# ---- stored results ---------------------------------------------------------------------------


def stored_results(results_dir: Path, name: str, quick: bool) -> list[tuple[Path, dict]]:
    """Every readable result file of benchmark `name` in results_dir (quick: its smoke files)."""
    prefix = BENCHMARKS[name][1] + ("-smoke-" if quick else "-")
    found = []
    for path in sorted(results_dir.glob(f"{prefix}*.json")):
        if not quick and path.name.startswith(BENCHMARKS[name][1] + "-smoke-"):
            continue
        try:
            data = json.loads(path.read_text())
            data["env"]["device"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        found.append((path, data))
    return found


def compare(name: str, now: dict, stored: list[tuple[Path, dict]]) -> dict | None:
    """The newest stored result of the same device (and device type), ratio by ratio; None when
    there is none."""
    same = [(p, d) for p, d in stored if d["env"]["device"] == now["env"]["device"]]
    same = [(p, d) for p, d in same if d["env"].get("device_type") == now["env"]["device_type"]]
    if not same:
        return None
    path, old = max(same, key=lambda item: item[1]["env"].get("date", ""))
    try:
        before = RATIOS[name](old)
    except (KeyError, TypeError, StopIteration):  # an older file layout
        return {"file": str(path), "date": old["env"].get("date"), "error": "unreadable layout"}
    after = RATIOS[name](now)
    rows = {
        key: {"now": after[key], "stored": before[key], "now_over_stored": after[key] / before[key]}
        for key in after
        if before.get(key)
    }
    return {"file": str(path), "date": old["env"].get("date"), "ratios": rows}


# ---- the summary ------------------------------------------------------------------------------


def _load(value: float | None) -> str:
    return "?" if value is None else f"{value:.1f}"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()[:40]


def plot(summary: dict, path: Path) -> None:
    """One panel per benchmark: the projection's time over its bytes floor, SVDLinear's time over
    dense with the FLOP floor, extraction's speedup over the loop with its 5x target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = {n: b["ratios"] for n, b in summary["benchmarks"].items() if b.get("ratios")}
    fig, axes = plt.subplots(1, max(len(done), 1), figsize=(6 * max(len(done), 1), 4.5))
    axes = [axes] if len(done) <= 1 else list(axes)
    for ax, (name, ratios) in zip(axes, done.items(), strict=False):
        if name == "project":
            keys = [k for k in ratios if k.endswith("/x_bytes_floor")]
            labels = [k.rsplit("/", 1)[0] for k in keys]
            ax.barh(labels, [ratios[k] for k in keys], color="tab:blue")
            for i, k in enumerate(keys):
                ax.text(ratios[k], i, f" {ratios[k.replace('x_bytes_floor', 'vs_eager')]:.1f}x "
                        "eager", va="center", fontsize=7)  # fmt: skip
            ax.axvline(
                1.0, color="tab:red", ls="--", label="bytes floor (streaming pass, same run)"
            )
            ax.set_xscale("log")
            ax.invert_yaxis()
            ax.set_xlabel("time / bytes-moved floor (cache flushed; log)")
            ax.set_title("projection of every module")
        elif name == "svd_linear":
            shapes = list(dict.fromkeys(k.split("/")[0] for k in ratios))
            series = [("fwd_ratio", "SVDLinear fwd / dense"),
                      ("train_ratio", "SVDLinear fwd+bwd / dense"),
                      ("eager_speedup", "eager / SVDLinear fwd+bwd")]  # fmt: skip
            width = 0.8 / len(series)
            for i, (key, label) in enumerate(series):
                xs = [j + i * width for j in range(len(shapes))]
                ax.bar(xs, [ratios.get(f"{s}/{key}", 0.0) for s in shapes], width, label=label)
            for j, s in enumerate(shapes):
                ax.hlines(ratios[f"{s}/train_flop_floor"], j + width / 2, j + 1.5 * width,
                          color="tab:red", lw=2,
                          label="fwd+bwd FLOP floor" if j == 0 else None)  # fmt: skip
            ax.axhline(1.0, color="k", lw=0.8, label="dense (fwd: the FLOP floor)")
            ax.set_xticks([j + 0.4 - width / 2 for j in range(len(shapes))], shapes, fontsize=7)
            ax.set_yscale("log")
            ax.set_ylabel("ratio (merge excluded; log)")
            ax.set_title("SVD linear vs dense nn.Linear")
        else:
            keys = list(ratios)
            ax.bar([k.rsplit("/", 1)[0] for k in keys], [ratios[k] for k in keys],
                   color="tab:green")  # fmt: skip
            ax.axhline(5.0, color="tab:red", ls="--", label="target 5x")
            ax.axhline(1.0, color="k", lw=0.8)
            ax.tick_params(axis="x", labelrotation=60, labelsize=6)
            ax.set_ylabel("speedup over the per-completion loop")
            ax.set_title("hack-basis extraction")
        ax.legend(fontsize=7)
    env, load = summary["env"], summary["env"]["load"]
    fig.suptitle(f"vhack bench{' --quick' if summary['quick'] else ''}: {env['device']}, torch "
                 f"{env['torch']}, {env['date'][:10]}, load average {_load(load['before'])} "
                 f"before, {_load(load['after'])} after, {load['cores']} cores",
                 fontsize=9)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_comparison(name: str, comparison: dict | None) -> None:
    if comparison is None:
        print(f"{name}: no stored result of this device in bench/results to compare with")
        return
    if "ratios" not in comparison:
        print(f"{name}: stored {comparison['file']}: {comparison['error']}")
        return
    print(f"{name}: now against {comparison['file']} ({comparison['date']})")
    for key, r in comparison["ratios"].items():
        print(
            f"  {key}: {r['now']:.3g} now, {r['stored']:.3g} stored ({r['now_over_stored']:.2f}x)"
        )


def run(opts: SuiteOptions, bench_dir: Path = BENCH_DIR) -> int:
    """Run the benchmarks in opts.only, write the summary; 0 when every one ran, else 1."""
    opts.out_dir.mkdir(parents=True, exist_ok=True)
    results_dir = bench_dir / "results"
    # read before running: a run that writes into bench/results replaces today's file
    stored = {name: stored_results(results_dir, name, opts.quick) for name in opts.only}
    load_before = load_average()
    benchmarks, comparison, envs = {}, {}, []
    for name in opts.only:
        record = run_script(name, opts, bench_dir)
        if "file" in record:
            data = json.loads(Path(record["file"]).read_text())
            # stored relative to the summary, so a results directory can move
            record["file"] = os.path.relpath(record["file"], opts.out_dir)
            envs.append(data["env"])
            record["ratios"] = RATIOS[name](data)
            if opts.compare:
                comparison[name] = compare(name, data, stored[name])
                if comparison[name] is not None:  # as bench/results/NAME.json
                    comparison[name]["file"] = os.path.relpath(
                        comparison[name]["file"], bench_dir.parent
                    )
        benchmarks[name] = record
    env = dict(envs[0]) if envs else {"device": opts.device, "device_type": opts.device}
    env.setdefault("date", _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    env.setdefault("torch", "?")
    env["load"] = {"before": load_before, "after": load_average(),
                   "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                   else os.cpu_count()}  # fmt: skip
    env["omp_num_threads"] = (
        os.environ.get("OMP_NUM_THREADS") if opts.threads is None else str(opts.threads)
    )
    summary = {
        "env": env,
        "quick": opts.quick,
        "benchmarks": benchmarks,
        "comparison": comparison if opts.compare else None,
    }
    # named after the benchmarks run when not all of them (gpu_check.sh runs one per step)
    subset = "" if set(opts.only) == set(BENCHMARKS) else "-" + "-".join(opts.only)
    stem = (
        f"bench{'-quick' if opts.quick else ''}{subset}-{_slug(env['device'])}-{env['date'][:10]}"
    )
    path = opts.out_dir / f"{stem}.json"
    path.write_text(json.dumps(summary, indent=2) + "\n")
    plot(summary, path.with_suffix(".png"))
    print()
    if opts.compare:
        for name in opts.only:
            if name in comparison:
                print_comparison(name, comparison[name])
    failed = [n for n, b in benchmarks.items() if "error" in b]
    for name in failed:
        print(f"{name}: FAILED (exit {benchmarks[name]['rc']}); see its output above")
    print(f"wrote {path} and {path.with_suffix('.png').name}")
    return 1 if failed else 0


if __name__ == "__main__":  # the same as `vhack bench ...`
    from vhack.cli import main

    raise SystemExit(main(["bench", *sys.argv[1:]]))
