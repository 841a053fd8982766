"""Hack-basis extraction: per-completion dS gradients -> paired differences -> SVD -> orientation.

Loss of one completion: the mean NLL of its tokens given the prompt. Token ids are those of
tokenizer(prompt_text + completion), where prompt_text is the prompt itself for a plain-text prompt,
and for a chat prompt (a list of messages) the tokenizer's chat template applied with the
generation prompt (tokenized without adding special tokens again, since the template writes them);
a tokenizer without a chat template gets "role: content" lines followed by "assistant: ". The
prompt boundary is the length of tokenizer(prompt_text) (the common prefix, should the tokenizer
merge tokens across the boundary). Nothing is appended to the completion (no EOS).

Methods (all give the same D = G_hack - G_clean up to float32 summation order):
- "shared": one row per pair, the prompt once and both completions after it under a mask that
  keeps them apart (`vhack.shared_prompt`); ONE backward of sum(nll_hack - nll_clean) per batch of
  pairs, split per pair by the per-segment dS reduction (`Adapter.segment_grads`).
- "batched": a batch of completions per forward and ONE backward, split per completion.
- "loop": one forward and backward per completion; the reference.
- "auto" (the default): "shared" where the model supports it and the FLOP estimate says it is
  cheaper (short completions after long prompts; any real model), else "batched". The first
  shared extraction on a model also checks that its NLLs match an unshared forward and falls back
  to "batched" with a warning if they do not.
All use torch.autograd.grad, so a training run's accumulated `delta.grad` is never touched, and
run the model in eval mode (its modes are restored after).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
import weakref
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from vhack._version import __version__
from vhack.basis import BasisFileError, HackBasis, adapter_fingerprint
from vhack.cache import cache_dir as resolve_cache_dir
from vhack.difference_basis import basis_from_differences, basis_from_gradients
from vhack.extract_config import EXTRACT_TOP_K
from vhack.lm import (
    Prompt,
    completion_losses,
    completion_nll,
    compute_dtype,
    encode,
    encode_many,
    eval_with_grad,
    pad_token_id,
    prompt_text,
)
from vhack.pairs import Pair, pairset_hash
from vhack.shared_prompt import (
    cost_ratio,
    pack_pairs,
    packed_length,
    pair_nll,
    unsupported_reason,
)

__all__ = [
    "basis_cache_path",
    "basis_from_differences",
    "basis_from_gradients",
    "choose_method",
    "completion_grads",
    "completion_losses",
    "encode",
    "encode_many",
    "extract",
    "extraction_metadata",
    "load_or_extract",
    "make_batches",
    "pair_differences",
    "pair_gradients",
    "prompt_text",
]

METHODS = ("batched", "loop")  # per-completion gradients
PAIR_METHODS = ("auto", "shared", "batched", "loop")  # per-pair differences
# batch_size=None: rows sorted by length, as many per forward as fit in this many padded tokens.
DEFAULT_BATCH_TOKENS = 8192

# ---------------------------------------------------------------------------------------------
# Per-completion gradients
# ---------------------------------------------------------------------------------------------


def _check_finite(
    nll: torch.Tensor,
    grads: torch.Tensor,
    labels: Sequence[str],
    grad_labels: Sequence[str] | None = None,
) -> None:
    """ValueError naming the first completion with a non-finite NLL, or the first gradient row
    (labelled by grad_labels, default labels) that is not finite."""
    bad = (~torch.isfinite(nll)).nonzero().flatten().tolist()
    if bad:
        raise ValueError(
            f"non-finite NLL ({nll[bad[0]].item()}) for {labels[bad[0]]}; check the model's "
            "dtype/weights and that the completion is not empty"
        )
    bad = (~torch.isfinite(grads).all(1)).nonzero().flatten().tolist()
    if bad:
        raise ValueError(f"non-finite dS gradient for {(grad_labels or labels)[bad[0]]}")


def _check_batch_size(batch_size) -> None:
    if batch_size is not None and (
        isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1
    ):
        raise ValueError(f"batch_size must be None or an integer >= 1, got {batch_size!r}")


def make_batches(lengths: Sequence[int], batch_size: int | None = None) -> list[list[int]]:
    """Indices of rows of the given token lengths, longest first (to limit padding), grouped
    batch_size per batch; batch_size=None: as many per batch as fit in DEFAULT_BATCH_TOKENS padded
    tokens (rows x longest row), at least one."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    if batch_size is not None:
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    batches: list[list[int]] = []
    for i in order:  # the first row of a batch is its longest
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= DEFAULT_BATCH_TOKENS:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def _check_encoded(seqs: Sequence[tuple[list[int], int]], labels: Sequence[str]) -> None:
    for (ids, start), label in zip(seqs, labels, strict=True):
        if start >= len(ids):
            raise ValueError(f"{label}: the completion tokenizes to no tokens after the prompt")
        if start == 0:
            raise ValueError(
                f"{label}: no prompt tokens precede the completion (does the tokenizer merge "
                "the prompt's last characters with the completion's first?)"
            )


