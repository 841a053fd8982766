"""The five validation tests of a hack basis (design doc, "Validation: cheap discriminative tests").

Each test is a function of packed per-sample dS gradients ([n, R_total] float32, modules in the
order of `layout`: the Adapter, or any object with `.names` and `.ranks`), so that it runs on
synthetic gradients, on gradients of labelled samples, or inside a training loop without an extra
backward. `validate` runs all five on a model and a pair set; `write_report` writes JSON, markdown
and a plot.

cin of a gradient g under a basis: per module, |relu(V g)| / |g| ("hackward", the default) or
|V g| / |g| ("both"), averaged over the modules the basis covers (modules with g = 0 skipped);
computed with `vhack.ops.project_(..., mode="measure")`.

1. cin_discrimination: cin of hack samples vs clean samples (difference of means, Cohen's d,
   bootstrap CI of the difference).
2. heldout_projection: per module, cos(v_0, mean held-out difference g_hack - g_clean); fraction of
   modules with cos > 0 and median cos.
3. random_null: cin onto V vs onto >= 100 random orthonormal bases of the same shapes; V's
   percentile in that null.
4. per_source_cin: cin of each source's summed gradient (e.g. student vs teacher rollouts), from
   per-sample gradients the training loop already has.
5. bootstrap_stability: resample the training pairs, re-extract from their cached gradients,
   compare with the original: principal-angle cosines and the sign of the leading axis.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from vhack import ops
from vhack.basis import HackBasis, PackedBasis
from vhack.extract import (
    basis_from_differences,
    check_extract_args,
    completion_grads,
    extraction_metadata,
    pair_differences,
)
from vhack.extract_config import EXTRACT_TOP_K
from vhack.files import atomic_path, atomic_write_text, regular_file
from vhack.packing import offsets_from_sizes
from vhack.pairs import Pair, normalize_prompt, pairset_hash
from vhack.projector import check_basis_rows, cin_mean

__all__ = [
    "STATISTICS",
    "bootstrap_stability",
    "cin_discrimination",
    "cin_per_sample",
    "heldout_projection",
    "load_samples",
    "per_source_cin",
    "random_null",
    "validate",
    "write_report",
]

STATISTICS = ("hackward", "both")


# ---------------------------------------------------------------------------------------------
# cin
# ---------------------------------------------------------------------------------------------


def _offsets(layout, device: torch.device | str) -> torch.Tensor:
    return offsets_from_sizes(list(layout.ranks), device)


def _check_grads(grads: torch.Tensor, layout, what: str = "grads") -> None:
    total = sum(layout.ranks)
    if not isinstance(grads, torch.Tensor) or grads.dim() != 2 or grads.shape[1] != total:
        shape = tuple(grads.shape) if isinstance(grads, torch.Tensor) else type(grads).__name__
        raise ValueError(f"{what} must be packed per-sample gradients [n, {total}], got {shape}")


def _cin_rows(
    packed: PackedBasis, offsets: torch.Tensor, grads: torch.Tensor, statistic: str
) -> torch.Tensor:
    """cin of every row of grads [n, R_total] -> float32 [n] (`vhack.projector.cin_mean`: NaN
    where no module counts)."""
    if statistic not in STATISTICS:
        raise ValueError(f"statistic must be one of {STATISTICS}, got {statistic!r}")
    stats = (
        torch.stack(
            [ops.project_(g.contiguous().float(), offsets, *packed, mode="measure") for g in grads]
        )
        if grads.shape[0]
        else grads.new_zeros(0, packed.ks.numel(), 4)
    )
    return cin_mean(stats, packed.ks > 0, one_sided=statistic == "hackward")


def cin_per_sample(
    basis: HackBasis, layout, grads: torch.Tensor, statistic: str = "hackward"
) -> torch.Tensor:
    """cin (module docstring) of each row of packed gradients grads [n, R_total] -> float32 [n]."""
    _check_grads(grads, layout)
    return _cin_rows(
        basis.packed(layout, grads.device), _offsets(layout, grads.device), grads, statistic
    )


# ---------------------------------------------------------------------------------------------
# 1. discrimination
# ---------------------------------------------------------------------------------------------


def cin_discrimination(
    basis: HackBasis,
    layout,
    grads: torch.Tensor,
    is_hack: Sequence[bool] | torch.Tensor,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    statistic: str = "hackward",
) -> dict:
    """Test 1: does V separate hack samples from clean ones?

    grads [n, R_total] per-sample gradients; is_hack [n] labels. Returns mean cin per pool, their
    difference (hack - clean), Cohen's d (pooled standard deviation), a 95 % percentile bootstrap
    CI of the difference (pools resampled independently, n_boot times), and the per-sample cin.
    """
    labels = torch.as_tensor(is_hack, dtype=torch.bool).cpu()
    if labels.dim() != 1 or labels.numel() != grads.shape[0]:
        raise ValueError(f"is_hack needs one label per gradient row ({grads.shape[0]})")
    if labels.all() or not labels.any():
        raise ValueError("cin_discrimination needs at least one hack and one clean sample")
    cin = cin_per_sample(basis, layout, grads, statistic).double().cpu()
    hack, clean = cin[labels], cin[~labels]
    diff = (hack.mean() - clean.mean()).item()
    n_h, n_c = hack.numel(), clean.numel()
    var_h = hack.var().item() if n_h > 1 else 0.0
    var_c = clean.var().item() if n_c > 1 else 0.0
    pooled = math.sqrt(((n_h - 1) * var_h + (n_c - 1) * var_c) / max(n_h + n_c - 2, 1))
    gen = torch.Generator().manual_seed(seed)
    boot_h = hack[torch.randint(n_h, (n_boot, n_h), generator=gen)].mean(1)
    boot_c = clean[torch.randint(n_c, (n_boot, n_c), generator=gen)].mean(1)
    lo, hi = torch.quantile(boot_h - boot_c, torch.tensor([0.025, 0.975], dtype=torch.float64))
    return {
        "statistic": statistic,
        "n_hack": n_h,
        "n_clean": n_c,
        "cin_hack_mean": hack.mean().item(),
        "cin_clean_mean": clean.mean().item(),
        "diff": diff,
        "effect_size": diff / pooled if pooled > 0 else math.copysign(math.inf, diff or 1.0),
        "ci95": [lo.item(), hi.item()],
        "cin_hack": hack.tolist(),
        "cin_clean": clean.tolist(),
    }


# ---------------------------------------------------------------------------------------------
# 2. held-out pairs
# ---------------------------------------------------------------------------------------------


def heldout_projection(basis: HackBasis, layout, diffs: torch.Tensor) -> dict:
    """Test 2: do held-out pairs point along the leading hack axis?

    diffs [n_heldout, R_total]: the held-out pairs' differences G_hack - G_clean
    (`vhack.extract.pair_differences`). Per module of the basis: cos between its leading axis v_0
    and the mean held-out difference d (skipped when d = 0). Returns the fraction of modules with
    cos > 0, the median cos, and cos per module.
    """
    _check_grads(diffs, layout, "diffs")
    if diffs.shape[0] == 0:
        raise ValueError("heldout_projection needs at least one held-out pair")
    d = diffs.float().mean(0)
    start = dict(zip(layout.names, _offsets(layout, "cpu").tolist(), strict=False))
    cos = {}
    for name in basis.names:
        v0 = basis.V(name)[0].to(d.device)
        dm = d[start[name] : start[name] + v0.numel()]
        if dm.norm() > 0 and v0.norm() > 0:
            cos[name] = (v0 @ dm / (dm.norm() * v0.norm())).item()
    values = torch.tensor(list(cos.values()), dtype=torch.float64)
    return {
        "n_pairs": diffs.shape[0],
        "n_modules": len(cos),
        "frac_positive": (values > 0).double().mean().item() if len(cos) else float("nan"),
        "median_cos": values.median().item() if len(cos) else float("nan"),
        "cos": cos,
    }


# ---------------------------------------------------------------------------------------------
# 3. random-direction null
# ---------------------------------------------------------------------------------------------


def _random_like(basis: HackBasis, gen: torch.Generator) -> HackBasis:
    """Random orthonormal bases with the shapes (number of non-zero axes, r) of `basis`."""
    V, sv = {}, {}
    for name in basis.names:
        k, r = int((basis.V(name).norm(dim=1) > 0).sum()), basis.V(name).shape[1]
        q, _ = torch.linalg.qr(torch.randn(r, max(k, 1), generator=gen, dtype=torch.float64))
        V[name] = q.T[: max(k, 1)].float() * (1.0 if k > 0 else 0.0)
        sv[name] = torch.ones(max(k, 1))
    return HackBasis(V, sv)


def random_null(
    basis: HackBasis,
    layout,
    grads: torch.Tensor,
    *,
    n_random: int = 100,
    seed: int = 0,
    statistic: str = "hackward",
) -> dict:
    """Test 3: is cin onto V larger than cin onto random directions?

    The statistic is the mean cin of grads [n, R_total] (e.g. held-out hack - clean differences).
    It is computed for V and for n_random random orthonormal bases with V's shapes (per module,
    as many axes as V has non-zero rows). Returns V's value, the null's mean, median and 95th
    percentile, and V's percentile in the null (100 = above every random basis; ties count half).
    """
    if n_random < 1:
        raise ValueError(f"n_random must be >= 1, got {n_random}")
    _check_grads(grads, layout)
    offsets = _offsets(layout, grads.device)
    value = _cin_rows(basis.packed(layout, grads.device), offsets, grads, statistic).mean().item()
    gen = torch.Generator().manual_seed(seed)
    null = torch.tensor(
        [
            _cin_rows(
                _random_like(basis, gen).packed(layout, grads.device), offsets, grads, statistic
            )
            .mean()
            .item()
            for _ in range(n_random)
        ],
        dtype=torch.float64,
    )
    below = (null < value).double().mean() + 0.5 * (null == value).double().mean()
    return {
        "statistic": statistic,
        "n_random": n_random,
        "n_samples": grads.shape[0],
        "value": value,
        "null_mean": null.mean().item(),
        "null_median": null.median().item(),
        "null_p95": torch.quantile(null, 0.95).item(),
        "percentile": 100.0 * below.item(),
        "null": null.tolist(),
    }


# ---------------------------------------------------------------------------------------------
# 4. per-source cin
# ---------------------------------------------------------------------------------------------


def per_source_cin(
    basis: HackBasis | PackedBasis,
    layout,
    grads: torch.Tensor,
    sources: Sequence[str],
    *,
    statistic: str = "hackward",
) -> dict[str, dict]:
    """Test 4: cin of each source's share of the gradient, from per-sample gradients.

    grads [n, R_total]: per-sample gradients of the step's loss (e.g. `Adapter.segment_grads` of
    the training backward, so no extra backward is needed); sources [n]: a label per sample
    (e.g. "student", "teacher"). Returns {source: {"cin": cin of the source's summed gradient,
    "cin_samples_mean": mean per-sample cin, "n": samples}}. basis may be pre-packed
    (`HackBasis.packed(layout)`) to skip repacking at every step.
    """
    _check_grads(grads, layout)
    sources = list(sources)
    if len(sources) != grads.shape[0]:
        raise ValueError(f"sources needs one label per gradient row ({grads.shape[0]})")
    packed = basis if isinstance(basis, PackedBasis) else basis.packed(layout, grads.device)
    offsets = _offsets(layout, grads.device)
    out = {}
    for source in dict.fromkeys(sources):
        rows = torch.tensor([i for i, s in enumerate(sources) if s == source], device=grads.device)
        summed = grads[rows].sum(0, keepdim=True)
        out[source] = {
            "cin": _cin_rows(packed, offsets, summed, statistic).item(),
            "cin_samples_mean": _cin_rows(packed, offsets, grads[rows], statistic).nanmean().item(),
            "n": rows.numel(),
        }
    return out


# ---------------------------------------------------------------------------------------------
# 5. bootstrap stability
# ---------------------------------------------------------------------------------------------


def bootstrap_stability(
    basis: HackBasis,
    layout,
    diffs: torch.Tensor,
    *,
    n_boot: int = 20,
    seed: int = 0,
    top_k: int | None = None,
    tau_axis: float | None = None,
) -> dict:
    """Test 5: does the basis survive resampling of the training pairs?

    diffs [n_train, R_total]: the training pairs' cached differences (no new backward). Each
    of n_boot rounds resamples n_train pairs with replacement and re-extracts (top_k, tau_axis
    default to the basis metadata). Per module, with k = the basis's axes: the principal-angle
    cosines between the original and the bootstrap span (singular values of V V_b^T, non-zero
    rows only) and the signed cos of the leading axes. Returns the median over modules of the mean
    principal cosine, the fraction of (module, round) where the leading axis keeps its sign, the
    median signed leading cos, and per-module means.
    """
    _check_grads(diffs, layout, "diffs")
    n = diffs.shape[0]
    if n < 2:
        raise ValueError("bootstrap_stability needs diffs [n_train >= 2, R_total]")
    top_k = top_k if top_k is not None else int(basis.metadata.get("top_k", EXTRACT_TOP_K))
    tau_axis = tau_axis if tau_axis is not None else float(basis.metadata.get("tau_axis", 0.0))
    gen = torch.Generator().manual_seed(seed)
    principal = {name: [] for name in basis.names}
    lead = {name: [] for name in basis.names}
    for _ in range(n_boot):
        idx = torch.randint(n, (n,), generator=gen).to(diffs.device)
        boot = basis_from_differences(diffs[idx], layout, top_k, tau_axis)
        for name in basis.names:
            V = basis.V(name).to(torch.float64).cpu()
            Vb = boot.V(name)[: V.shape[0]].to(torch.float64).cpu()
            V_nz, Vb_nz = V[V.norm(dim=1) > 0], Vb[Vb.norm(dim=1) > 0]
            if len(V_nz) and len(Vb_nz):
                cosines = torch.linalg.svdvals(V_nz @ Vb_nz.T).clamp(max=1.0)
                principal[name].append(cosines.mean().item())
            lead[name].append((V[0] @ Vb[0]).item())
    mean_principal = {n_: sum(v) / len(v) for n_, v in principal.items() if v}
    lead_all = torch.tensor([c for v in lead.values() for c in v], dtype=torch.float64)
    values = torch.tensor(list(mean_principal.values()), dtype=torch.float64)
    return {
        "n_boot": n_boot,
        "n_train": n,
        "median_principal_cos": values.median().item() if len(values) else float("nan"),
        "lead_sign_agreement": (lead_all > 0).double().mean().item(),
        "median_lead_cos": lead_all.median().item(),
        "principal_cos": mean_principal,
        "lead_cos_mean": {n_: sum(v) / len(v) for n_, v in lead.items()},
    }


# ---------------------------------------------------------------------------------------------
# All five on a model
# ---------------------------------------------------------------------------------------------


def load_samples(path: str | os.PathLike) -> list[tuple[object, str, str]]:
    """Labelled samples for tests 1 and 4 from JSONL: {"prompt", "completion", "label"} per line
    (prompt as in `vhack.Pair`; label e.g. "hack" / "clean"). Returns (prompt, completion, label).
    """
    path = regular_file(path, "samples file")  # a FIFO would block the read forever
    samples = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            prompt = normalize_prompt(obj["prompt"])
            completion, label = obj["completion"], obj["label"]
            if not (
                isinstance(completion, str) and completion and isinstance(label, str) and label
            ):
                raise ValueError("'completion' and 'label' must be non-empty strings")
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise ValueError(
                f"{path}, line {lineno}: need a JSON object with non-empty 'prompt', "
                f"'completion' and 'label' ({type(err).__name__}: {err})"
            ) from None
        samples.append((prompt, completion, label))
    if not samples:
        raise ValueError(f"{path}: no samples")
    return samples


def validate(
    adapter,
    tokenizer,
    pairs: Sequence[Pair],
    basis: HackBasis | None = None,
    *,
    k: int | None = 5,
    top_k: int = EXTRACT_TOP_K,
    tau_axis: float = 0.0,
    n_heldout: int = 2,
    drop_bottom_frac: float = 0.0,
    samples: Sequence[tuple[object, str, str]] | None = None,
    n_random: int = 100,
    n_boot: int = 20,
    seed: int = 0,
    method: str = "auto",
    batch_size: int | None = None,
    progress: bool = True,
) -> dict:
    """Run the five tests on a wrapped model and a pair set; returns a JSON-ready dict.

    The differences D = G_hack - G_clean of every pair (training and held-out) are computed once
    (`vhack.extract.pair_differences` with method and batch_size; the samples' gradients with
    "batched", or "loop" when method is "loop"). basis: the basis to test (e.g.
    `HackBasis.load(...)`); by default it is extracted here from the training pairs, sliced to k
    axes and reduced by the noise floor drop_bottom_frac (as `HackBasis.load` does). samples:
    labelled (prompt, completion, label) samples for tests 1 and 4 (labels "hack"/"clean" for
    test 1); by default the held-out pairs' completions. Test 2 and the null of test 3 use the
    held-out pairs' differences (the training pairs' when n_heldout = 0, flagged "in_sample").
    """
    check_extract_args(pairs, top_k, tau_axis, n_heldout)
    if basis is not None:
        check_basis_rows(basis)  # what a Projector would refuse is not scored either
    n_train = len(pairs) - n_heldout
    D = pair_differences(
        adapter, tokenizer, pairs, method=method, batch_size=batch_size, progress=progress
    )
    if basis is None:
        meta = extraction_metadata(adapter, pairs, top_k, tau_axis, n_heldout)
        basis = basis_from_differences(D[:n_train], adapter, top_k, tau_axis, meta)
        if k is not None:
            basis = basis.sliced(k)
        basis = basis.noise_floor(drop_bottom_frac)
    report: dict = {
        "model": basis.metadata.get("model", ""),
        "pairset_hash": pairset_hash(pairs),
        "basis_pairset_hash": basis.metadata.get("pairset_hash", ""),
        "n_pairs": len(pairs),
        "n_heldout": n_heldout,
        "basis": {"modules": len(basis), "k": {n: basis.k(n) for n in basis.names}},
        "seed": seed,
    }
    in_sample = n_heldout == 0
    held = slice(n_train, None) if not in_sample else slice(0, n_train)
    report["heldout_projection"] = {
        **heldout_projection(basis, adapter, D[held]),
        "in_sample": in_sample,
    }
    report["random_null"] = {
        **random_null(basis, adapter, D[held], n_random=n_random, seed=seed),
        "in_sample": in_sample,
    }
    if samples is None:
        samples = [(p.prompt, p.hack, "hack") for p in pairs[held]]
        samples += [(p.prompt, p.clean, "clean") for p in pairs[held]]
        report["samples"] = "held-out pair completions" if not in_sample else "training pairs"
    else:
        report["samples"] = f"{len(samples)} labelled samples"
    sample_grads = completion_grads(
        adapter,
        tokenizer,
        [(prompt, completion) for prompt, completion, _ in samples],
        labels=[f"sample {i} ({label})" for i, (_, _, label) in enumerate(samples)],
        method="loop" if method == "loop" else "batched",
        batch_size=batch_size,
        progress=progress,
    )
    labels = [label for _, _, label in samples]
    keep = [i for i, label in enumerate(labels) if label in ("hack", "clean")]
    if {labels[i] for i in keep} == {"hack", "clean"}:
        report["cin_discrimination"] = cin_discrimination(
            basis,
            adapter,
            sample_grads[keep],
            [labels[i] == "hack" for i in keep],
            seed=seed,
        )
    else:
        report["cin_discrimination"] = {"skipped": "needs samples labelled 'hack' and 'clean'"}
    report["per_source_cin"] = per_source_cin(basis, adapter, sample_grads, labels)
    report["bootstrap_stability"] = bootstrap_stability(
        basis, adapter, D[:n_train], n_boot=n_boot, seed=seed
    )
    return report


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def _fmt(x) -> str:
    return f"{x:.4g}" if isinstance(x, float) else str(x)


def _markdown(report: dict) -> str:
    lines = [
        "# Hack-basis validation",
        "",
        f"model `{report.get('model', '')}`, {report.get('n_pairs')} pairs "
        f"({report.get('n_heldout')} held out), basis of {report['basis']['modules']} modules",
        "",
        "| test | result |",
        "|---|---|",
    ]
    d = report["cin_discrimination"]
    if "skipped" in d:
        lines.append(f"| 1. cin discrimination | skipped: {d['skipped']} |")
    else:
        lines.append(
            f"| 1. cin discrimination | hack {_fmt(d['cin_hack_mean'])} (n={d['n_hack']}) vs clean "
            f"{_fmt(d['cin_clean_mean'])} (n={d['n_clean']}): diff {_fmt(d['diff'])}, 95 % CI "
            f"[{_fmt(d['ci95'][0])}, {_fmt(d['ci95'][1])}], effect size {_fmt(d['effect_size'])} |"
        )
    h = report["heldout_projection"]
    lines.append(
        f"| 2. held-out projection | {100 * h['frac_positive']:.0f} % of {h['n_modules']} modules with "
        f"cos > 0, median cos {_fmt(h['median_cos'])} ({h['n_pairs']} pairs"
        f"{', in-sample' if h.get('in_sample') else ''}) |"
    )
    r = report["random_null"]
    lines.append(
        f"| 3. random-direction null | cin {_fmt(r['value'])} vs null median "
        f"{_fmt(r['null_median'])} (p95 {_fmt(r['null_p95'])}, {r['n_random']} random bases): "
        f"percentile {_fmt(r['percentile'])} |"
    )
    s = report["per_source_cin"]
    lines.append(
        "| 4. per-source cin | "
        + ", ".join(f"{k}: {_fmt(v['cin'])} (n={v['n']})" for k, v in s.items())
        + " |"
    )
    b = report["bootstrap_stability"]
    lines.append(
        f"| 5. bootstrap stability | median principal cos {_fmt(b['median_principal_cos'])}, "
        f"leading-axis sign kept in {100 * b['lead_sign_agreement']:.0f} % "
        f"({b['n_boot']} resamples of {b['n_train']} pairs) |"
    )
    lines += [
        "",
        "Reading: (1) a basis that captures hacking gives hack samples a higher cin, with a CI "
        "above 0; (2) most modules with cos > 0; (3) a percentile near 100 (a random basis sits "
        "near 50); (4) a hacking source above a clean one; (5) cosines near 1 and the sign kept.",
        "",
    ]
    return "\n".join(lines)


def _plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(17, 3.8))
    d = report["cin_discrimination"]
    ax = axes[0]
    if "skipped" not in d:
        for x, (key, color) in enumerate((("cin_hack", "tab:red"), ("cin_clean", "tab:blue"))):
            ax.scatter([x] * len(d[key]), d[key], color=color, alpha=0.7)
        ax.set_xticks([0, 1], ["hack", "clean"])
        ax.set_xlim(-0.6, 1.6)
    ax.set_title("1. cin of labelled samples")
    ax.set_ylabel("cin")
    ax = axes[1]
    cos = list(report["heldout_projection"]["cos"].values())
    ax.hist(cos, bins=20, range=(-1, 1), color="tab:green")
    ax.axvline(0, color="k", lw=0.8)
    ax.set_title("2. held-out cos(v0, d) per module")
    ax = axes[2]
    r = report["random_null"]
    ax.hist(r["null"], bins=30, color="tab:gray", label="random bases")
    ax.axvline(r["value"], color="tab:red", lw=2, label=f"V (percentile {r['percentile']:.0f})")
    ax.set_title("3. random-direction null")
    ax.set_xlabel("mean cin")
    ax.legend(fontsize=8)
    ax = axes[3]
    b = report["bootstrap_stability"]
    ax.hist(list(b["principal_cos"].values()), bins=20, range=(0, 1), color="tab:purple")
    ax.set_title("5. bootstrap principal cos per module")
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")  # path may be a temp name
    plt.close(fig)


def write_report(report: dict, out_dir: str | os.PathLike, name: str = "validation") -> dict:
    """Write <out_dir>/<name>.json, .md and .png; returns their paths {"json", "md", "png"}."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {ext: out / f"{name}.{ext}" for ext in ("json", "md", "png")}
    atomic_write_text(paths["json"], json.dumps(report, indent=2) + "\n")
    atomic_write_text(paths["md"], _markdown(report))
    with atomic_path(paths["png"]) as tmp:
        _plot(report, tmp)
    return paths
