"""bench/common.py: time_ms runs `setup` untimed before every call; CacheFlush reads and writes
its buffer; the last-level cache size is found (Linux sysfs) for the flush report."""

import importlib.util
import time
from pathlib import Path

import torch

_path = Path(__file__).resolve().parents[1] / "bench" / "common.py"
_spec = importlib.util.spec_from_file_location("vhack_bench_common", _path)
common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(common)


def test_time_ms_runs_setup_before_every_call_untimed():
    order = []

    def setup():
        order.append("setup")
        time.sleep(0.02)

    t = common.time_ms(lambda: order.append("fn"), "cpu", warmup=2, reps=5, min_time_s=0.0,
                       setup=setup)  # fmt: skip
    assert order == ["setup", "fn"] * (2 + t["n"])
    assert t["median_ms"] < 10  # the 20 ms setup is not in the timing


def test_cache_flush_touches_its_whole_buffer():
    flush = common.CacheFlush("cpu", 1)
    flush()
    flush()
    assert flush._buf.numel() * 4 == 2**20 and torch.equal(
        flush._buf, torch.full_like(flush._buf, 2)
    )
    common.CacheFlush("cpu", 0)()  # 0 MB: nothing to do


def test_last_level_cache_size():
    mb = common.last_level_cache_mb("cpu")
    if Path("/sys/devices/system/cpu/cpu0/cache").exists():
        assert mb is not None and 0.1 < mb < 4096
