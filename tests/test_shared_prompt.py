"""Prompt sharing (`vhack.shared_prompt`, method "shared"/"auto"): the packing and its mask against
brute force, D equal to the loop reference on the tiny model (SDPA and eager attention), the
support checks and the fallbacks, and the cost model behind "auto"."""

import sys

import pytest
import torch

import vhack
from vhack.extract import pair_differences, pair_gradients
from vhack.pairs import Pair
from vhack.shared_prompt import (
    CLEAN,
    HACK,
    PAD,
    PREFIX,
    cost_ratio,
    pack_pairs,
    pair_nll,
    shared_prefix,
    unsupported_reason,
)

extract_module = sys.modules["vhack.extract"]


def _tiny(attn: str = "sdpa", seed: int = 0):
    model, tok = vhack.models.load("tiny", seed=seed)
    model.config._attn_implementation = attn
    return vhack.wrap(model, use_cache=False, progress=False), tok


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


# ---- packing -------------------------------------------------------------------------------------


def test_shared_prefix_stops_at_the_first_difference_and_the_prompt_boundary():
    assert shared_prefix(([1, 2, 3, 4], 2), ([1, 2, 3, 5], 2)) == 2  # capped at the boundary
    assert shared_prefix(([1, 2, 3, 4], 3), ([1, 2, 3, 5], 3)) == 3
    # A tokenizer that merged across the boundary: the common prefix ends before it.
    assert shared_prefix(([1, 9, 4], 2), ([1, 2, 3, 5], 3)) == 1
    assert shared_prefix(([7, 4], 1), ([8, 5], 1)) == 0


def test_pack_pairs_layout_positions_and_targets():
    hack, clean = ([10, 11, 12, 20, 21], 3), ([10, 11, 12, 30], 3)
    short_h, short_c = ([10, 40], 1), ([10, 50], 1)
    packed = pack_pairs([hack, short_h], [clean, short_c], pad_id=0)
    assert packed.input_ids.tolist() == [[10, 11, 12, 20, 21, 30], [10, 40, 50, 0, 0, 0]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 4, 3], [0, 1, 1, 0, 0, 0]]
    assert packed.branch.tolist() == [
        [PREFIX, PREFIX, PREFIX, HACK, HACK, CLEAN],
        [PREFIX, HACK, CLEAN, PAD, PAD, PAD],
    ]
    # Hack tokens 20, 21 are predicted from positions 2, 3; clean token 30 from the prefix end.
    assert packed.row.tolist() == [0, 0, 0, 1, 1]
    assert packed.pred_pos.tolist() == [2, 3, 2, 0, 0]
    assert packed.target.tolist() == [20, 21, 30, 40, 50]
    assert packed.side.tolist() == [0, 0, 1, 0, 1]


def test_mask_equals_brute_force():
    gen = torch.Generator().manual_seed(0)
    hacks, cleans = [], []
    for _ in range(5):
        prompt = torch.randint(
            0, 9, (int(torch.randint(1, 6, (1,), generator=gen)),), generator=gen
        )
        h = prompt.tolist() + torch.randint(0, 9, (3,), generator=gen).tolist()
        c = (
            prompt.tolist()
            + torch.randint(
                0, 9, (int(torch.randint(1, 5, (1,), generator=gen)),), generator=gen
            ).tolist()
        )
        hacks.append((h, len(prompt)))
        cleans.append((c, len(prompt)))
    packed = pack_pairs(hacks, cleans, pad_id=0)
    allowed = packed.allowed()
    for b, row in enumerate(packed.branch.tolist()):
        for i, bi in enumerate(row):
            for j, bj in enumerate(row):
                if bi == PAD:
                    want = i == j
                else:
                    want = j <= i and bj in (PREFIX, bi)
                assert allowed[b, i, j].item() == want, (b, i, j)


# ---- equal to the reference on the tiny model ----------------------------------------------------


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("pairset", ["toy", "coding"])
def test_shared_differences_equal_the_loop(attn, pairset):
    adapter, tok = _tiny(attn)
    pairs = vhack.builtin_pairs(pairset)[:4]
    G_hack, G_clean = pair_gradients(adapter, tok, pairs, method="loop", progress=False)
    D = pair_differences(adapter, tok, pairs, method="shared", batch_size=3, progress=False)
    assert _rel(D, G_hack - G_clean) < 1e-5


