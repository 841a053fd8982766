"""Shared benchmark plumbing: what machine this is, timing, and where results go.

Every bench script times its providers in ONE run (same process, same inputs), stores rows with the
device name and versions under bench/results/, and renders a plot from the stored rows.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def device_name(device: torch.device | str) -> str:
    """'NVIDIA H100 80GB HBM3', or the CPU model with the number of cores torch uses."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model} ({torch.get_num_threads()} threads)"


def environment(device: torch.device | str) -> dict:
    """Device, versions and date, stored with every result file."""
    import vhack

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": device_name(device),
        "device_type": torch.device(device).type,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "vhack": vhack.__version__,
        "backends": vhack.ops.backends(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def time_ms(
    fn: Callable[[], object],
    device: torch.device | str,
    *,
    warmup: int = 3,
    reps: int = 20,
    min_time_s: float = 0.2,
    setup: Callable[[], object] | None = None,
) -> dict:
    """Median, 20th and 80th percentile wall time of fn() in milliseconds.

    CUDA: CUDA events around each call after a synchronize (device time). CPU: perf_counter
    around each call. At least `reps` calls and at least `min_time_s` seconds. `setup` runs
    before every call (warmup included), untimed: e.g. restore an input, or a `CacheFlush`, without
    which fn's operands stay in cache from the previous call.
    """
    device = torch.device(device)
    for _ in range(warmup):
        if setup is not None:
            setup()
        fn()
    times: list[float] = []
    start_all = time.perf_counter()
    while len(times) < reps or time.perf_counter() - start_all < min_time_s:
        if setup is not None:
            setup()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        if len(times) >= 10 * reps:
            break
    times.sort()
    q = statistics.quantiles(times, n=5) if len(times) >= 2 else [times[0]] * 4
    return {"median_ms": statistics.median(times), "p20_ms": q[0], "p80_ms": q[3], "n": len(times)}


def last_level_cache_mb(device: torch.device | str) -> float | None:
    """Size of the cache a flush must evict, MiB: the L2 on CUDA, the last-level cache on CPU
    (Linux sysfs), None when unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).L2_cache_size / 2**20
    sizes = []
    for path in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = path.read_text().strip()
        unit = {"K": 2**-10, "M": 1.0, "G": 2**10}.get(text[-1:])
        if unit is not None and text[:-1].isdigit():
            sizes.append(int(text[:-1]) * unit)
    return max(sizes) if sizes else None


class CacheFlush:
    """Evicts the last-level cache (CUDA L2, CPU LLC) by reading and writing a buffer much larger
    than it: call it (as `time_ms(..., setup=...)`) before each timed call, so that call reads its
    operands from memory, as a training step does for data it touches once per step. A flush of
    0 MB does nothing (warm-cache timing)."""

    def __init__(self, device: torch.device | str, mb: int) -> None:
        self.mb = mb
        # int32 with add_: plain vectorised loads and stores through the cache (a large memset
        # may use non-temporal stores that bypass it), wrapping harmlessly.
        self._buf = torch.zeros(mb * 2**18, dtype=torch.int32, device=device) if mb > 0 else None

    def __call__(self) -> None:
        if self._buf is not None:
            self._buf.add_(1)


def peak_memory_mb(fn: Callable[[], object], device: torch.device | str) -> float | None:
    """Peak CUDA memory allocated during fn() in MiB, above what was allocated before (None on
    CPU, where torch keeps no such counter)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()[:40]


def write_results(name: str, env: dict, rows: list[dict], notes: str = "") -> Path:
    """Write {env, rows, notes} to bench/results/<name>-<device>-<date>.json; return the path."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    day = env["date"][:10]
    path = RESULTS_DIR / f"{name}-{_slug(env['device'])}-{day}.json"
    path.write_text(json.dumps({"env": env, "rows": rows, "notes": notes}, indent=2) + "\n")
    return path


def print_table(rows: list[dict], columns: list[str]) -> None:
    """A plain fixed-width table of the given columns."""
    widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True)))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).rjust(w) for c, w in zip(columns, widths, strict=True)))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)
