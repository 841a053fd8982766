"""ExtractConfig: the knobs of hack-basis extraction, torch-free (the CLI reads its options here).

EXTRACT_TOP_K is the one definition of the extraction default for top_k: `vhack.extract`,
`vhack.validate` and `vhack extract` use it. (The GRPO loop's own default, GRPOConfig.top_k, is
smaller: it extracts only the axes it projects.)
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["EXTRACT_METHODS", "EXTRACT_TOP_K", "ExtractConfig"]

EXTRACT_TOP_K = 12  # axes extracted per module by default (the axes a dozen pairs can give)
EXTRACT_METHODS = ("auto", "shared", "batched", "loop")


@dataclass
class ExtractConfig:
    """How `vhack extract` (and `vhack validate` without --basis) extracts a basis.

    top_k None: as many axes as the training pairs allow, at most EXTRACT_TOP_K; batch_size None:
    as many as fit in 8192 padded tokens.
    """

    pairs: str = field(
        default="coding", metadata={"help": "shipped pair set 'coding' or 'toy', or a JSONL file"}
    )
    top_k: int | None = field(
        default=None,
        metadata={
            "help": "axes extracted per module, at most the number of training pairs (default: "
            f"as many as the training pairs allow, at most {EXTRACT_TOP_K})"
        },
    )
    tau_axis: float = field(default=0.0, metadata={"help": "zero axes with S_i/S_0 < tau"})
    n_heldout: int = field(default=2, metadata={"help": "last pairs held out"})
    method: str = field(
        default="auto",
        metadata={
            "help": "how pair gradients are computed: 'shared' (one row per pair, the prompt "
            "once), 'batched' (completions batched), 'loop' (one backward per completion, the "
            "reference), 'auto' (shared where supported and cheaper, else batched)",
            "choices": EXTRACT_METHODS,
        },
    )
    batch_size: int | None = field(
        default=None,
        metadata={
            "help": "pairs (shared) or completions (batched) per backward (default: as many as "
            "fit in 8192 padded tokens)"
        },
    )
