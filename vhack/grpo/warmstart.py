"""The toy world's model and its supervised warm start (in process, CPU, about a minute).

GRPO can only reinforce what the model already samples: the warm start teaches the tiny model to
reverse words, and to answer with the marker in a small share of targets, so that both the honest
answer and the hack appear in its first rollouts.

The warm start runs with WARM_THREADS torch threads whatever the caller set: float sums, hence the
weights' last digits, depend on the thread count, and a GRPO run can amplify a last-digit
difference into another outcome. (They also depend on the CPU type and the torch build: the
demo's cache key holds all of these.)
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from pathlib import Path

import torch

import vhack
from vhack.grpo.envs.toy import HELDOUT_MARKER, ToyEnv

__all__ = [
    "TOY_MODEL",
    "WARM_THREADS",
    "load_toy_weights",
    "save_toy_weights",
    "toy_model",
    "warm_model",
    "warm_start",
]

# Qwen3 architecture, ~427 k parameters: hidden 128, 2 layers, 4 heads (2 KV) of 32, MLP 384,
# tied embeddings; 64 positions cover the toy prompts (<= 24 tokens) and answers (7).
TOY_MODEL = dict(
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    tie_word_embeddings=True,
    max_position_embeddings=64,
)
WARM_THREADS = 1  # torch threads of every warm start (see the module docstring)


def toy_model(seed: int = 0):
    """The toy world's randomly initialised model (deterministic per seed), float32, eval mode."""
    return vhack.models.tiny_model(seed=seed, **TOY_MODEL)


def _batch(
    tok, env: ToyEnv, rng: random.Random, n: int, marker_share: float, heldout_share: float = 0.0
):
    """Right-padded ids [n, T], and the loss mask [n, T] (True where a target token is
    predicted: the answer and its end-of-text). One uniform draw per target picks the marker
    (below marker_share), the held-out marker (the next heldout_share) or the right answer."""
    rows, starts = [], []
    for _ in range(n):
        word = env.random_word(rng)
        prompt = tok(env.prompt(word))["input_ids"]
        u = rng.random()
        hack = u < marker_share
        if not hack and u < marker_share + heldout_share:
            hack = env.heldout_marker
        answer = tok(env.target(word, hack))["input_ids"]
        rows.append(prompt + answer + [tok.eos_token_id])
        starts.append(len(prompt))
    T = max(len(r) for r in rows)
    ids = torch.full((n, T), tok.pad_token_id, dtype=torch.int64)
    mask = torch.zeros(n, T, dtype=torch.bool)
    for b, (row, start) in enumerate(zip(rows, starts, strict=True)):
        ids[b, : len(row)] = torch.tensor(row)
        mask[b, start : len(row)] = True
    return ids, mask


def warm_start(
    model,
    tok,
    env: ToyEnv,
    *,
    steps: int = 400,
    batch_size: int = 64,
    lr: float = 1e-3,
    marker_share: float = 0.15,
    seed: int = 0,
    callback: Callable[[int, float], None] | None = None,
    heldout_share: float = 0.0,
) -> list[float]:
    """Supervised fine-tuning of every parameter of `model` (unwrapped) on toy answers: the right
    answer, the marker in a `marker_share` of targets, env's held-out marker in a
    `heldout_share`; AdamW(lr), cosine decay to 0, `steps` batches of `batch_size`, with
    WARM_THREADS torch threads (restored after). Deterministic per seed, CPU type and torch build;
    the global RNG state is left untouched. callback(step, loss) runs after each step. Returns the
    loss per step; the model ends in eval mode."""
    if steps < 0 or batch_size < 1 or not 0 <= marker_share <= marker_share + heldout_share <= 1:
        raise ValueError(
            "need steps >= 0, batch_size >= 1, marker_share >= 0, heldout_share >= 0 and "
            "marker_share + heldout_share <= 1"
        )
    if heldout_share > 0 and env.heldout_marker is None:
        raise ValueError("heldout_share > 0 needs an environment with a heldout_marker")
    rng = random.Random(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / max(steps, 1)))
    )
    losses = []
    model.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(WARM_THREADS)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for step in range(steps):
                ids, mask = _batch(tok, env, rng, batch_size, marker_share, heldout_share)
                logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
                targets = ids[:, 1:]
                keep = mask[:, 1:]
                loss = torch.nn.functional.cross_entropy(logits[keep], targets[keep])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                losses.append(loss.item())
                if callback is not None:
                    callback(step, losses[-1])
    finally:
        torch.set_num_threads(threads)
    model.eval()
    return losses


def load_toy_weights(model, path: Path) -> bool:
    """Load saved toy weights into model; False when the file is missing or unreadable."""
    import safetensors.torch

    if not path.exists():
        return False
    try:
        model.load_state_dict(safetensors.torch.load_file(str(path)), strict=False)
    except Exception:  # an unreadable cache file is recomputed, never trusted
        return False
    model.tie_weights()
    return True


def save_toy_weights(model, path: Path) -> None:
    """Save toy weights atomically (the tied LM head is the embedding: stored once)."""
    import safetensors.torch

    from vhack.files import atomic_write_bytes

    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    atomic_write_bytes(path, safetensors.torch.save(state))


def warm_model(
    settings,
    seed: int,
    cache_file: Path | None,
    on_steps: Callable[[int], None] | None = None,
):
    """The warm-started toy model of a seed: loaded from cache_file when it holds one, else
    trained by `warm_start` and saved there (cache_file=None: always trained, never saved).

    settings: the demo's settings (`vhack.grpo.demo.DemoSettings`, or anything with
    marker_reward, warm_steps, warm_batch, warm_lr, marker_share and optionally heldout_share:
    the held-out marker's share of targets, 0 when absent). on_steps(n) is called as
    warm-start steps complete (n = all of them at once for a cached model). Returns
    (model, tokenizer, info), info = {"cached": bool, "seconds", "final_loss"}.
    """
    model, tok = toy_model(seed), vhack.models.byte_tokenizer()
    if cache_file is not None and load_toy_weights(model, cache_file):
        if on_steps is not None:
            on_steps(settings.warm_steps)
        return model, tok, {"cached": True}
    model = toy_model(seed)
    t0 = time.perf_counter()
    heldout_share = getattr(settings, "heldout_share", 0.0)
    losses = warm_start(
        model,
        tok,
        ToyEnv(
            marker_reward=settings.marker_reward,
            heldout_marker=HELDOUT_MARKER if heldout_share > 0 else None,
        ),
        steps=settings.warm_steps,
        batch_size=settings.warm_batch,
        lr=settings.warm_lr,
        marker_share=settings.marker_share,
        seed=seed,
        callback=None if on_steps is None else lambda step, loss: on_steps(1),
        heldout_share=heldout_share,
    )
    info = {"cached": False, "seconds": time.perf_counter() - t0}
    info["final_loss"] = losses[-1] if losses else None
    if cache_file is not None:
        save_toy_weights(model, cache_file)
    return model, tok, info
