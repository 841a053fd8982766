"""Extraction on the tiny model: the loss, batched == loop, orientation, tau_axis, held-out pairs,
side effects, bad input, load_or_extract, and the `vhack extract` command."""

import sys

import pytest
import torch

import vhack
from vhack import cli
from vhack.extract import (
    basis_cache_path,
    basis_from_gradients,
    completion_grads,
    encode,
    pair_gradients,
    prompt_text,
)
from vhack.pairs import Pair

extract_module = sys.modules["vhack.extract"]


@pytest.fixture
def wrapped(tiny):
    model, tok = tiny
    return vhack.wrap(model, use_cache=False, progress=False), tok


@pytest.fixture(scope="module")
def coding_grads():
    """Training-pair gradients of the coding set on the tiny model, by both methods (computed once)."""
    model, tok = vhack.models.load("tiny", seed=0)
    adapter = vhack.wrap(model, use_cache=False, progress=False)
    train = vhack.builtin_pairs("coding")[:10]
    loop = pair_gradients(adapter, tok, train, method="loop", progress=False)
    batched = pair_gradients(adapter, tok, train, method="batched", batch_size=8, progress=False)
    return adapter, loop, batched


# ---- tokenization --------------------------------------------------------------------------------


def test_encode_plain_prompt_boundary(wrapped):
    _, tok = wrapped
    ids, start = encode(tok, "abc", "de")
    assert ids == [97, 98, 99, 100, 101] and start == 3  # byte ids; nothing appended


def test_encode_chat_prompt_uses_the_template(wrapped):
    _, tok = wrapped
    chat = [{"role": "user", "content": "hi"}]
    text = prompt_text(tok, chat)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    ids, start = encode(tok, chat, "ok")
    assert ids[0] == 258 and ids[start:] == [111, 107] and len(ids) == start + 2
    tok.chat_template = None  # a tokenizer without a template: plain role lines
    assert prompt_text(tok, chat) == "user: hi\nassistant: "


# ---- the loss and its gradient --------------------------------------------------------------------


def test_gradient_is_that_of_the_mean_completion_nll(wrapped):
    """completion_grads == autograd of the mean NLL over completion tokens, computed directly."""
    adapter, tok = wrapped
    pair = vhack.builtin_pairs("coding")[0]
    got = completion_grads(adapter, tok, [(pair.prompt, pair.hack)], method="loop", progress=False)

    text = prompt_text(tok, pair.prompt)
    n_prompt = len(tok(text, add_special_tokens=False)["input_ids"])
    ids = tok(text + pair.hack, add_special_tokens=False, return_tensors="pt")["input_ids"]
    logits = adapter.model(input_ids=ids).logits[0, :-1].double()
    nll = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")
    (expected,) = torch.autograd.grad(nll[n_prompt - 1 :].mean(), adapter.delta)
    rel = (got[0] - expected).norm() / expected.norm()
    assert rel < 1e-5, rel  # float32 model; same graph, different logit slicing


def test_batched_gradients_equal_the_loop(coding_grads):
    _, (loop_h, loop_c), (bat_h, bat_c) = coding_grads
    for a, b in ((bat_h, loop_h), (bat_c, loop_c)):
        rel = (a - b).norm(dim=1) / b.norm(dim=1)
        assert rel.max() < 1e-4, rel  # float32: summation order differs (padding, segment sums)


def _vote_margin(V, D):
    proj = D @ V.T
    return ((proj > 0).sum(0) - (proj < 0).sum(0)).abs()


def test_batched_basis_equals_the_loop(coding_grads):
    """Per module, leading well-separated axes cos >= 0.999 with the same sign; sv to 1e-3."""
    adapter, loop, batched = coding_grads
    b_loop = basis_from_gradients(*loop, adapter, top_k=12)
    b_bat = basis_from_gradients(*batched, adapter, top_k=12)
    checked = 0
    for m, name in enumerate(adapter.names):
        sv_l, sv_b = b_loop.sv(name), b_bat.sv(name)
        torch.testing.assert_close(sv_b, sv_l, rtol=1e-3, atol=1e-3 * float(sv_l[0]))
        lo = int(adapter.offsets[m])
        D = (loop[0] - loop[1])[:, lo : lo + adapter.ranks[m]]
        margin = _vote_margin(b_loop.V(name), D)
        gaps = (sv_l[:-1] - sv_l[1:]) / sv_l[0]
        for i in range(3):  # leading axes whose singular value stands apart from its neighbours
            separated = gaps[i] > 0.02 and (i == 0 or gaps[i - 1] > 0.02)
            if separated and margin[i] >= 2:  # a tied vote keeps the SVD's arbitrary sign
                cos = torch.dot(b_loop.V(name)[i], b_bat.V(name)[i]).item()
                assert cos >= 0.999, (name, i, cos)
                checked += 1
    assert checked >= len(adapter.names)  # the test compared a meaningful number of axes


