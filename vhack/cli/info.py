"""`vhack info`: versions, backends, sandbox isolation and the disk cache, as JSON."""

from __future__ import annotations

import argparse
import json
import sys

HELP = "versions, backends, sandbox isolation and the disk cache (JSON)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """No options."""


def run(args: argparse.Namespace) -> int:
    """Versions, the backends available on this machine, and the disk cache."""
    import torch

    import vhack
    from vhack.cache import cache_dir, svd_cache_enabled
    from vhack.sandbox import probe as sandbox_probe

    root = cache_dir()
    svd = root / "svd"
    info = {
        "vhack": vhack.__version__,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "backends": vhack.ops.backends(),
        "cache": {
            "dir": str(root),
            "svd_cache": svd_cache_enabled(),
            "svd_bytes": sum(f.stat().st_size for f in svd.glob("*.safetensors")),
        },
        "sandbox": sandbox_probe().to_dict(),  # isolation for untrusted code (vhack.sandbox)
    }
    print(json.dumps(info, indent=2))
    return 0
