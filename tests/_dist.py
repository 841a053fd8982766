"""Run a function on N CPU processes (gloo) for the multi-process tests: torch.multiprocessing
spawn, a free port on 127.0.0.1, one torch thread per process, and a wall-clock timeout."""

from __future__ import annotations

import os
import socket
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn, args, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = fn(rank, world, *args)
        torch.save({"ok": result}, os.path.join(out_dir, f"rank{rank}.pt"))
    except BaseException as err:
        torch.save(
            {"error": f"{type(err).__name__}: {err}", "trace": traceback.format_exc()},
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
        raise
    finally:
        dist.destroy_process_group()


def run_distributed(fn, *args, world: int = 2, out_dir, timeout: float = 240.0) -> list:
    """fn(rank, world, *args) on `world` processes; returns each rank's result (torch.save-able).
    A rank's exception is re-raised here as RuntimeError with its traceback."""
    port = free_port()
    ctx = mp.start_processes(
        _entry,
        args=(world, port, fn, args, str(out_dir)),
        nprocs=world,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                raise TimeoutError(f"distributed run did not finish in {timeout} s")
    except mp.ProcessRaisedException:
        pass  # the rank's own report (below) is clearer
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    results = []
    for rank in range(world):
        path = os.path.join(out_dir, f"rank{rank}.pt")
        if not os.path.exists(path):
            raise RuntimeError(f"rank {rank} died without a result")
        report = torch.load(path, weights_only=False)
        if "error" in report:
            raise RuntimeError(f"rank {rank}: {report['error']}\n{report['trace']}")
        results.append(report["ok"])
    return results