def completion_grads(
    adapter,
    tokenizer,
    items: Sequence[tuple[Prompt, str]],
    *,
    labels: Sequence[str] | None = None,
    method: str = "batched",
    batch_size: int | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """Packed dS gradient of each completion's mean NLL: float32 [n, R_total] on delta's device.

    items: (prompt, completion) pairs. labels: names used in error messages (default "completion
    i"). method "batched": a batch of completions per forward and ONE backward, split per
    completion by `Adapter.segment_grads` (batches from `make_batches`: batch_size completions,
    or by default as many as fit in DEFAULT_BATCH_TOKENS padded tokens); "loop": one forward and
    backward per completion. Raises ValueError naming the completion for a non-finite NLL or
    gradient, or a completion with no tokens.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    _check_batch_size(batch_size)
    labels = list(labels) if labels is not None else [f"completion {i}" for i in range(len(items))]
    seqs = encode_many(tokenizer, items)
    _check_encoded(seqs, labels)
    return _grads_of_encoded(
        adapter, seqs, labels, pad_token_id(tokenizer), method, batch_size, progress
    )


def _grads_of_encoded(
    adapter,
    seqs: Sequence[tuple[list[int], int]],
    labels: Sequence[str],
    pad_id: int,
    method: str,
    batch_size: int | None,
    progress: bool,
) -> torch.Tensor:
    """`completion_grads` of already encoded (and checked) completions."""
    delta, device = adapter.delta, adapter.delta.device
    out = torch.zeros(len(seqs), delta.numel(), dtype=torch.float32, device=device)
    if method == "loop":
        batches = [[i] for i in range(len(seqs))]
    else:
        batches = make_batches([len(ids) for ids, _ in seqs], batch_size)

    with eval_with_grad(adapter.model):
        for batch in tqdm(batches, desc="vhack: completion gradients", disable=not progress):
            batch_seqs = [seqs[i] for i in batch]
            batch_labels = [labels[i] for i in batch]
            if method == "loop":
                nll = completion_nll(adapter.model, batch_seqs, pad_id, device)
                (grad,) = torch.autograd.grad(nll.sum(), delta)
                grads = grad[None]
            else:
                T = max(len(ids) for ids, _ in batch_seqs)
                segment_ids = torch.arange(len(batch), device=device).repeat_interleave(T)
                with adapter.segment_grads(segment_ids, len(batch)) as cap:
                    nll = completion_nll(adapter.model, batch_seqs, pad_id, device)
                    torch.autograd.grad(nll.sum(), delta)
                grads = cap.packed
            _check_finite(nll.detach(), grads, batch_labels)
            out[torch.tensor(batch, device=device)] = grads
    return out


def pair_gradients(
    adapter,
    tokenizer,
    pairs: Sequence[Pair],
    *,
    method: str = "batched",
    batch_size: int | None = None,
    progress: bool = True,
    first_index: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(G_hack, G_clean): packed dS gradients [n_pairs, R_total] float32 of each pair's hack and
    clean completion (see `completion_grads`). first_index numbers the pairs in error messages."""
    items = [(p.prompt, p.hack) for p in pairs] + [(p.prompt, p.clean) for p in pairs]
    hack_labels, clean_labels = _pair_labels(len(pairs), first_index)
    labels = hack_labels + clean_labels
    G = completion_grads(
        adapter,
        tokenizer,
        items,
        labels=labels,
        method=method,
        batch_size=batch_size,
        progress=progress,
    )
    return G[: len(pairs)], G[len(pairs) :]


def _pair_labels(n: int, first_index: int) -> tuple[list[str], list[str]]:
    hack = [f"pair {first_index + i} (hack)" for i in range(n)]
    clean = [f"pair {first_index + i} (clean)" for i in range(n)]
    return hack, clean


def _encode_pairs(tokenizer, pairs: Sequence[Pair], first_index: int) -> tuple[list, list[str]]:
    """(encoded hack completions then clean ones, their labels), checked by `_check_encoded`."""
    hack_labels, clean_labels = _pair_labels(len(pairs), first_index)
    encoded = encode_many(
        tokenizer, [(p.prompt, p.hack) for p in pairs] + [(p.prompt, p.clean) for p in pairs]
    )
    _check_encoded(encoded, hack_labels + clean_labels)
    return encoded, hack_labels + clean_labels


class _Inconclusive(Exception):
    """The shared-prompt check could not compare (non-finite NLLs)."""


# Per model: {(attention implementation, dtype): None when prompt sharing matched an unshared
# forward, else why it did not}. Checked once per model and setting, on its first shared use.
_SHARED_CHECKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# Relative NLL difference allowed between the shared and the unshared forward of one pair.
SHARED_CHECK_RTOL = {torch.float32: 1e-4, torch.float64: 1e-8}
SHARED_CHECK_RTOL_HALF = 2e-2


def _shared_mismatch(model, hack, clean, pad_id: int, device: torch.device) -> str | None:
    """Run one pair both ways (no grad) and say how the NLLs differ, or None if they match.
    Raises _Inconclusive when the unshared NLLs are not finite (the pass proper reports that)."""
    with torch.no_grad():
        nll_h, nll_c = pair_nll(model, pack_pairs([hack], [clean], pad_id).to(device))
        alone = completion_nll(model, [hack, clean], pad_id, device)
    if not torch.isfinite(alone).all():
        raise _Inconclusive
    shared = torch.stack([nll_h[0], nll_c[0]])
    dtype = compute_dtype(model)
    rtol = SHARED_CHECK_RTOL.get(dtype, SHARED_CHECK_RTOL_HALF)
    rel = ((shared - alone).abs() / alone.abs().clamp_min(1e-6)).max().item()
    if not rel <= rtol:
        return (
            f"its NLLs differ from separate forwards by {rel:.2e} (relative; allowed {rtol:g}): "
            "the model does not honour the custom attention mask or position ids"
        )
    return None


def _resolve_method(adapter, method: str, hacks, cleans, pad_id: int) -> str:
    """The method "auto" stands for here, and "shared" after checking the model supports it."""
    model = adapter.model
    if method in ("batched", "loop"):
        return method
    reason = unsupported_reason(model)
    if reason is None and method == "auto":
        linear = sum(mod.in_features * mod.out_features for mod in adapter.modules.values())
        if cost_ratio(model, linear, hacks, cleans) >= 1.0:
            return "batched"
    if reason is None:
        key = (model.config._attn_implementation, compute_dtype(model))
        checks = _SHARED_CHECKS.setdefault(model, {})
        if key not in checks:
            try:
                with eval_with_grad(model):
                    checks[key] = _shared_mismatch(
                        model, hacks[0], cleans[0], pad_id, adapter.delta.device
                    )
            except _Inconclusive:
                return "shared"
        reason = checks[key]
    if reason is None:
        return "shared"
    if method == "shared":
        warnings.warn(
            f"prompt sharing is off for this model: {reason}; using 'batched'", stacklevel=3
        )
    return "batched"


def choose_method(adapter, tokenizer, pairs: Sequence[Pair], method: str = "auto") -> str:
    """The method `pair_differences(adapter, tokenizer, pairs, method=method)` runs: "shared",
    "batched" or "loop" (for "auto", "shared" or "batched" per the module docstring; for "shared"
    on a model that cannot share prompts, "batched" with a warning)."""
    if method not in PAIR_METHODS:
        raise ValueError(f"method must be one of {PAIR_METHODS}, got {method!r}")
    if not pairs:
        return "batched" if method != "loop" else "loop"
    encoded, _ = _encode_pairs(tokenizer, pairs, 0)
    hacks, cleans = encoded[: len(pairs)], encoded[len(pairs) :]
    return _resolve_method(adapter, method, hacks, cleans, pad_token_id(tokenizer))


def pair_differences(
    adapter,
    tokenizer,
    pairs: Sequence[Pair],
    *,
    method: str = "auto",
    batch_size: int | None = None,
    progress: bool = True,
    first_index: int = 0,
) -> torch.Tensor:
    """D = G_hack - G_clean: float32 [n_pairs, R_total] on delta's device, per pair the packed dS
    gradient of the hack completion's mean NLL minus the clean one's.

    method: "shared", "batched", "loop" or "auto" (module docstring). batch_size: rows per
    backward, i.e. pairs for "shared" and completions for "batched"; None (default) fits as many
    as DEFAULT_BATCH_TOKENS padded tokens allow (`make_batches`). "shared" on a model that
    cannot share prompts warns and uses "batched". first_index numbers the pairs in error
    messages. Raises ValueError naming the pair for a non-finite NLL or gradient.
    """
    if method not in PAIR_METHODS:
        raise ValueError(f"method must be one of {PAIR_METHODS}, got {method!r}")
    _check_batch_size(batch_size)
    encoded, labels = _encode_pairs(tokenizer, pairs, first_index)
    hacks, cleans = encoded[: len(pairs)], encoded[len(pairs) :]
    pad_id = pad_token_id(tokenizer)
    resolved = _resolve_method(adapter, method, hacks, cleans, pad_id) if pairs else "batched"
    if resolved != "shared":
        G = _grads_of_encoded(adapter, encoded, labels, pad_id, resolved, batch_size, progress)
        return G[: len(pairs)] - G[len(pairs) :]

    delta, device = adapter.delta, adapter.delta.device
    out = torch.zeros(len(pairs), delta.numel(), dtype=torch.float32, device=device)
    lengths = [packed_length(h, c) for h, c in zip(hacks, cleans, strict=True)]
    batches = make_batches(lengths, batch_size)
    with eval_with_grad(adapter.model):
        for batch in tqdm(batches, desc="vhack: pair differences", disable=not progress):
            packed = pack_pairs([hacks[i] for i in batch], [cleans[i] for i in batch], pad_id)
            packed = packed.to(device)
            segment_ids = torch.arange(len(batch), device=device).repeat_interleave(
                packed.input_ids.shape[1]
            )
            with adapter.segment_grads(segment_ids, len(batch)) as cap:
                nll_hack, nll_clean = pair_nll(adapter.model, packed)
                torch.autograd.grad((nll_hack - nll_clean).sum(), delta)
            _check_finite(
                torch.cat([nll_hack, nll_clean]).detach(),
                cap.packed,
                [labels[i] for i in batch] + [labels[len(pairs) + i] for i in batch],
                [f"pair {first_index + i}" for i in batch],
            )
            out[torch.tensor(batch, device=device)] = cap.packed
    return out


# ---------------------------------------------------------------------------------------------
# extract / load_or_extract
# ---------------------------------------------------------------------------------------------


def _model_name(model: torch.nn.Module) -> str:
    config = getattr(model, "config", None)
    name = getattr(config, "name_or_path", "") or getattr(config, "_name_or_path", "")
    return str(name) if name else type(model).__name__


def check_extract_args(pairs, top_k, tau_axis, n_heldout) -> None:
    """TypeError/ValueError for arguments `extract` cannot use."""
    if not isinstance(pairs, Sequence) or not all(isinstance(p, Pair) for p in pairs):
        raise TypeError("pairs must be a list of vhack.Pair (see vhack.load_pairs)")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be an integer >= 1, got {top_k!r}")
    if isinstance(n_heldout, bool) or not isinstance(n_heldout, int) or n_heldout < 0:
        raise ValueError(f"n_heldout must be an integer >= 0, got {n_heldout!r}")
    if not isinstance(tau_axis, (int, float)) or not 0.0 <= tau_axis <= 1.0:
        raise ValueError(f"tau_axis must be in [0, 1], got {tau_axis!r}")
    if len(pairs) < n_heldout + 2:
        raise ValueError(
            f"got {len(pairs)} pairs but need at least n_heldout + 2 = {n_heldout + 2}: two or "
            "more training pairs besides the held-out ones (a dozen is usual)"
        )
    first_of: dict[str, int] = {}
    for i, pair in enumerate(pairs):
        key = json.dumps([pair.to_json()["prompt"], pair.hack, pair.clean], sort_keys=True)
        if key in first_of:
            raise ValueError(
                f"pairs {first_of[key]} and {i} are identical (same prompt, hack and clean): a "
                "duplicate counts twice in the basis, and a held-out copy of a training pair "
                "makes the held-out tests in-sample; remove it"
            )
        first_of[key] = i


def extract(
    adapter,
    tokenizer,
    pairs: Sequence[Pair],
    top_k: int = EXTRACT_TOP_K,
    tau_axis: float = 0.0,
    n_heldout: int = 2,
    *,
    method: str = "auto",
    batch_size: int | None = None,
    progress: bool = True,
) -> HackBasis:
    """Extract a hack basis from contrastive pairs on a wrapped model, at its current dS.

    The last n_heldout pairs are held out (for `vhack.validate`); from the others: the dS gradient
    of every completion's mean NLL (module docstring), D = G_hack - G_clean per module, its SVD in
    float32, the top-k right singular vectors oriented by per-pair majority vote (ties keep +),
    rows with S_i / S_0 < tau_axis zeroed, and the singular values kept. method: "auto",
    "shared", "batched" or "loop" (see `pair_differences`); batch_size: pairs ("shared") or
    completions ("batched") per backward, by default as many as fit in DEFAULT_BATCH_TOKENS
    padded tokens. Returns a HackBasis on delta's device with the
    schema-v2 metadata.
    """
    check_extract_args(pairs, top_k, tau_axis, n_heldout)
    train = list(pairs[: len(pairs) - n_heldout])
    D = pair_differences(
        adapter, tokenizer, train, method=method, batch_size=batch_size, progress=progress
    )
    return basis_from_differences(
        D, adapter, top_k, tau_axis, extraction_metadata(adapter, pairs, top_k, tau_axis, n_heldout)
    )


def extraction_metadata(
    adapter, pairs: Sequence[Pair], top_k: int, tau_axis: float, n_heldout: int
) -> dict[str, str]:
    """The schema-v2 metadata (strings) of a basis extracted on `adapter` from `pairs`."""
    first = next(iter(adapter.modules.values()))
    return {
        "top_k": str(top_k),
        "tau_axis": repr(float(tau_axis)),
        "n_pairs": str(len(pairs)),
        "n_train": str(len(pairs) - n_heldout),
        "n_heldout": str(n_heldout),
        "model": _model_name(adapter.model),
        "dtype": str(first.U.dtype).replace("torch.", ""),
        "pairset_hash": pairset_hash(pairs),
        "vhack_version": __version__,
        "delta_norm": f"{adapter.delta.detach().norm().item():.6g}",
        "fingerprint": json.dumps(adapter_fingerprint(adapter), separators=(",", ":")),
    }


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()[-48:] or "model"


def basis_cache_path(
    adapter,
    pairs: Sequence[Pair],
    top_k: int = EXTRACT_TOP_K,
    tau_axis: float = 0.0,
    n_heldout: int = 2,
    cache_dir: str | os.PathLike | None = None,
) -> Path:
    """Where `load_or_extract` keeps a basis: <cache>/bases/<model slug>_k<top_k>_..._<pairset
    hash>_<model fingerprint key>.safetensors. The key hashes the module shapes and the weights'
    singular values rounded to 3 digits, so two models of one architecture (e.g. two seeds of the
    tiny model) get different files."""
    fp = adapter_fingerprint(adapter)
    coarse = json.dumps(
        [fp["structure"], *[[f"{v:.3g}" for v in s] for s in fp["spectrum"].values()]]
    )
    model_key = hashlib.blake2b(coarse.encode(), digest_size=6).hexdigest()
    name = (
        f"{_slug(_model_name(adapter.model))}_k{top_k}_tau{float(tau_axis):g}_h{n_heldout}_"
        f"{pairset_hash(pairs)}_{model_key}.safetensors"
    )
    return resolve_cache_dir(cache_dir) / "bases" / name


def load_or_extract(
    adapter,
    tokenizer,
    pairs: Sequence[Pair],
    cache_dir: str | os.PathLike | None = None,
    top_k: int = EXTRACT_TOP_K,
    k: int | None = 5,
    *,
    tau_axis: float = 0.0,
    n_heldout: int = 2,
    drop_bottom_frac: float = 0.0,
    method: str = "auto",
    batch_size: int | None = None,
    progress: bool = True,
) -> HackBasis:
    """Load the cached basis of this model and pair set (see `basis_cache_path`), extracting and
    saving it first when missing (or unreadable); then `HackBasis.load(path, adapter, k,
    drop_bottom_frac)`."""
    check_extract_args(pairs, top_k, tau_axis, n_heldout)
    path = basis_cache_path(adapter, pairs, top_k, tau_axis, n_heldout, cache_dir)
    if path.exists():
        try:
            return HackBasis.load(path, adapter, k=k, drop_bottom_frac=drop_bottom_frac)
        except BasisFileError as err:
            warnings.warn(f"re-extracting: {err}", stacklevel=2)
    basis = extract(
        adapter,
        tokenizer,
        pairs,
        top_k,
        tau_axis,
        n_heldout,
        method=method,
        batch_size=batch_size,
        progress=progress,
    )
    basis.save(path)
    return HackBasis.load(path, adapter, k=k, drop_bottom_frac=drop_bottom_frac)
