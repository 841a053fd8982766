"""`vhack info`: versions, backends, sandbox isolation and the disk cache, as JSON."""

from __future__ import annotations

import argparse
import json
import sys

HELP = "versions, backends, torch threads, sandbox isolation and the disk cache (JSON)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """No options."""


def run(args: argparse.Namespace) -> int:
    """Versions, the backends available on this machine, the torch CPU threads the commands
    choose (vhack.threads), sandbox isolation and the disk cache."""
    import torch

    import vhack
    from vhack.cache import cache_dir, svd_cache_enabled
    from vhack.sandbox import probe as sandbox_probe
    from vhack.threads import SMALL_MODEL_PARAMS, available_cores, choose_threads, env_threads

    root = cache_dir()
    from_env = env_threads()
    svd = root / "svd"
    info = {
        "vhack": vhack.__version__,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "backends": vhack.ops.backends(),
        "threads": {
            "cores": available_cores(),  # this process's CPU affinity
            "torch_default": torch.get_num_threads(),
            "environment": dict([from_env]) if from_env else None,  # OMP_NUM_THREADS, ...
            # what train, extract, validate and example choose without --threads
            "small_model": choose_threads(True).to_dict(),
            "larger_model": choose_threads(False).to_dict(),
            "small_model_params_below": SMALL_MODEL_PARAMS,
            "override": "--threads N (train, extract, validate, example)",
            "demo": "fixed threads per worker process, independent of this choice (--workers "
            "sets the processes)",
        },
        "cache": {
            "dir": str(root),
            "svd_cache": svd_cache_enabled(),
            "svd_bytes": sum(f.stat().st_size for f in svd.glob("*.safetensors")),
        },
        "sandbox": sandbox_probe().to_dict(),  # isolation for untrusted code (vhack.sandbox)
    }
    print(json.dumps(info, indent=2))
    return 0
