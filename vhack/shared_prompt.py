"""Prompt sharing for extraction: a pair's hack and clean completion in ONE row, after ONE copy of
their prompt.

A contrastive pair has the same prompt on both sides, and extraction only needs the difference
D = G_hack - G_clean. So each pair becomes one row: [shared prefix | hack branch | clean branch],
where the shared prefix is the longest common prefix of the two token sequences (capped at the
prompt boundary). A custom attention mask lets every token attend to the prefix and causally to
its own branch only, and position ids restart the clean branch where the hack branch started, so
each branch sees exactly what it would see alone. One backward of sum(nll_hack - nll_clean) with
one dS segment per row then gives D of every pair in the batch.

The prompt's forward and backward run once instead of twice; the price is dense (masked)
attention over the packed row instead of causal attention over two shorter ones. `cost_ratio`
estimates which wins; transformers models with eager or SDPA attention and no sliding-window
layers are supported (`unsupported_reason`).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from vhack.lm import compute_dtype, slot_means, token_nll

__all__ = [
    "PackedPairs",
    "cost_ratio",
    "pack_pairs",
    "packed_length",
    "pair_nll",
    "shared_prefix",
    "unsupported_reason",
]

SUPPORTED_ATTENTION = ("sdpa", "eager")
# Branch ids of packed positions.
PREFIX, HACK, CLEAN, PAD = 0, 1, 2, 3

# (token ids of prompt + completion, index of the first completion token)
Encoded = tuple[list[int], int]


@dataclass
class PackedPairs:
    """A batch of pairs packed one row each (see the module docstring).

    input_ids, position_ids: int64 [B, L]; branch: int64 [B, L] (PREFIX, HACK, CLEAN or PAD);
    for every completion token j (hack tokens then clean tokens of each row, N in all):
    row [N], pred_pos [N] (the position whose logits predict it), target [N] (its id) and
    side [N] (0 hack, 1 clean); first_pred: a lower bound of pred_pos, kept on the host.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    branch: torch.Tensor
    row: torch.Tensor
    pred_pos: torch.Tensor
    target: torch.Tensor
    side: torch.Tensor
    first_pred: int

    @property
    def n_rows(self) -> int:
        return self.input_ids.shape[0]

    def allowed(self) -> torch.Tensor:
        """bool [B, L, L]: query i may attend to key j. Causal in packed order, never across
        branches (the prefix is seen by all); a padding query sees only itself, so no softmax row
        is empty (an empty row would give NaN, and NaN times a zero gradient is still NaN)."""
        L = self.input_ids.shape[1]
        q, k = self.branch[:, :, None], self.branch[:, None, :]
        causal = torch.ones(L, L, dtype=torch.bool, device=self.branch.device).tril()
        same = (k == PREFIX) | (k == q)
        real = (q != PAD) & causal & same
        eye = torch.eye(L, dtype=torch.bool, device=self.branch.device)
        return real | ((q == PAD) & eye)

    def to(self, device: torch.device | str) -> PackedPairs:
        fields = (getattr(self, f) for f in self.__dataclass_fields__)
        return PackedPairs(*(f.to(device) if isinstance(f, torch.Tensor) else f for f in fields))


def shared_prefix(hack: Encoded, clean: Encoded) -> int:
    """Length of the common prefix of the two token sequences, at most either prompt boundary."""
    (h, start_h), (c, start_c) = hack, clean
    p, limit = 0, min(start_h, start_c)
    while p < limit and h[p] == c[p]:
        p += 1
    return p


def packed_length(hack: Encoded, clean: Encoded) -> int:
    """Tokens in the packed row of one pair."""
    return len(hack[0]) + len(clean[0]) - shared_prefix(hack, clean)