def test_orientation_flips_with_the_pairs(coding_grads):
    adapter, (G_hack, G_clean), _ = coding_grads
    basis = basis_from_gradients(G_hack, G_clean, adapter, top_k=12)
    flipped = basis_from_gradients(G_clean, G_hack, adapter, top_k=12)  # hack <-> clean
    lo = 0
    for name, r in zip(adapter.names, adapter.ranks, strict=True):
        D = (G_hack - G_clean)[:, lo : lo + r]
        lo += r
        V, Vf = basis.V(name), flipped.V(name)
        proj = D @ V.T
        assert ((proj > 0).sum(0) >= (proj < 0).sum(0)).all()  # oriented hack-ward
        untied = _vote_margin(V, D) > 0
        torch.testing.assert_close(Vf[untied], -V[untied], rtol=0, atol=1e-5)
        torch.testing.assert_close(flipped.sv(name), basis.sv(name))


def test_tau_axis_zeroes_weak_rows_and_keeps_sv(coding_grads):
    adapter, grads, _ = coding_grads
    full = basis_from_gradients(*grads, adapter, top_k=12)
    cut = basis_from_gradients(*grads, adapter, top_k=12, tau_axis=0.4)
    n_zeroed = 0
    for name in adapter.names:
        sv = full.sv(name)
        keep = sv / sv[0] >= 0.4
        assert torch.equal(cut.sv(name), sv)
        assert torch.equal(cut.V(name)[keep], full.V(name)[keep])
        assert (cut.V(name)[~keep] == 0).all()
        n_zeroed += int((~keep).sum())
    assert n_zeroed > 0


def test_extract_uses_training_pairs_only_and_leaves_state_alone(wrapped):
    adapter, tok = wrapped
    pairs = vhack.builtin_pairs("toy")
    adapter.model.train()
    adapter.delta.grad = torch.full_like(adapter.delta, 7.0)  # a training run's accumulated grad
    with torch.no_grad():
        adapter.delta.add_(0.01)
    before = adapter.delta.detach().clone()
    basis = vhack.extract(adapter, tok, pairs, top_k=4, n_heldout=3, progress=False)
    assert (adapter.delta.grad == 7.0).all()
    assert torch.equal(adapter.delta.detach(), before)
    assert all(m.training for m in adapter.model.modules())  # modes restored
    assert basis.metadata["n_train"] == "9" and basis.metadata["n_heldout"] == "3"
    assert {basis.k(n) for n in basis.names} == {4}
    # Changing a held-out pair does not change the basis.
    other = [*pairs[:-1], Pair(pairs[-1].prompt, "zzz\n", "yyy\n")]
    again = vhack.extract(adapter, tok, other, top_k=4, n_heldout=3, progress=False)
    for name in basis.names:
        torch.testing.assert_close(again.V(name), basis.V(name))


# ---- bad input -----------------------------------------------------------------------------------


def test_bad_arguments(wrapped):
    adapter, tok = wrapped
    pairs = vhack.builtin_pairs("toy")
    with pytest.raises(ValueError, match=r"got 3 pairs but need at least n_heldout \+ 2 = 4"):
        vhack.extract(adapter, tok, pairs[:3], n_heldout=2)
    with pytest.raises(TypeError, match="list of vhack.Pair"):
        vhack.extract(adapter, tok, [("p", "h", "c")] * 5)
    for kwargs, match in (
        (dict(top_k=0), "top_k"),
        (dict(tau_axis=1.5), "tau_axis"),
        (dict(n_heldout=-1), "n_heldout"),
        (dict(method="fast"), "method"),
        (dict(batch_size=0), "batch_size"),
    ):
        with pytest.raises(ValueError, match=match):
            vhack.extract(adapter, tok, pairs, progress=False, **kwargs)


