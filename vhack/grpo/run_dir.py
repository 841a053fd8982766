"""A run's output directory, claimed before the run writes anything: the run writes only the
top-level entries it declares, and deletes only what a previous run of the same kind declared.

The claim is a manifest file, `.vhack-run.json` ({"kind", "names"}), written (atomically) before
anything else, so a run killed half-way is still recognised as this kind's. A directory is
refused with a one-line UsageError when
- it holds a previous run of this kind and `overwrite` is not set;
- it holds entries no run of this kind declared (another tool's `runs/`, a `vhack train` run,
  your files) and `overwrite` is not set;
- with `overwrite`: one of those foreign entries has a name this run would write.
With `overwrite`, the previous run's declared entries are removed; foreign entries never are.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

from vhack.errors import UsageError
from vhack.files import TMP_MARKER, atomic_write_text, remove_stale_temps

__all__ = ["MANIFEST", "claim_run_dir"]

MANIFEST = ".vhack-run.json"


def _shorten(names: Sequence[str], n: int = 4) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def _previous(out: Path, kind: str) -> list[str] | None:
    """The names a previous run of `kind` declared in out's manifest (None: no such run)."""
    try:
        manifest = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("kind") != kind:
        return None
    return [n for n in manifest.get("names", []) if isinstance(n, str) and "/" not in n]


def claim_run_dir(
    out: str | os.PathLike, kind: str, names: Sequence[str], *, overwrite: bool, flag: str = "--out"
) -> Path:
    """Claim `out` for a run of `kind` that writes the top-level entries `names` (files or
    directories); see the module docstring. Returns out as a Path, created."""
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise UsageError(f"{flag} {out}: is a file; pass a directory")
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out)  # this module's temporaries of a killed run
    previous = _previous(out, kind)
    own = set(previous or ()) | {MANIFEST}
    foreign = sorted(
        p.name for p in out.iterdir() if p.name not in own and TMP_MARKER not in p.name
    )
    if previous is not None and not overwrite:
        raise UsageError(
            f"{flag} {out}: holds a previous {kind} run; pass --overwrite to replace it (its "
            f"files only) or another {flag}"
        )
    if foreign and not overwrite:
        raise UsageError(
            f"{flag} {out}: holds files {kind} did not write ({_shorten(foreign)}); pass an empty "
            f"or new {flag}, or --overwrite to write beside them (they are kept)"
        )
    clash = sorted(set(foreign) & set(names))
    if clash:
        raise UsageError(
            f"{flag} {out}: holds {_shorten(clash)}, which {kind} did not write but would "
            f"overwrite; move them away or pass another {flag}"
        )
    for name in previous or ():
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
    atomic_write_text(
        out / MANIFEST, json.dumps({"kind": kind, "names": sorted(names)}, indent=2) + "\n"
    )
    return out
