"""HackBasis: per-module hack axes V [k, r] with their singular values, and the schema-v2 file.

File schema "v2_with_sv" (safetensors, written by `HackBasis.save`):
    {name}      float32 [k_max, r]  orthonormal rows (tau-zeroed rows are 0), oriented hack-ward
    _sv/{name}  float32 [k_max]     singular values of D = G_hack - G_clean, descending
    metadata (all strings): schema, top_k, tau_axis, n_pairs, n_train, n_heldout, model, dtype,
    pairset_hash, vhack_version, delta_norm, names (JSON list, packed order), fingerprint (JSON).
k_max = min(top_k, n_train, r): D has at most n_train non-zero singular values.

Fingerprint: a hash of the module names and shapes (d_out, d_in, r), plus, per module, the weight's
singular values S at 16 evenly spaced indices. S recomputed on another device differs in its last
bits (measured ~3e-7 of S_0 between float32 and float64 SVDs of the tiny model), a bfloat16 copy of
the same weights by ~2e-4 of S_0, while another seed of the tiny model differs by 1e-2 to 9e-2 of
S_0 in every module: values are compared with a tolerance of 1e-3 * S_0 per module.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import safetensors
import safetensors.torch
import torch

from vhack.files import atomic_write_bytes, regular_file
from vhack.packing import pack_blocks

__all__ = [
    "SCHEMA",
    "BasisFileError",
    "HackBasis",
    "PackedBasis",
    "adapter_fingerprint",
    "fingerprint_mismatches",
]

SCHEMA = "v2_with_sv"
SV_PREFIX = "_sv/"
REQUIRED_METADATA = (
    "schema",
    "top_k",
    "tau_axis",
    "n_pairs",
    "n_heldout",
    "model",
    "dtype",
    "pairset_hash",
    "vhack_version",
    "names",
    "fingerprint",
)
FINGERPRINT_POINTS = 16
FINGERPRINT_RTOL = 1e-3  # of the module's largest singular value S_0


class BasisFileError(ValueError):
    """A hack-basis file that cannot be read: corrupted, truncated, or not a vhack basis."""


class PackedBasis(NamedTuple):
    """A basis in the packed layout of `vhack.ops.project_`, in an adapter's module order.

    basis float32 [sum k_m r_m] (row-major blocks), basis_offsets int64 [M + 1], ks int64 [M]
    (0 for adapter modules the basis does not cover).
    """

    basis: torch.Tensor
    basis_offsets: torch.Tensor
    ks: torch.Tensor


# ---------------------------------------------------------------------------------------------
# Fingerprint
# ---------------------------------------------------------------------------------------------


def _spectrum_summary(S: torch.Tensor) -> list[float]:
    idx = torch.linspace(0, S.numel() - 1, FINGERPRINT_POINTS).round().long().unique()
    return [float(f"{v:.7g}") for v in S.detach().float().cpu()[idx].tolist()]


def adapter_fingerprint(adapter, names: Sequence[str] | None = None) -> dict:
    """{"structure": hash of names and shapes, "spectrum": {name: S at 16 indices}} of the given
    modules of an adapter (all of them by default)."""
    names = list(adapter.names if names is None else names)
    h = hashlib.blake2b(digest_size=8)
    for name in names:
        mod = adapter.modules[name]
        h.update(f"{name}:{mod.out_features}x{mod.in_features}:r{mod.rank};".encode())
    return {
        "structure": h.hexdigest(),
        "spectrum": {name: _spectrum_summary(adapter.modules[name].S) for name in names},
    }


def fingerprint_mismatches(stored: Mapping, adapter, names: Sequence[str]) -> list[str]:
    """Why `adapter` is not the model a stored fingerprint was taken from ([] when it is)."""
    current = adapter_fingerprint(adapter, names)
    problems = []
    if stored.get("structure") != current["structure"]:
        problems.append("module names/shapes hash differs")
    spectra = stored.get("spectrum", {})
    for name in names:
        want, have = spectra.get(name), current["spectrum"][name]
        if want is None or len(want) != len(have):
            problems.append(f"{name}: no comparable singular-value summary stored")
            continue
        scale = max(abs(want[0]), 1e-30)
        worst = max(abs(a - b) for a, b in zip(want, have, strict=True)) / scale
        if worst > FINGERPRINT_RTOL:
            problems.append(
                f"{name}: weight singular values differ by {worst:.1e} of S_0 "
                f"(tolerance {FINGERPRINT_RTOL:.0e})"
            )
    return problems


# ---------------------------------------------------------------------------------------------
# HackBasis
# ---------------------------------------------------------------------------------------------


class HackBasis:
    """Per-module hack axes: V(name) [k, r] float32 (orthonormal rows oriented hack-ward; rows that
    tau_axis zeroed are 0) and sv(name) [k] float32 (singular values of D, descending).

    Modules keep the adapter's packed order (`names`). Build one with `vhack.extract`, or
    `HackBasis.load` a saved file. `metadata` holds strings (see the module docstring).
    """

    def __init__(
        self,
        V: Mapping[str, torch.Tensor],
        sv: Mapping[str, torch.Tensor],
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        if list(V) != list(sv):
            raise ValueError("V and sv must have the same module names in the same order")
        if not V:
            raise ValueError("a hack basis needs at least one module")
        self._V: dict[str, torch.Tensor] = {}
        self._sv: dict[str, torch.Tensor] = {}
        for name in V:
            v, s = V[name], sv[name]
            if v.dim() != 2 or s.dim() != 1 or s.shape[0] != v.shape[0] or v.shape[0] == 0:
                raise ValueError(
                    f"{name}: V must be [k, r] and sv [k] with k >= 1, got "
                    f"{tuple(v.shape)} and {tuple(s.shape)}"
                )
            self._V[name] = v.detach().to(torch.float32).contiguous()
            self._sv[name] = s.detach().to(torch.float32).contiguous()
        self.metadata: dict[str, str] = {str(k): str(v) for k, v in (metadata or {}).items()}

    # ---- access ------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        """Module names, in packed (adapter) order."""
        return list(self._V)

    def V(self, name: str) -> torch.Tensor:
        """[k, r] float32 hack axes of a module (rows oriented hack-ward)."""
        return self._V[name]

    def sv(self, name: str) -> torch.Tensor:
        """[k] float32 singular values of the module's paired-difference matrix D."""
        return self._sv[name]

    def k(self, name: str) -> int:
        """Number of axes (rows) of a module."""
        return self._V[name].shape[0]

    @property
    def device(self) -> torch.device:
        return next(iter(self._V.values())).device

    def __len__(self) -> int:
        return len(self._V)

    def __repr__(self) -> str:
        ks = sorted({self.k(n) for n in self.names})
        return f"HackBasis({len(self)} modules, k in {ks}, device={self.device})"

    def to(self, device: torch.device | str) -> HackBasis:
        """A copy on `device`."""
        return HackBasis(
            {n: v.to(device) for n, v in self._V.items()},
            {n: s.to(device) for n, s in self._sv.items()},
            self.metadata,
        )

    def packed(self, adapter, device: torch.device | str | None = None) -> PackedBasis:
        """The basis in the packed layout of `vhack.ops.project_`, in the module order of
        `adapter` (or any object with `.names` and `.ranks`); adapter modules the basis does not
        cover get k = 0. Raises ValueError when a basis module is missing or has another r."""
        names, ranks = list(adapter.names), list(adapter.ranks)
        rank_of = dict(zip(names, ranks, strict=True))
        check_compatible(self, rank_of)
        if device is None:
            delta = getattr(adapter, "delta", None)
            device = delta.device if delta is not None else self.device
        blocks = [self._V.get(name) for name in names]
        return PackedBasis(*pack_blocks(blocks, ranks, dtype=torch.float32, device=device))

    # ---- load-time reductions ----------------------------------------------------------------
    def sliced(self, k: int) -> HackBasis:
        """The first min(k, k_m) axes of every module (k >= 1)."""
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be an integer >= 1, got {k!r}")
        return HackBasis(
            {n: v[:k] for n, v in self._V.items()},
            {n: s[:k] for n, s in self._sv.items()},
            {**self.metadata, "k": str(k)},
        )

    def noise_floor(self, drop_bottom_frac: float) -> HackBasis:
        """Drop the axes whose singular value lies below the `drop_bottom_frac` quantile of all
        singular values pooled over modules, and the modules left without axes.

        Rows are sorted by singular value within a module, so each module keeps a prefix.
        """
        if not isinstance(drop_bottom_frac, (int, float)) or not 0.0 <= drop_bottom_frac < 1.0:
            raise ValueError(f"drop_bottom_frac must be in [0, 1), got {drop_bottom_frac!r}")
        if drop_bottom_frac == 0.0:
            return self
        pooled = torch.cat([s.cpu() for s in self._sv.values()]).double()
        floor = torch.quantile(pooled, drop_bottom_frac).item()
        V, sv = {}, {}
        for name in self.names:
            keep = int((self._sv[name].cpu().double() >= floor).sum())
            if keep > 0:
                V[name], sv[name] = self._V[name][:keep], self._sv[name][:keep]
        meta = {**self.metadata, "drop_bottom_frac": str(drop_bottom_frac), "sv_floor": str(floor)}
        return HackBasis(V, sv, meta)

    # ---- files -------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write the schema-v2 safetensors file (atomically: a temporary file, then a rename)."""
        missing = [
            k for k in REQUIRED_METADATA if k not in self.metadata and k not in ("schema", "names")
        ]
        if missing:
            raise ValueError(
                f"cannot save a hack basis without metadata {missing}; bases from vhack.extract "
                "carry them"
            )
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for name in self.names:
            tensors[name] = self._V[name].cpu().contiguous()
            tensors[SV_PREFIX + name] = self._sv[name].cpu().contiguous()
        k_max = max(self.k(n) for n in self.names)
        if k_max > int(self.metadata["top_k"]):
            raise ValueError(f"metadata top_k={self.metadata['top_k']} < {k_max} stored axes")
        meta = {**self.metadata, "schema": SCHEMA, "names": json.dumps(self.names)}
        atomic_write_bytes(path, safetensors.torch.save(tensors, metadata=meta))
        return path

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        adapter=None,
        k: int | None = None,
        drop_bottom_frac: float = 0.0,
        strict: bool = True,
        *,
        device: torch.device | str | None = None,
    ) -> HackBasis:
        """Read a schema-v2 file.

        adapter: check that the basis belongs to this wrapped model (ValueError naming the
        mismatch: module names, shapes, or fingerprint; strict=False turns a fingerprint mismatch
        into a warning) and place the tensors on its device. k: keep the first k axes per module
        (1 <= k <= the stored top_k; modules with fewer stored axes keep them all). Then
        drop_bottom_frac applies the pooled noise floor (`noise_floor`). device: where the tensors
        go when no adapter is given (default CPU).
        """
        path = Path(path)
        tensors, meta, names = _read_file(path)
        top_k = int(meta["top_k"])
        basis = cls(
            {n: tensors[n] for n in names},
            {n: tensors[SV_PREFIX + n] for n in names},
            {key: value for key, value in meta.items() if key != "names"},
        )
        if adapter is not None:
            rank_of = dict(zip(adapter.names, adapter.ranks, strict=True))
            check_compatible(basis, rank_of, where=str(path))
            problems = fingerprint_mismatches(json.loads(meta["fingerprint"]), adapter, basis.names)
            if problems:
                shown = "; ".join(problems[:5]) + (" ..." if len(problems) > 5 else "")
                message = (
                    f"{path}: fingerprint mismatch: this basis was extracted from another model "
                    f"({meta['model']!r}) than the one given: {shown}"
                )
                if strict:
                    raise ValueError(message + ". Pass strict=False to load it anyway.")
                warnings.warn(message + " (loaded anyway: strict=False)", stacklevel=2)
            device = adapter.delta.device
        if k is not None:
            if isinstance(k, bool) or not isinstance(k, int) or k < 1:
                raise ValueError(f"k must be an integer >= 1 or None, got {k!r}")
            if k > top_k:
                raise ValueError(
                    f"k={k} is larger than the stored top_k={top_k} of {path}; re-extract with "
                    f"top_k >= {k} or load with a smaller k"
                )
            basis = basis.sliced(k)
        basis = basis.noise_floor(drop_bottom_frac)
        return basis.to(device) if device is not None else basis