def test_shared_nll_equals_separate_forwards_per_completion():
    adapter, tok = _tiny()
    pairs = vhack.builtin_pairs("toy")[:3]
    alone = extract_module.completion_losses(
        adapter.model,
        tok,
        [(p.prompt, p.hack) for p in pairs] + [(p.prompt, p.clean) for p in pairs],
    )
    enc = extract_module.encode_many(
        tok, [(p.prompt, p.hack) for p in pairs] + [(p.prompt, p.clean) for p in pairs]
    )
    nll_h, nll_c = pair_nll(adapter.model, pack_pairs(enc[:3], enc[3:], tok.pad_token_id))
    torch.testing.assert_close(torch.cat([nll_h, nll_c]), alone, rtol=1e-5, atol=1e-6)


def test_shared_extract_basis_equals_the_loop_and_batch_size_does_not_matter():
    adapter, tok = _tiny()
    pairs = vhack.builtin_pairs("toy")
    loop = vhack.extract(adapter, tok, pairs, method="loop", progress=False)
    for batch_size in (1, 4, 10):
        shared = vhack.extract(
            adapter, tok, pairs, method="shared", batch_size=batch_size, progress=False
        )
        for name in loop.names:
            torch.testing.assert_close(shared.sv(name), loop.sv(name), rtol=1e-3, atol=1e-7)
            # Leading, well-separated axis: same direction and sign.
            sv = loop.sv(name)
            if len(sv) > 1 and sv[1] < 0.9 * sv[0]:
                assert (shared.V(name)[0] @ loop.V(name)[0]).item() > 0.999


def test_shared_handles_a_chat_prompt_and_different_prompt_lengths():
    adapter, tok = _tiny()
    chat = [{"role": "user", "content": "reverse: cat"}]
    pairs = [
        Pair(chat, "print('tac')", "tac"),
        Pair("short", " x", " yy"),
        Pair("a much longer plain prompt than the others", " no", " yes"),
    ]
    G_hack, G_clean = pair_gradients(adapter, tok, pairs, method="loop", progress=False)
    D = pair_differences(adapter, tok, pairs, method="shared", progress=False)
    assert _rel(D, G_hack - G_clean) < 1e-5


def test_shared_non_finite_nll_names_the_pair():
    adapter, tok = _tiny()
    pairs = vhack.builtin_pairs("toy")
    with torch.no_grad():
        adapter.model.get_input_embeddings().weight[7] = float("nan")
    pairs[3] = Pair(pairs[3].prompt, "lamp\x07\n", pairs[3].clean)
    with pytest.raises(ValueError, match=r"non-finite NLL \(nan\) for pair 3 \(hack\)"):
        pair_differences(adapter, tok, pairs, method="shared", progress=False)


# ---- support checks and fallbacks ----------------------------------------------------------------


def test_unsupported_models_are_named():
    assert "no .config" in unsupported_reason(torch.nn.Linear(2, 2))
    model = vhack.models.tiny_model()
    assert unsupported_reason(model) is None
    model.config._attn_implementation = "flash_attention_2"
    assert "flash_attention_2" in unsupported_reason(model)
    model = vhack.models.tiny_model(use_sliding_window=True, sliding_window=8)
    assert "sliding-window" in unsupported_reason(model)
    model = vhack.models.tiny_model()
    model.config.layer_types = ["full_attention", "linear_attention"]
    assert "other than full attention (linear_attention)" in unsupported_reason(model)


def test_shared_on_an_unsupported_model_warns_and_falls_back():
    model, tok = vhack.models.load("tiny")
    model = vhack.models.tiny_model(use_sliding_window=True, sliding_window=8, max_window_layers=0)
    adapter = vhack.wrap(model, use_cache=False, progress=False)
    pairs = vhack.builtin_pairs("toy")[:3]
    with pytest.warns(UserWarning, match="prompt sharing is off for this model: .*sliding"):
        D = pair_differences(adapter, tok, pairs, method="shared", progress=False)
    G_hack, G_clean = pair_gradients(adapter, tok, pairs, method="loop", progress=False)
    assert _rel(D, G_hack - G_clean) < 1e-5


