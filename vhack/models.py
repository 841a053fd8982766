"""The embedded default model: a tiny Qwen3-architecture causal LM and a byte-level tokenizer, both
built offline (no hub access). Real models load by name or path through transformers.

Byte token ids: byte b has id b (0..255); the special tokens follow (see SPECIAL_TOKENS).
"""

from __future__ import annotations

from functools import cache

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

__all__ = ["SPECIAL_TOKENS", "byte_tokenizer", "load", "tiny_config", "tiny_model"]

SPECIAL_TOKENS = ("<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>")
BYTE_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)

# A ChatML template (the format Qwen3 uses), so chat-formatted prompts work with the tiny model.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _bytes_to_unicode() -> dict[int, str]:
    """The byte-level BPE alphabet: each byte maps to one printable unicode character
    (printable Latin-1 bytes map to themselves, the others to code points from 256 upwards)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


@cache
def _byte_tokenizer_json() -> str:
    alphabet = _bytes_to_unicode()
    vocab = {alphabet[b]: b for b in range(256)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return tok.to_str()


def byte_tokenizer():
    """A byte-level tokenizer (transformers PreTrainedTokenizerFast), built offline.

    Every UTF-8 byte is one token (id = byte value); eos = "<|endoftext|>" (256), pad = "<|pad|>"
    (257), and a ChatML chat template with "<|im_start|>" (258) / "<|im_end|>" (259).
    """
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_byte_tokenizer_json()),
        eos_token="<|endoftext|>",
        pad_token="<|pad|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        padding_side="right",
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_config(**overrides):
    """The Qwen3Config of `tiny_model`; keyword arguments override any field.

    Sizes are deliberately not powers of two (intermediate 160) so kernels see ragged shapes.
    """
    from transformers import Qwen3Config

    fields = dict(
        vocab_size=BYTE_VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=256,
        pad_token_id=257,
    )
    fields.update(overrides)
    return Qwen3Config(**fields)


def tiny_model(seed: int = 0, dtype: torch.dtype = torch.float32, **config_overrides):
    """A small Qwen3-architecture causal LM (random init, ~0.1 M parameters), deterministic per
    seed; the global RNG state is left untouched. Returns a transformers Qwen3ForCausalLM in eval
    mode. config_overrides go to `tiny_config` (e.g. num_hidden_layers=4)."""
    from transformers import Qwen3ForCausalLM

    config = tiny_config(**config_overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(config)
    return model.to(dtype).eval()


def load(name_or_path: str = "tiny", *, seed: int = 0, dtype: torch.dtype | None = None):
    """(model, tokenizer): "tiny" gives the embedded default (tiny_model(seed), byte_tokenizer());
    anything else loads through transformers' Auto classes (a hub name or a local path)."""
    if name_or_path == "tiny":
        return tiny_model(seed=seed, dtype=dtype or torch.float32), byte_tokenizer()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"dtype": dtype} if dtype is not None else {}
    model = AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)
    return model.eval(), AutoTokenizer.from_pretrained(name_or_path)