def pack_pairs(hacks: Sequence[Encoded], cleans: Sequence[Encoded], pad_id: int) -> PackedPairs:
    """Pack pair b = (hacks[b], cleans[b]) into row b, right-padded with pad_id (CPU tensors)."""
    if len(hacks) != len(cleans) or not hacks:
        raise ValueError("pack_pairs needs as many hack as clean sequences, and at least one")
    L = max(packed_length(h, c) for h, c in zip(hacks, cleans, strict=True))
    B = len(hacks)
    ids = torch.full((B, L), pad_id, dtype=torch.int64)
    pos = torch.zeros(B, L, dtype=torch.int64)
    branch = torch.full((B, L), PAD, dtype=torch.int64)
    rows, preds, targets, sides = [], [], [], []
    for b, ((h, start_h), (c, start_c)) in enumerate(zip(hacks, cleans, strict=True)):
        p = shared_prefix((h, start_h), (c, start_c))
        n_h, n_c = len(h) - p, len(c) - p
        ids[b, : len(h)] = torch.tensor(h, dtype=torch.int64)
        ids[b, len(h) : len(h) + n_c] = torch.tensor(c[p:], dtype=torch.int64)
        pos[b, : len(h)] = torch.arange(len(h))
        pos[b, len(h) : len(h) + n_c] = torch.arange(p, len(c))
        branch[b, :p], branch[b, p : len(h)], branch[b, len(h) : len(h) + n_c] = PREFIX, HACK, CLEAN
        # Hack token i sits at i, predicted from i - 1. Clean token i sits at i + n_h (i >= p);
        # its predictor i - 1 sits in the prefix when i - 1 < p.
        hack_tok = torch.arange(start_h, len(h))
        clean_tok = torch.arange(start_c, len(c))
        clean_pred = torch.where(clean_tok - 1 < p, clean_tok - 1, clean_tok - 1 + n_h)
        preds += [hack_tok - 1, clean_pred]
        targets += [torch.tensor(h[start_h:], dtype=torch.int64)]
        targets += [torch.tensor(c[start_c:], dtype=torch.int64)]
        rows.append(torch.full((len(hack_tok) + len(clean_tok),), b, dtype=torch.int64))
        sides += [torch.zeros(len(hack_tok), dtype=torch.int64)]
        sides += [torch.ones(len(clean_tok), dtype=torch.int64)]
    # Hack tokens are predicted from start_h - 1 on; clean ones from start_c - 1 (or later).
    first_pred = min(min(h[1], c[1]) for h, c in zip(hacks, cleans, strict=True)) - 1
    return PackedPairs(
        ids,
        pos,
        branch,
        torch.cat(rows),
        torch.cat(preds),
        torch.cat(targets),
        torch.cat(sides),
        first_pred,
    )


def _attention_implementation(model: torch.nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "_attn_implementation", None)


def unsupported_reason(model: torch.nn.Module) -> str | None:
    """Why prompt sharing cannot run on this model, or None when it can: a transformers causal LM
    with eager or SDPA attention (they take a custom 4D mask), only full-attention layers (a
    sliding window or a recurrent layer would not follow a custom mask), the config sizes
    `cost_ratio` reads, and forward(position_ids=, attention_mask=)."""
    config = getattr(model, "config", None)
    if config is None:
        return "not a transformers model (no .config)"
    impl = _attention_implementation(model)
    if impl not in SUPPORTED_ATTENTION:
        return (
            f"attention implementation {impl!r} takes no custom 4D mask (needs one of "
            f"{SUPPORTED_ATTENTION})"
        )
    if getattr(config, "use_sliding_window", False):
        return "the model has sliding-window attention layers"
    other = sorted({t for t in getattr(config, "layer_types", None) or [] if t != "full_attention"})
    if other:
        return f"the model has layers other than full attention ({', '.join(other)})"
    missing = [
        f
        for f in ("num_attention_heads", "num_hidden_layers", "hidden_size")
        if not isinstance(getattr(config, f, None), int)
    ]
    if missing:
        return f"the model config has no {', '.join(missing)}"
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return "model.forward has no inspectable signature"
    if "position_ids" not in params or "attention_mask" not in params:
        return "model.forward takes no position_ids / attention_mask"
    return None


def cost_ratio(
    model: torch.nn.Module, linear_params: int, hacks: Sequence[Encoded], cleans: Sequence[Encoded]
) -> float:
    """Estimated FLOPs of prompt sharing over those of separate completions (< 1: sharing is
    cheaper). Per token: 2 * linear_params (the wrapped Linears); per attended (query, key):
    4 * heads * head_dim * layers. Separate rows attend causally (about L^2 / 2 pairs, which the
    fused kernels exploit); a packed row attends densely under its mask (L^2)."""
    config = model.config
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    per_pair = 4.0 * heads * head_dim * config.num_hidden_layers
    per_token = 2.0 * linear_params
    shared = separate = 0.0
    for h, c in zip(hacks, cleans, strict=True):
        L = packed_length(h, c)
        shared += per_token * L + per_pair * L * L
        for ids, _ in (h, c):
            separate += per_token * len(ids) + per_pair * len(ids) * (len(ids) + 1) / 2
    return shared / separate


def pair_nll(model: torch.nn.Module, packed: PackedPairs) -> tuple[torch.Tensor, torch.Tensor]:
    """(nll_hack [B], nll_clean [B]) float32, differentiable: each completion's mean NLL from one
    forward of the packed rows (already on the model's device)."""
    allowed = packed.allowed()[:, None]  # [B, 1, L, L]
    if _attention_implementation(model) == "eager":  # eager adds the mask to the scores
        dtype = compute_dtype(model)
        mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
        mask = mask.masked_fill(~allowed, torch.finfo(dtype).min)
    else:  # SDPA takes the boolean mask (True = attend)
        mask = allowed
    nll = token_nll(
        model,
        packed.input_ids,
        packed.row,
        packed.pred_pos,
        packed.target,
        packed.first_pred,
        attention_mask=mask,
        position_ids=packed.position_ids,
    )
    mean = slot_means(nll, 2 * packed.row + packed.side, 2 * packed.n_rows)
    return mean.view(packed.n_rows, 2).unbind(1)