def test_a_model_that_ignores_the_mask_is_caught_by_the_check(monkeypatch):
    adapter, tok = _tiny()
    model = adapter.model
    forward = model.forward

    def mask_dropping_forward(*args, attention_mask=None, **kwargs):
        return forward(*args, **kwargs)  # as if the model ignored a custom 4D mask

    monkeypatch.setattr(model, "forward", mask_dropping_forward)
    monkeypatch.setattr(extract_module, "unsupported_reason", lambda m: None)
    pairs = vhack.builtin_pairs("toy")[:3]
    with pytest.warns(UserWarning, match="does not honour the custom attention mask"):
        D = pair_differences(adapter, tok, pairs, method="shared", progress=False)
    monkeypatch.setattr(model, "forward", forward)
    G_hack, G_clean = pair_gradients(adapter, tok, pairs, method="loop", progress=False)
    assert _rel(D, G_hack - G_clean) < 1e-5  # the fallback's result


def test_the_check_runs_once_per_model(monkeypatch):
    adapter, tok = _tiny()
    calls = []
    real = extract_module._shared_mismatch

    def counting(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(extract_module, "_shared_mismatch", counting)
    pairs = vhack.builtin_pairs("toy")[:3]
    for _ in range(3):
        pair_differences(adapter, tok, pairs, method="shared", progress=False)
    assert len(calls) == 1


# ---- "auto" --------------------------------------------------------------------------------------


def test_cost_ratio_favours_sharing_for_short_completions_and_big_models():
    model = vhack.models.tiny_model()
    linear = 90_000
    prompt = list(range(50))
    short_h, short_c = ([*prompt, 1, 2, 3], 50), ([*prompt, 4, 5], 50)
    assert cost_ratio(model, linear, [short_h], [short_c]) < 0.7
    # Coding-pair lengths (byte tokens) on the tiny model: dense masked attention over the
    # packed row costs more than the prompt tokens it saves.
    prompt = list(range(550))
    long_h, long_c = ([*prompt, *range(400)], 550), ([*prompt, *range(1, 401)], 550)
    assert cost_ratio(model, linear, [long_h], [long_c]) > 1.0
    # The same lengths on a model whose Linears dominate (a 4B model has ~3.6e9 linear weights):
    # the saving is the prompt's share of the tokens, 1350 / 1900.
    assert cost_ratio(model, 3_600_000_000, [long_h], [long_c]) == pytest.approx(1350 / 1900, 0.02)


@pytest.mark.parametrize(("pairset", "expected"), [("toy", "shared"), ("coding", "batched")])
def test_auto_picks_by_the_cost_estimate(pairset, expected, monkeypatch):
    adapter, tok = _tiny()
    picked = []
    real = extract_module._resolve_method

    def recording(*args):
        picked.append(real(*args))
        return picked[-1]

    monkeypatch.setattr(extract_module, "_resolve_method", recording)
    pairs = vhack.builtin_pairs(pairset)[:3]
    D = pair_differences(adapter, tok, pairs, progress=False)
    assert picked == [expected]
    G_hack, G_clean = pair_gradients(adapter, tok, pairs, method="loop", progress=False)
    assert _rel(D, G_hack - G_clean) < 1e-5


def test_shared_differences_on_the_triton_kernels():
    """The per-pair dS reduction of the shared path through the Triton delta_grad kernel (the
    interpreter on CPU) equals the loop on the eager reference ops."""
    from vhack import ops

    adapter, tok = _tiny()
    pairs = vhack.builtin_pairs("toy")[:3]
    with ops.use_backend("reference"):
        G_hack, G_clean = pair_gradients(adapter, tok, pairs, method="loop", progress=False)
    with ops.use_backend("triton"):
        D = pair_differences(adapter, tok, pairs, method="shared", progress=False)
    assert _rel(D, G_hack - G_clean) < 1e-5