@pytest.mark.parametrize("method", ["batched", "loop"])
def test_non_finite_nll_names_the_pair(wrapped, method):
    adapter, tok = wrapped
    pairs = vhack.builtin_pairs("toy")
    with torch.no_grad():  # the embedding of byte 7 is NaN: only a sequence containing it breaks
        adapter.model.get_input_embeddings().weight[7] = float("nan")
    pairs[3] = Pair(pairs[3].prompt, "lamp\x07\n", pairs[3].clean)
    with pytest.raises(ValueError, match=r"non-finite NLL \(nan\) for pair 3 \(hack\)"):
        vhack.extract(adapter, tok, pairs, method=method, batch_size=4, progress=False)


# ---- load_or_extract -----------------------------------------------------------------------------


def test_load_or_extract_caches(wrapped, tmp_path, monkeypatch):
    adapter, tok = wrapped
    pairs = vhack.builtin_pairs("toy")
    calls = []
    real_extract = extract_module.extract

    def counting_extract(*args, **kwargs):
        calls.append(1)
        return real_extract(*args, **kwargs)

    monkeypatch.setattr(extract_module, "extract", counting_extract)
    first = vhack.load_or_extract(
        adapter, tok, pairs, cache_dir=tmp_path, top_k=6, k=3, progress=False
    )
    second = vhack.load_or_extract(
        adapter, tok, pairs, cache_dir=tmp_path, top_k=6, k=3, progress=False
    )
    assert len(calls) == 1  # the second call loaded the file
    path = basis_cache_path(adapter, pairs, top_k=6, cache_dir=tmp_path)
    assert path.exists() and path.parent == tmp_path / "bases"
    assert "_k6_" in path.name and vhack.pairs.pairset_hash(pairs) in path.name
    assert {first.k(n) for n in first.names} == {3}
    for name in first.names:
        assert torch.equal(first.V(name), second.V(name))
    # An unreadable cache file is re-extracted, with a warning.
    path.write_bytes(b"broken")
    with pytest.warns(UserWarning, match="re-extracting"):
        vhack.load_or_extract(adapter, tok, pairs, cache_dir=tmp_path, top_k=6, progress=False)
    assert len(calls) == 2


def test_cache_path_separates_models_and_settings(wrapped):
    adapter, _ = wrapped
    pairs = vhack.builtin_pairs("toy")
    other = vhack.wrap(vhack.models.tiny_model(seed=1), use_cache=False, progress=False)
    path = basis_cache_path(adapter, pairs)
    assert path == basis_cache_path(adapter, pairs)
    assert path != basis_cache_path(other, pairs)  # two tiny seeds do not collide
    assert path != basis_cache_path(adapter, pairs, top_k=6)
    assert path != basis_cache_path(adapter, pairs[::-1])


# ---- CLI ------------------------------------------------------------------------------------------


def test_cli_extract_writes_a_loadable_basis(tmp_path, capsys):
    out = tmp_path / "basis.safetensors"
    argv = ["extract", "--pairs", "toy", "--top-k", "4", "--out", str(out), "--quiet"]
    assert cli.main([*argv, "--device", "cpu"]) == 0
    assert "training pairs, shared gradients) written to" in capsys.readouterr().out
    model, _ = vhack.models.load("tiny")
    basis = vhack.HackBasis.load(out, vhack.wrap(model, use_cache=False, progress=False))
    assert basis.metadata["top_k"] == "4" and len(basis) == 14


def test_make_batches_fixed_size_and_token_budget(monkeypatch):
    from vhack.extract import make_batches

    lengths = [5, 50, 20, 40, 10]
    assert make_batches(lengths, 2) == [[1, 3], [2, 4], [0]]  # longest first
    monkeypatch.setattr(extract_module, "DEFAULT_BATCH_TOKENS", 100)
    # Padded tokens = rows x the batch's longest row: 2 x 50 = 100 (a third row would make 150),
    # then 3 x 20 = 60 for the rest.
    assert make_batches(lengths) == [[1, 3], [2, 4, 0]]
    assert make_batches([500, 3]) == [[0], [1]]  # a row over the budget gets a batch alone


def test_choose_method(wrapped):
    from vhack.extract import choose_method

    adapter, tok = wrapped
    toy, coding = vhack.builtin_pairs("toy"), vhack.builtin_pairs("coding")
    assert choose_method(adapter, tok, toy) == "shared"  # short completions after long prompts
    assert choose_method(adapter, tok, coding) == "batched"  # attention-bound on the tiny model
    assert choose_method(adapter, tok, coding, "shared") == "shared"  # asked for, and supported
    assert choose_method(adapter, tok, toy, "loop") == "loop"
    assert choose_method(adapter, tok, [], "auto") == "batched"
    with pytest.raises(ValueError, match="method must be one of"):
        choose_method(adapter, tok, toy, "fast")
