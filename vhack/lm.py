"""Model-agnostic helpers for causal language models: prompts to token ids, completion NLLs,
per-token NLLs from one forward. Shared by extraction, the GRPO loop and the environments.

Token ids of a (prompt, completion) are those of tokenizer(prompt_text + completion), where
prompt_text is the prompt itself for a plain-text prompt, and for a chat prompt (a list of
messages) the tokenizer's chat template applied with the generation prompt (tokenized without
adding special tokens again, since the template writes them); a tokenizer without a chat template
gets "role: content" lines followed by "assistant: ". The prompt boundary is the length of
tokenizer(prompt_text) (the common prefix, should the tokenizer merge tokens across the
boundary). Nothing is appended to the completion (no EOS).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

__all__ = [
    "Prompt",
    "completion_losses",
    "completion_nll",
    "compute_dtype",
    "encode",
    "encode_many",
    "eval_with_grad",
    "keeps_logits",
    "pad_token_id",
    "prompt_text",
    "slot_means",
    "token_nll",
]

Prompt = str | Sequence[dict[str, str]]


def prompt_text(tokenizer, prompt: Prompt) -> str:
    """The text a prompt stands for: itself, or a chat rendered with the tokenizer's chat template
    (generation prompt added); without a template, "role: content" lines then "assistant: "."""
    if isinstance(prompt, str):
        return prompt
    messages = [dict(m) for m in prompt]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "


def encode(tokenizer, prompt: Prompt, completion: str) -> tuple[list[int], int]:
    """(token ids of prompt_text + completion, index of the first completion token)."""
    return encode_many(tokenizer, [(prompt, completion)])[0]


def encode_many(tokenizer, items: Sequence[tuple[Prompt, str]]) -> list[tuple[list[int], int]]:
    """`encode` of every (prompt, completion), tokenized in batched tokenizer calls."""
    texts = [prompt_text(tokenizer, prompt) for prompt, _ in items]
    # A chat template writes its special tokens itself; plain text gets the tokenizer's defaults.
    out: list[tuple[list[int], int] | None] = [None] * len(items)
    for add_special in (True, False):
        idx = [i for i, (p, _) in enumerate(items) if isinstance(p, str) == add_special]
        if not idx:
            continue
        # One tokenizer call for the full texts and the distinct prompts (a pair's two
        # completions share theirs).
        prompts = list(dict.fromkeys(texts[i] for i in idx))
        fulls = [texts[i] + items[i][1] for i in idx]
        ids_all = tokenizer(fulls + prompts, add_special_tokens=add_special)["input_ids"]
        prompt_ids_of = dict(zip(prompts, ids_all[len(fulls) :], strict=True))
        for i, ids in zip(idx, ids_all[: len(fulls)], strict=True):
            prompt_ids = prompt_ids_of[texts[i]]
            start = 0  # the common prefix, should the tokenizer merge across the boundary
            while start < min(len(ids), len(prompt_ids)) and ids[start] == prompt_ids[start]:
                start += 1
            out[i] = (list(ids), start)
    return out


def pad_token_id(tokenizer) -> int:
    """The tokenizer's pad token id (0 when it has none)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


@contextmanager
def eval_with_grad(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode with gradients enabled; every submodule's training flag is restored after."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.enable_grad():
            yield
    finally:
        for m, training in modes:
            m.training = training


def completion_nll(
    model: torch.nn.Module, seqs: list[tuple[list[int], int]], pad_id: int, device: torch.device
) -> torch.Tensor:
    """Mean NLL of each sequence's completion tokens [B] (float32); seqs are (token ids, index of
    the first completion token), right-padded with pad_id into one batch."""
    ids = torch.full((len(seqs), max(len(toks) for toks, _ in seqs)), pad_id, dtype=torch.int64)
    rows, preds, targets = [], [], []
    for b, (toks, start) in enumerate(seqs):
        ids[b, : len(toks)] = torch.tensor(toks, dtype=torch.int64)
        rows.append(torch.full((len(toks) - start,), b, dtype=torch.int64))
        preds.append(torch.arange(start - 1, len(toks) - 1))  # token i is predicted at i - 1
        targets.append(torch.tensor(toks[start:], dtype=torch.int64))
    row = torch.cat(rows).to(device)
    # No attention mask: in a causal LM, real tokens never attend to the right padding after them,
    # and no loss is read at a padding position. Without a mask the attention keeps its fast
    # causal path.
    nll = token_nll(
        model,
        ids.to(device),
        row,
        torch.cat(preds).to(device),
        torch.cat(targets).to(device),
        min(start for _, start in seqs) - 1,
    )
    return slot_means(nll, row, len(seqs))


def completion_losses(model, tokenizer, items: Sequence[tuple[Prompt, str]]) -> torch.Tensor:
    """Mean NLL of each completion's tokens given its prompt: float32 [n], differentiable.

    items: (prompt, completion) pairs, tokenized like `extract` does (`encode_many`) and run as
    one right-padded batch on the model's device.
    """
    seqs = encode_many(tokenizer, items)
    pad_id = pad_token_id(tokenizer)
    device = next(model.parameters()).device
    return completion_nll(model, seqs, pad_id, device)


def compute_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype the model computes in: that of its input embeddings (float32 if it has none)."""
    get = getattr(model, "get_input_embeddings", None)
    embeddings = get() if get is not None else None
    weight = getattr(embeddings, "weight", None)
    return weight.dtype if weight is not None else torch.float32


def keeps_logits(model: torch.nn.Module) -> bool:
    """Whether model.forward takes logits_to_keep (transformers causal LMs)."""
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def token_nll(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    row: torch.Tensor,
    pred_pos: torch.Tensor,
    target: torch.Tensor,
    first_pred: int,
    **model_kwargs,
) -> torch.Tensor:
    """NLL [N] float32 of each token target[j] under the logits at (row[j], pred_pos[j]) of one
    forward of input_ids [B, L] (model_kwargs go to the model). first_pred <= every pred_pos:
    logits are kept from there on only (logits_to_keep, where the model takes it)."""
    L = input_ids.shape[1]
    if keeps_logits(model):
        model_kwargs["logits_to_keep"] = L - first_pred
    logits = model(input_ids=input_ids, **model_kwargs).logits
    offset = L - logits.shape[1]  # logits[:, j] is position offset + j
    picked = logits[row, pred_pos - offset].float()  # [N, vocab]
    return torch.nn.functional.cross_entropy(picked, target, reduction="none")


def slot_means(values: torch.Tensor, slot: torch.Tensor, n_slots: int) -> torch.Tensor:
    """Mean of values [N] per slot id in [0, n_slots) -> [n_slots] (NaN for an empty slot)."""
    sums = torch.zeros(n_slots, dtype=values.dtype, device=values.device)
    counts = torch.zeros(n_slots, dtype=values.dtype, device=values.device)
    return sums.index_add(0, slot, values) / counts.index_add(0, slot, torch.ones_like(values))
