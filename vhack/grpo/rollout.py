"""The sampler: completions from the merged dense weights (transformers generate, KV cache, left
padding), and the per-token log-probabilities of those completions through the adapter.

A batch of rollouts is a left-padded prompt block [B, P] followed by a completion block [B, T]
(T = max_new_tokens): each completion runs up to and including its first end-of-text token and is
padded after it. `completion_mask` marks the tokens that count.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["Rollouts", "encode_prompts", "prompt_text", "sample_rollouts", "token_logprobs"]


def prompt_text(tok, prompt) -> tuple[str, bool]:
    """(text, add_special_tokens) of a plain prompt or a chat (rendered with the chat template,
    generation prompt added; the template writes its own special tokens)."""
    if isinstance(prompt, str):
        return prompt, True
    messages = [dict(m) for m in prompt]
    if not getattr(tok, "chat_template", None):
        raise ValueError("a chat prompt needs a tokenizer with a chat template")
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True), False


def encode_prompts(tok, prompts: Sequence) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompt ids [n, P] int64 and attention mask [n, P] int64."""
    rows = []
    for prompt in prompts:
        text, special = prompt_text(tok, prompt)
        ids = tok(text, add_special_tokens=special)["input_ids"]
        if not ids:
            raise ValueError(f"prompt {prompt!r} encodes to no tokens")
        rows.append(ids)
    P = max(len(r) for r in rows)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    ids = torch.full((len(rows), P), pad, dtype=torch.int64)
    mask = torch.zeros(len(rows), P, dtype=torch.int64)
    for b, row in enumerate(rows):
        ids[b, P - len(row) :] = torch.tensor(row)
        mask[b, P - len(row) :] = 1
    return ids, mask


@dataclass
class Rollouts:
    """input_ids / attention_mask [B, P + T] int64 (prompt block left-padded, completion block
    padded after the first end-of-text); completion_mask [B, T] float32 (1 = the token counts);
    texts: the decoded completions (special tokens dropped)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    completion_mask: torch.Tensor
    prompt_len: int
    texts: list[str]

    @property
    def completion_ids(self) -> torch.Tensor:
        return self.input_ids[:, self.prompt_len :]

    def select(self, rows: torch.Tensor) -> Rollouts:
        """The rollouts of `rows` (int64 indices)."""
        idx = rows.tolist()
        return Rollouts(
            self.input_ids[rows],
            self.attention_mask[rows],
            self.completion_mask[rows],
            self.prompt_len,
            [self.texts[i] for i in idx],
        )


@torch.no_grad()
def sample_rollouts(
    adapter,
    tok,
    prompts: Sequence,
    num_generations: int,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_p: float = 1.0,
) -> Rollouts:
    """num_generations sampled completions of every prompt (grouped: rows g*G .. g*G+G-1 belong
    to prompt g), generated on the merged dense weights with a KV cache. Sampling draws from
    torch's global RNG (seed it for reproducible runs)."""
    from transformers import GenerationConfig

    device = adapter.delta.device
    ids, mask = encode_prompts(tok, prompts)
    ids = ids.repeat_interleave(num_generations, 0).to(device)
    mask = mask.repeat_interleave(num_generations, 0).to(device)
    eos = tok.eos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    gen_config = GenerationConfig(
        do_sample=True,
        temperature=temperature,
        top_p=top_p,
        top_k=0,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos,
        pad_token_id=pad,
        use_cache=True,
    )
    model = adapter.model
    was_training = model.training
    model.eval()
    try:
        with adapter.merged():
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen_config)
    finally:
        model.train(was_training)
    P = ids.shape[1]
    comp = out[:, P:]
    n_rows, n_new = comp.shape
    if n_new < max_new_tokens:  # every row stopped early
        comp = torch.cat([comp, comp.new_full((n_rows, max_new_tokens - n_new), pad)], 1)
    is_eos = comp == eos
    # 1 up to and including the first end-of-text token
    after = (is_eos.cumsum(1) - is_eos.long()) > 0
    cmask = (~after).to(torch.float32)
    comp = torch.where(after, torch.full_like(comp, pad), comp)
    texts = []
    for row, m in zip(comp.tolist(), cmask.tolist(), strict=True):
        kept = [t for t, keep in zip(row, m, strict=True) if keep and t != eos]
        texts.append(tok.decode(kept, skip_special_tokens=True))
    return Rollouts(
        input_ids=torch.cat([ids, comp], 1),
        attention_mask=torch.cat([mask, cmask.long()], 1),
        completion_mask=cmask,
        prompt_len=P,
        texts=texts,
    )


def token_logprobs(model, rollouts: Rollouts, temperature: float = 1.0) -> torch.Tensor:
    """log p(token | prefix) of every completion token [B, T] float32, from logits divided by the
    sampling temperature; differentiable when grad is enabled. Positions count from each row's
    first real token (left padding), as generate counted them."""
    ids, mask = rollouts.input_ids, rollouts.attention_mask
    T = rollouts.completion_mask.shape[1]
    position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
    logits = model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=position_ids,
        use_cache=False,
        logits_to_keep=T + 1,
    ).logits[:, :-1]
    logp = (logits.float() / temperature).log_softmax(-1)
    return logp.gather(-1, ids[:, -T:, None]).squeeze(-1)
