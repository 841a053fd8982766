"""Benchmark: the SVD-basis Linear against dense nn.Linear on Qwen3-4B layer shapes.

One run times, per shape (d_in -> d_out, bf16, T tokens), on the same inputs:
  dense fwd          nn.Linear forward alone
  dense train        nn.Linear with a trained weight: forward + dX + dW
  svdlinear fwd      vhack.SVDLinear forward (dense merged weight, cached per optimizer step)
  svdlinear train    SVDLinear forward + dX + dS (dS from the fused dS kernel on CUDA)
  fused fwd / train  vhack.ops.svd_linear without a weight: the factored kernels (forward GEMMs
                     with fused scale/bias; backward: one dS kernel that also stores g_h, one dX GEMM)
  eager fwd / train  the research code's eager factored path ((x Vh^T) * (S + dS)) U^T in autograd
  compiled fwd/train torch.compile of that eager path (--no-compile skips it; its compilation is
                     in the untimed warmup)
  merge              ops.merge_weight(U, S, dS, Vh, base=W): once per optimizer step
  dS batch / per-seg ops.delta_grad without / with segment ids (8 contiguous segments)
  decode T=1..64     generation forward (no grad): dense, merged (adapter.merged()), fused, eager
plus peak memory (CUDA) and the arithmetic floor of the dS gradient, 2 T r (d_in + d_out) FLOPs,
against a dense dW pass (2 T d_in d_out). On CUDA it checks the issue's targets and prints
PASS/MISS per target (never asserts). On CPU the "fused" providers run the torch backend (Triton
needs CUDA; the interpreter is a correctness tool) and the figures are reported without targets.

The SVDLinear fwd/train times use the cached merged weight, so they exclude the merge, which runs
once per optimizer step (dS changes at every step) and costs many forwards (r / T of one at equal
FLOPs). Beside them the bench reports the merge amortised at --tokens-per-step S tokens per
optimizer step (default 4096 and 65536): each T-token call is charged merge_ms * T / S, e.g.
  fwd_ratio (amortised)   = (svd_fwd + merge * T / S) / dense_fwd
  train_ratio (amortised) = (svd_train + merge * T / S) / dense_train
  eager_speedup (amortised) = eager_train / (svd_train + merge * T / S)
where "eager" is the research pipeline's own formulation: the factored ((x Vh^T) * (S + dS)) U^T
in autograd at every call, with no merge (it bypassed to the base Linear only at dS = 0).

    python bench/bench_svd_linear.py --device cuda          # T = 4096, the issue's targets
    python bench/bench_svd_linear.py --device cpu           # T = 256 by default, a few minutes
    python bench/bench_svd_linear.py --smoke                # tiny shapes, seconds
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

import vhack
from vhack import ops

NAME = "bench_svd_linear"
# (d_in, d_out, how many of the 7 projections of a Qwen3-4B layer have this shape)
SHAPES = [
    (2560, 4096, 1),  # q_proj
    (2560, 1024, 2),  # k_proj, v_proj
    (4096, 2560, 1),  # o_proj
    (2560, 9728, 2),  # gate_proj, up_proj
    (9728, 2560, 1),  # down_proj
]
SMOKE_SHAPES = [(48, 80, 1), (80, 48, 1)]
DECODE_TOKENS = (1, 2, 4, 8, 16, 32, 64)
TOKENS_PER_STEP = (4096, 65536)
N_SEGMENTS = 8
# Targets of the issue (CUDA only): (key, description, limit, "<=" or ">=")
TARGETS = [
    ("fwd_ratio", "SVDLinear forward / dense forward", 1.05, "<="),
    ("train_ratio", "SVDLinear fwd+bwd / dense trained-weight fwd+bwd", 1.25, "<="),
    ("eager_speedup", "eager factored fwd+bwd / SVDLinear fwd+bwd", 1.5, ">="),
    ("decode_ratio", "decode T=1..64, merged / dense (worst T)", 1.05, "<="),
    ("segment_ratio", "per-segment dS / batch dS", 1.1, "<="),
]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tokens", type=int, default=None, help="T (default: 4096 CUDA, 256 CPU)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--reps", type=int, default=None, help="timed samples (default: 20 CUDA, 7 CPU)")
    p.add_argument(
        "--inner",
        type=int,
        default=None,
        help="back-to-back calls per timed sample, as in a model where the host runs ahead of the "
        "GPU (default: 10 CUDA, 1 CPU)",
    )
    p.add_argument(
        "--tokens-per-step",
        type=int,
        nargs="+",
        default=list(TOKENS_PER_STEP),
        help="tokens per optimizer step at which the per-step merge is amortised (each >= "
        "--tokens; default 4096 65536)",
    )
    p.add_argument("--smoke", action="store_true", help="tiny shapes and few reps: seconds")
    p.add_argument("--out-dir", type=Path, default=common.RESULTS_DIR)
    p.add_argument("--no-plot", action="store_true")
    p.add_argument(
        "--no-compile",
        dest="compile",
        action="store_false",
        help="skip torch.compile of the eager path (its compilation takes seconds per shape)",
    )
    p.add_argument(
        "--compile-backend",
        default=None,
        help="torch.compile backend (default inductor; eager with --smoke: the wiring only)",
    )
    args = p.parse_args(argv)
    cuda = torch.device(args.device).type == "cuda"
    if args.tokens is None:
        args.tokens = 64 if args.smoke else (4096 if cuda else 256)
    if args.reps is None:
        args.reps = 2 if args.smoke else (20 if cuda else 7)
    if args.compile_backend is None:
        args.compile_backend = "eager" if args.smoke else "inductor"
    if args.inner is None:
        args.inner = 10 if cuda else 1
    bad = [n for n in args.tokens_per_step if n < args.tokens]
    if bad:
        p.error(
            f"--tokens-per-step {bad} is below --tokens {args.tokens}: a step holds at least one "
            "T-token micro-batch"
        )
    return args


class Case:
    """One shape: a dense trained-weight Linear, the same Linear wrapped by vhack, and inputs."""

    def __init__(self, d_in: int, d_out: int, tokens: int, dtype, device, seed: int = 0):
        g = torch.Generator(device="cpu").manual_seed(seed)
        weight = (torch.randn(d_out, d_in, generator=g) / d_in**0.5).to(dtype)
        self.dense = nn.Linear(d_in, d_out, bias=False, device=device, dtype=dtype)
        with torch.no_grad():
            self.dense.weight.copy_(weight)
        wrapped = nn.Sequential(copy.deepcopy(self.dense))
        self.adapter = vhack.wrap(wrapped, targets="all-linear", use_cache=False, progress=False)
        self.svd = self.adapter.modules["0"]
        with torch.no_grad():  # a trained, non-zero dS: the forward runs the cached merge
            self.adapter.delta.copy_(1e-3 * torch.randn(self.adapter.delta.shape, generator=g))
        self.dS = self.svd.delta_S.detach().clone().requires_grad_(True)
        self.x = torch.randn(tokens, d_in, generator=g).to(device, dtype).requires_grad_(True)
        self.gy = torch.randn(tokens, d_out, generator=g).to(device, dtype)
        self.segments = torch.arange(N_SEGMENTS, device=device).repeat_interleave(
            -(-tokens // N_SEGMENTS)
        )[:tokens]
        self.d_in, self.d_out, self.r, self.tokens = d_in, d_out, self.svd.rank, tokens

    # ---- providers: each returns a zero-argument callable -------------------------------------
    def dense_fwd(self):
        return lambda: self.dense(self.x)

    def dense_train(self):
        w = self.dense.weight
        return lambda: torch.autograd.grad(self.dense(self.x), (self.x, w), self.gy)

    def svd_fwd(self):
        return lambda: self.svd(self.x)

    def svd_train(self):
        delta = self.adapter.delta
        return lambda: torch.autograd.grad(self.svd(self.x), (self.x, delta), self.gy)

    def _fused(self, x, dS):
        s = self.svd
        return ops.svd_linear(x, s.U, s.S, dS, s.Vh)

    def fused_fwd(self):
        return lambda: self._fused(self.x, self.dS)

    def fused_train(self):
        return lambda: torch.autograd.grad(self._fused(self.x, self.dS), (self.x, self.dS), self.gy)

    def _eager(self, x, dS):
        s = self.svd
        return ((x @ s.Vh.T) * (s.S + dS).to(x.dtype)) @ s.U.T

    def eager_fwd(self):
        return lambda: self._eager(self.x, self.dS)

    def eager_train(self):
        return lambda: torch.autograd.grad(self._eager(self.x, self.dS), (self.x, self.dS), self.gy)

    def compiled_fwd(self):
        return lambda: self._compiled(self.x, self.dS)

    def compiled_train(self):
        return lambda: torch.autograd.grad(
            self._compiled(self.x, self.dS), (self.x, self.dS), self.gy
        )

    def merge(self):
        s = self.svd
        return lambda: ops.merge_weight(s.U, s.S, s.delta_S.detach(), s.Vh, base=s.base_weight)

    def ds_batch(self):
        s, x = self.svd, self.x.detach()
        return lambda: ops.delta_grad(x, self.gy, s.U, s.Vh)

    def ds_segments(self):
        s, x = self.svd, self.x.detach()
        return lambda: ops.delta_grad(
            x, self.gy, s.U, s.Vh, self.segments, n_segments=N_SEGMENTS, check_ids=False
        )

    def dense_dw(self):
        x = self.x.detach()
        return lambda: self.gy.T @ x

    def decode(self, provider: str, tokens: int):
        x = self.x.detach()[:tokens]
        s, dS = self.svd, self.dS.detach()
        return {
            "dense": lambda: self.dense(x),
            "merged": lambda: s(x),  # timed inside adapter.merged(), as generate() would run
            "fused": lambda: self._fused(x, dS),
            "eager": lambda: self._eager(x, dS),
        }[provider]


def compiled_providers(case: Case, backend: str) -> dict:
    """compiled_fwd and compiled_train (torch.compile of the eager path), compiled here by one
    call each; {} with a note when torch.compile cannot run on this machine."""
    case._compiled = torch.compile(case._eager, backend=backend)
    fns = {"compiled_fwd": case.compiled_fwd(), "compiled_train": case.compiled_train()}
    try:
        for fn in fns.values():
            fn()
    except Exception as err:  # no C++ compiler, an unsupported device, ...
        print(f"torch.compile of the eager path does not run here, skipped: {err}"[:300])
        return {}
    return fns


def amortised(times: dict, tokens: int, tokens_per_step: list[int]) -> list[dict]:
    """The per-step merge charged to each T-token call at S tokens per optimizer step.

    times: provider -> {"median_ms"} of one shape; returns one dict per S with the merge share
    (merge_ms * T / S) and the cached ratios with that share added (module docstring).
    """
    ms = {name: t["median_ms"] for name, t in times.items()}
    out = []
    for per_step in tokens_per_step:
        share = ms["merge"] * tokens / per_step
        out.append(
            {
                "tokens_per_step": per_step,
                "merge_ms_per_call": share,
                "fwd_ratio": (ms["svd_fwd"] + share) / ms["dense_fwd"],
                "train_ratio": (ms["svd_train"] + share) / ms["dense_train"],
                "eager_speedup": ms["eager_train"] / (ms["svd_train"] + share),
                "eager_fwd_speedup": ms["eager_fwd"] / (ms["svd_fwd"] + share),
            }
        )
    return out


def bytes_of(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def run(args) -> tuple[list[dict], dict]:
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    shapes = SMOKE_SHAPES if args.smoke else SHAPES
    decode_tokens = (1, 4) if args.smoke else DECODE_TOKENS
    backend = ops.backends()["default"][device.type]["svd_linear"]
    warmup = 1 if args.smoke else 2

    def time_all(fns: dict, grad: bool = True) -> dict[str, dict]:
        """Per-call times of each provider. Providers are interleaved round by round, so a load
        that drifts on a shared machine hits them alike; a sample is args.inner back-to-back
        calls, as in a model where the host runs ahead of the GPU."""
        samples: dict[str, list[float]] = {name: [] for name in fns}
        with torch.set_grad_enabled(grad):
            for round_ in range(warmup + args.reps):
                for name, fn in fns.items():

                    def calls(fn=fn):
                        for _ in range(args.inner):
                            fn()

                    t = common.time_ms(calls, device, warmup=0, reps=1, min_time_s=0.0)
                    if round_ >= warmup:
                        samples[name].append(t["median_ms"] / args.inner)
        out = {}
        for name, ms in samples.items():
            q = statistics.quantiles(ms, n=5) if len(ms) >= 2 else [ms[0]] * 4
            out[name] = {"median_ms": statistics.median(ms), "p20_ms": q[0], "p80_ms": q[3],
                         "n": len(ms)}  # fmt: skip
        return out

    providers = [
        "dense_fwd", "dense_train", "svd_fwd", "svd_train", "fused_fwd", "fused_train",
        "eager_fwd", "eager_train", "merge", "ds_batch", "ds_segments", "dense_dw",
    ]  # fmt: skip
    decoders = ("dense", "merged", "fused", "eager")
    rows: list[dict] = []
    summary: dict = {}
    with tqdm(total=len(shapes) * (1 + len(decode_tokens)), desc=NAME, disable=args.smoke) as bar:
        for d_in, d_out, count in shapes:
            case = Case(d_in, d_out, args.tokens, dtype, device)
            shape = f"{d_in}->{d_out}"
            base = dict(shape=shape, d_in=d_in, d_out=d_out, r=case.r, tokens=args.tokens)
            fns = {name: getattr(case, name)() for name in providers}
            if args.compile:
                fns.update(compiled_providers(case, args.compile_backend))
            times = time_all(fns)
            for name in fns:
                if name.endswith("_train"):
                    times[name]["peak_mb"] = common.peak_memory_mb(fns[name], device)
            bar.update()
            dense_fwd = times["dense_fwd"]["median_ms"]
            dense_train = times["dense_train"]["median_ms"]
            baseline = {"fwd": dense_fwd, "train": dense_train}
            for name, t in times.items():
                phase = name.rsplit("_", 1)[-1]
                phase = phase if phase in baseline else "other"
                ratio = t["median_ms"] / baseline[phase] if phase in baseline else None
                rows.append(
                    {**base, "phase": phase, "provider": name, **t, "ratio_vs_dense": ratio}
                )
            decode_ratios = []
            for tokens in decode_tokens:
                with case.adapter.merged():  # "merged" runs as generate() would, inside the block
                    t = time_all({p: case.decode(p, tokens) for p in decoders}, grad=False)
                for provider in decoders:
                    ratio = t[provider]["median_ms"] / t["dense"]["median_ms"]
                    rows.append({**base, "tokens": tokens, "phase": "decode", "provider": provider,
                                 **t[provider], "ratio_vs_dense": ratio})  # fmt: skip
                    if provider == "merged":
                        decode_ratios.append(ratio)
                bar.update()
            ds_flops = 2 * args.tokens * case.r * (d_in + d_out)
            svd = case.svd
            summary[shape] = {
                "count_per_layer": count,
                "r": case.r,
                "fwd_ratio": times["svd_fwd"]["median_ms"] / dense_fwd,
                "train_ratio": times["svd_train"]["median_ms"] / dense_train,
                "eager_speedup": times["eager_train"]["median_ms"]
                / times["svd_train"]["median_ms"],
                "fused_train_ratio": times["fused_train"]["median_ms"] / dense_train,
                "eager_fwd_ratio": times["eager_fwd"]["median_ms"] / dense_fwd,
                # torch.compile of the eager path over SVDLinear (None: not compiled)
                "compiled_speedup": times["compiled_train"]["median_ms"]
                / times["svd_train"]["median_ms"]
                if "compiled_train" in times
                else None,
                "compiled_fwd_speedup": times["compiled_fwd"]["median_ms"]
                / times["svd_fwd"]["median_ms"]
                if "compiled_fwd" in times
                else None,
                "decode_ratio": max(decode_ratios),
                "segment_ratio": times["ds_segments"]["median_ms"] / times["ds_batch"]["median_ms"],
                "merge_ms": times["merge"]["median_ms"],
                "merge_over_fwd": times["merge"]["median_ms"] / times["svd_fwd"]["median_ms"],
                "amortised": amortised(times, args.tokens, args.tokens_per_step),
                "ds_ms": times["ds_batch"]["median_ms"],
                "dense_dw_ms": times["dense_dw"]["median_ms"],
                "ds_floor_vs_dw": (case.r * (d_in + d_out)) / (d_in * d_out),
                "ds_tflops": ds_flops / times["ds_batch"]["median_ms"] / 1e9,
                "peak_mb_svd_train": times["svd_train"].get("peak_mb"),
                "peak_mb_dense_train": times["dense_train"].get("peak_mb"),
                "w_mib": bytes_of(svd.base_weight) / 2**20,
                "uvh_over_w": bytes_of(svd.U, svd.Vh) / bytes_of(svd.base_weight),
            }
            del case, fns
            if device.type == "cuda":
                torch.cuda.empty_cache()
    w_total = sum(s["w_mib"] * s["count_per_layer"] for s in summary.values())
    uvh_total = sum(s["w_mib"] * s["uvh_over_w"] * s["count_per_layer"] for s in summary.values())
    summary["_model"] = {
        "uvh_over_w": uvh_total / w_total,
        "with_cache_over_w": (uvh_total + w_total) / w_total,  # U, Vh and the cached W_eff
        "backend": backend,
    }
    return rows, summary


AMORTISED_COLUMNS = [
    "shape",
    "tokens/step",
    "merge ms/call",
    "fwd cached",
    "fwd amortised",
    "train cached",
    "train amortised",
    "eager/svd train cached",
    "eager/svd train amortised",
    "eager/svd fwd amortised",
]


def amortised_table(summary: dict) -> list[dict]:
    """One row per (shape, tokens per step) for print_table."""
    rows = []
    for shape, s in summary.items():
        if shape.startswith("_"):
            continue
        for a in s["amortised"]:
            rows.append(
                {
                    "shape": shape,
                    "tokens/step": a["tokens_per_step"],
                    "merge ms/call": a["merge_ms_per_call"],
                    "fwd cached": s["fwd_ratio"],
                    "fwd amortised": a["fwd_ratio"],
                    "train cached": s["train_ratio"],
                    "train amortised": a["train_ratio"],
                    "eager/svd train cached": s["eager_speedup"],
                    "eager/svd train amortised": a["eager_speedup"],
                    "eager/svd fwd amortised": a["eager_fwd_speedup"],
                }
            )
    return rows


def print_report(args, summary: dict, env: dict) -> list[str]:
    shapes = {k: v for k, v in summary.items() if not k.startswith("_")}
    table = [{"shape": k, **v} for k, v in shapes.items()]
    print(
        f"\n{NAME}: {env['device']}, {args.dtype}, T = {args.tokens} tokens, fused backend = "
        f"{summary['_model']['backend']}"
    )
    common.print_table(
        table,
        [
            "shape",
            "r",
            "fwd_ratio",
            "train_ratio",
            "eager_speedup",
            "compiled_speedup",
            "fused_train_ratio",
            "decode_ratio",
            "segment_ratio",
            "merge_ms",
            "merge_over_fwd",
            "ds_floor_vs_dw",
            "ds_tflops",
        ],
    )
    print(
        "\nthe merge (once per optimizer step) amortised at S tokens per step: each T-token call "
        "is charged merge_ms * T / S; 'cached' columns exclude it, eager = the research code's "
        "factored path (no merge)"
    )
    common.print_table(amortised_table(summary), AMORTISED_COLUMNS)
    common.print_table(
        table, ["shape", "peak_mb_dense_train", "peak_mb_svd_train", "w_mib", "uvh_over_w"]
    )
    model = summary["_model"]
    print(
        f"extra memory over the base weights W of one layer's projections (shapes weighted by "
        f"count): U + Vh = {model['uvh_over_w']:.2f}x W, plus the cached merged W_eff (1x W once "
        f"dS != 0) = {model['with_cache_over_w']:.2f}x W; W itself stays (exact at dS = 0)"
    )
    lines = []
    if torch.device(args.device).type != "cuda":
        print("targets apply to CUDA (H100/H200); CPU figures are reported without a target")
        return lines
    for key, text, limit, op in TARGETS:
        for shape, s in shapes.items():
            ok = s[key] <= limit if op == "<=" else s[key] >= limit
            lines.append(
                f"{'PASS' if ok else 'MISS'}  {shape:>10}  {text}: {s[key]:.3f} ({op} {limit})"
            )
            if key in ("fwd_ratio", "train_ratio", "eager_speedup"):
                for a in s["amortised"]:
                    lines.append(
                        f"INFO  {shape:>10}  {text}, merge amortised at {a['tokens_per_step']} "
                        f"tokens/step: {a[key]:.3f}"
                    )
    print("\n".join(lines))
    return lines


def plot(rows: list[dict], summary: dict, env: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = [k for k in summary if not k.startswith("_")]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.5))
    per_step = min(a["tokens_per_step"] for a in summary[shapes[0]]["amortised"])
    providers = [
        ("svd_fwd", "SVDLinear fwd (cached merge)"),
        ("fwd_ratio", f"SVDLinear fwd + merge @ {per_step} tok/step"),
        ("fused_fwd", "fused fwd"),
        ("eager_fwd", "eager fwd (research)"),
        ("svd_train", "SVDLinear train (cached merge)"),
        ("train_ratio", f"SVDLinear train + merge @ {per_step} tok/step"),
        ("fused_train", "fused train"),
        ("eager_train", "eager train (research)"),
    ]

    def ratios(name: str) -> list[float]:
        if name.endswith("_ratio"):  # a cached ratio with the merge amortised at per_step
            return [
                next(a[name] for a in summary[s]["amortised"] if a["tokens_per_step"] == per_step)
                for s in shapes
            ]
        return [
            next(r["ratio_vs_dense"] for r in rows if r["shape"] == s and r["provider"] == name)
            for s in shapes
        ]

    width = 0.8 / len(providers)
    for i, (name, label) in enumerate(providers):
        ax1.bar([j + i * width for j in range(len(shapes))], ratios(name), width, label=label)
    ax1.axhline(1.0, color="k", lw=0.8)
    ax1.set_xticks([j + 0.4 - width / 2 for j in range(len(shapes))], shapes)
    ax1.set_ylabel("time / dense (fwd: dense fwd; train: dense fwd+dX+dW)")
    ax1.set_title(f"T = {rows[0]['tokens']} tokens")
    ax1.margins(y=0.3)
    ax1.legend(fontsize=6, ncol=2, loc="upper left")
    decode = [r for r in rows if r["phase"] == "decode"]
    for provider in ("merged", "fused", "eager"):
        tokens = sorted({r["tokens"] for r in decode})
        med = [
            statistics.median(
                r["ratio_vs_dense"]
                for r in decode
                if r["provider"] == provider and r["tokens"] == t
            )
            for t in tokens
        ]
        ax2.plot(tokens, med, marker="o", label=provider)
    ax2.axhline(1.0, color="k", lw=0.8)
    ax2.set_xscale("log", base=2)
    ax2.set_xlabel("decode tokens T")
    ax2.set_ylabel("time / dense (median over shapes)")
    ax2.legend(fontsize=8)
    fig.suptitle(f"SVD linear vs dense, {env['device']} ({env['date'][:10]})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but no CUDA device is visible")
    env = common.environment(device)
    rows, summary = run(args)
    lines = print_report(args, summary, env)
    notes = (
        f"T={args.tokens}, {args.dtype}, reps={args.reps} x {args.inner} calls; fused providers ran the "
        f"{summary['_model']['backend']!r} backend. svd fwd/train ratios use the cached merge; "
        f"'amortised' adds merge_ms * T / S at S = {args.tokens_per_step} tokens per optimizer "
        "step; eager = the research code's factored path, compiled = its torch.compile ("
        f"{args.compile_backend if args.compile else 'skipped: --no-compile'}). Operands are timed warm (no cache "
        "flush): decode rows read weights that may sit in cache."
    )
    if device.type == "cpu":
        notes += " CPU: shared machine, timings are noisy; no targets apply."
    common.RESULTS_DIR = args.out_dir  # write_results writes under common.RESULTS_DIR
    rows.append({"phase": "summary", **{"summary": summary, "targets": lines}})
    path = common.write_results(NAME + ("-smoke" if args.smoke else ""), env, rows, notes)
    print(f"wrote {path}")
    if not args.no_plot:
        png = path.with_suffix(".png")
        plot(rows[:-1], summary, env, png)
        print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