def check_compatible(basis: HackBasis, rank_of: Mapping[str, int], where: str = "basis") -> None:
    """ValueError unless every module of the basis exists in the model with the same rank r."""
    missing = [n for n in basis.names if n not in rank_of]
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise ValueError(
            f"{where}: module names mismatch: {len(missing)} basis modules are not wrapped in "
            f"this model ({shown}); load the basis into the model it was extracted from"
        )
    wrong = {n: (basis.V(n).shape[1], rank_of[n]) for n in basis.names}
    wrong = {n: rr for n, rr in wrong.items() if rr[0] != rr[1]}
    if wrong:
        shown = ", ".join(f"{n}: basis r={a}, model r={b}" for n, (a, b) in list(wrong.items())[:5])
        raise ValueError(f"{where}: module shapes mismatch: {shown}")


def _read_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str], list[str]]:
    """(tensors, metadata strings, module names) of a basis file; BasisFileError for anything
    unreadable."""
    if not path.exists():
        raise FileNotFoundError(f"no hack basis file at {path}")
    try:
        regular_file(path, "hack basis")  # a FIFO would block safe_open forever
    except ValueError as err:
        raise BasisFileError(str(err)) from None
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (not a dict)
    except Exception as err:
        raise BasisFileError(
            f"{path}: cannot read the hack basis file: corrupted, truncated or not safetensors "
            f"({type(err).__name__}: {err})"
        ) from None
    schema = meta.get("schema")
    if schema is None:
        raise BasisFileError(f"{path}: no 'schema' metadata; this is not a vhack hack basis file")
    if schema != SCHEMA:
        raise BasisFileError(
            f"{path}: unknown schema {schema!r}; this version of vhack reads {SCHEMA!r}"
        )
    missing = [k for k in REQUIRED_METADATA if k not in meta]
    if missing:
        raise BasisFileError(f"{path}: metadata lacks {missing}")
    try:
        names = json.loads(meta["names"])
        top_k = int(meta["top_k"])
        tau_axis = float(meta["tau_axis"])
        json.loads(meta["fingerprint"])
    except (ValueError, TypeError) as err:
        raise BasisFileError(f"{path}: unreadable metadata ({err})") from None
    if not isinstance(names, list) or not names:
        raise BasisFileError(f"{path}: metadata 'names' must be a non-empty JSON list")
    expected = set(names) | {SV_PREFIX + n for n in names}
    if set(tensors) != expected:
        raise BasisFileError(
            f"{path}: tensors do not match the metadata's module names (missing "
            f"{sorted(expected - set(tensors))[:5]}, unexpected {sorted(set(tensors) - expected)[:5]})"
        )
    for name in names:
        V, sv = tensors[name], tensors[SV_PREFIX + name]
        if V.dim() != 2 or sv.dim() != 1 or V.shape[0] != sv.shape[0] or V.shape[0] == 0:
            raise BasisFileError(
                f"{path}: {name} must be V [k, r] and sv [k], got {tuple(V.shape)} and "
                f"{tuple(sv.shape)}"
            )
        if V.shape[0] > top_k:
            raise BasisFileError(f"{path}: {name} has {V.shape[0]} axes, more than top_k={top_k}")
        if not (torch.isfinite(V).all() and torch.isfinite(sv).all()):
            raise BasisFileError(f"{path}: {name} holds non-finite values")
    if top_k < 1 or not math.isfinite(tau_axis):
        raise BasisFileError(f"{path}: invalid top_k={top_k} or tau_axis={tau_axis}")
    return tensors, meta, names
