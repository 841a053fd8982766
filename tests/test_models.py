"""The embedded tiny model and byte tokenizer."""

import torch

import vhack
from vhack.models import BYTE_VOCAB_SIZE, SPECIAL_TOKENS


def test_byte_tokenizer_round_trip_and_ids():
    tok = vhack.models.byte_tokenizer()
    text = "héllo\n\tworld ✓"
    ids = tok(text)["input_ids"]
    assert ids == list(text.encode("utf-8"))  # byte b has id b, nothing added
    assert tok.decode(ids) == text
    assert len(tok) == BYTE_VOCAB_SIZE
    assert tok.convert_tokens_to_ids(list(SPECIAL_TOKENS)) == [256, 257, 258, 259]
    assert (tok.eos_token_id, tok.pad_token_id) == (256, 257)
    assert tok("a<|endoftext|>")["input_ids"] == [97, 256]


def test_byte_tokenizer_chat_template_and_padding():
    tok = vhack.models.byte_tokenizer()
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    batch = tok(["ab", "abcd"], padding=True, return_tensors="pt")
    assert batch["input_ids"][0].tolist() == [97, 98, 257, 257]
    assert batch["attention_mask"][0].tolist() == [1, 1, 0, 0]


def test_tiny_model_is_deterministic_per_seed_and_keeps_global_rng():
    state = torch.random.get_rng_state()
    a, b, c = (vhack.models.tiny_model(seed=s) for s in (0, 0, 1))
    assert torch.equal(torch.random.get_rng_state(), state)
    for (name, pa), pb, _pc in zip(
        a.named_parameters(), b.parameters(), c.parameters(), strict=True
    ):
        assert torch.equal(pa, pb), name
    assert any(
        not torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters(), strict=True)
    )


def test_tiny_model_runs_and_generates():
    model, tok = vhack.models.load("tiny")
    assert type(model).__name__ == "Qwen3ForCausalLM" and not model.training
    ids = tok(["def f():"], return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape == (1, ids.shape[1] + 5)
    logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], BYTE_VOCAB_SIZE) and torch.isfinite(logits).all()


def test_tiny_config_overrides():
    model = vhack.models.tiny_model(num_hidden_layers=3, dtype=torch.bfloat16)
    assert len(model.model.layers) == 3 and model.lm_head.weight.dtype == torch.bfloat16
