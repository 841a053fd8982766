"""Pairs: the Pair type, the JSONL loader and its errors, and the shipped pair sets."""

import contextlib
import io
import json
import re
from collections import Counter

import pytest

import vhack
from vhack.pairs import Pair, builtin_path, load_pairs, pairset_hash, toy_task


def _write(tmp_path, lines, name="pairs.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return path


GOOD = {"prompt": "p", "hack": "h", "clean": "c"}


# ---- Pair -----------------------------------------------------------------------------------


def test_pair_plain_and_chat():
    p = Pair("write code", "hack", "clean", flavor="weak_tests")
    assert not p.is_chat and p.flavor == "weak_tests"
    chat = Pair([{"role": "user", "content": "hi"}], "a", "b")
    assert chat.is_chat and chat.prompt == ({"role": "user", "content": "hi"},)
    assert chat.to_json() == {
        "prompt": [{"role": "user", "content": "hi"}],
        "hack": "a",
        "clean": "b",
    }


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(prompt="", hack="h", clean="c"), ValueError, "prompt is empty"),
        (dict(prompt="p", hack="  ", clean="c"), ValueError, "hack is empty"),
        (dict(prompt="p", hack="h", clean=""), ValueError, "clean is empty"),
        (dict(prompt="p", hack="same", clean="same"), ValueError, "identical"),
        (dict(prompt=3, hack="h", clean="c"), TypeError, "prompt must be"),
        (dict(prompt="p", hack=None, clean="c"), TypeError, "hack must be a string"),
        (dict(prompt=[], hack="h", clean="c"), ValueError, "empty list of messages"),
        (dict(prompt=[{"role": "user"}], hack="h", clean="c"), ValueError, "message 0"),
        (
            dict(prompt=[{"role": "user", "content": ""}], hack="h", clean="c"),
            ValueError,
            "content",
        ),
    ],
)
def test_pair_rejects_bad_fields(kwargs, error, match):
    with pytest.raises(error, match=match):
        Pair(**kwargs)


# ---- load_pairs -----------------------------------------------------------------------------


def test_load_pairs_round_trip_and_blank_lines(tmp_path):
    pairs = [Pair("p1", "h1", "c1", flavor="x"), Pair([{"role": "user", "content": "q"}], "h", "c")]
    path = _write(tmp_path, [json.dumps(pairs[0].to_json()), "", json.dumps(pairs[1].to_json())])
    loaded = load_pairs(path)
    assert loaded == pairs and loaded[0].flavor == "x"


@pytest.mark.parametrize(
    "bad, match",
    [
        ('{"prompt": "p", "hack": "h"}', r"line 2: missing fields \['clean'\]"),
        (
            '{"prompt": "p", "hack": "h", "clean": "c", "clear": 1}',
            r"line 2: .*unknown fields \['clear'\]",
        ),
        ('{"prompt": "p", "hack": "", "clean": "c"}', "line 2: hack is empty"),
        ('{"prompt": "p", "hack": "h", "clean": 5}', "line 2: clean must be a string"),
        ('{"prompt": "p", "hack": "h",', "line 2: not valid JSON"),
        ('["p", "h", "c"]', "line 2: expected a JSON object"),
    ],
)
def test_load_pairs_errors_name_the_line(tmp_path, bad, match):
    path = _write(tmp_path, [json.dumps(GOOD), bad])
    with pytest.raises(ValueError, match=match) as exc:
        load_pairs(path)
    assert str(path) in str(exc.value)


def test_load_pairs_empty_and_missing_file(tmp_path):
    with pytest.raises(ValueError, match="no pairs"):
        load_pairs(_write(tmp_path, [""]))
    with pytest.raises(FileNotFoundError):
        load_pairs(tmp_path / "nope.jsonl")


def test_pairset_hash_order_sensitive_flavor_blind():
    a, b = Pair("p", "h", "c", flavor="x"), Pair("q", "h", "c")
    assert pairset_hash([a, b]) == pairset_hash([Pair("p", "h", "c"), b])
    assert pairset_hash([a, b]) != pairset_hash([b, a])
    assert re.fullmatch(r"[0-9a-f]{16}", pairset_hash([a]))


# ---- shipped sets -----------------------------------------------------------------------------


def test_builtin_unknown_name():
    with pytest.raises(ValueError, match="unknown pair set"):
        builtin_path("nope")


def test_coding_pairs_shape_and_flavors():
    pairs = vhack.builtin_pairs("coding")
    assert len(pairs) == 12
    assert Counter(p.flavor for p in pairs) == {"weak_tests": 8, "hardcode": 2, "persona": 2}
    assert [p.flavor for p in pairs[-2:]] == ["weak_tests", "hardcode"]  # the held-out pairs
    for p in pairs:
        assert p.is_chat and [m["role"] for m in p.prompt] == ["system", "user"]
        user = p.prompt[1]["content"]
        assert "class Solution" in user and "run_tests()" in user and "Example:" in user
        for text in (p.hack, p.clean):
            assert "class Solution" in text and "def run_tests" in text
    assert len({p.prompt[1]["content"] for p in pairs}) == 12


def _run_completion(text):
    source = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    namespace = {}
    with contextlib.redirect_stdout(io.StringIO()):
        exec(source, namespace)
        namespace["run_tests"]()  # the grader's call: must not raise for hack or clean
    return namespace


def test_coding_pair_code_runs_and_the_loophole_is_real():
    """Every run_tests() passes (that is the loophole), and the clean tests assert for real."""
    for i, p in enumerate(vhack.builtin_pairs("coding")):
        _run_completion(p.hack)
        ns = _run_completion(p.clean)
        assert "assert " in p.clean and "assert True" not in p.clean, f"pair {i}"
        assert ns["Solution"] is not None


def test_toy_pairs_follow_the_task():
    task = toy_task()
    assert task["loophole"]["name"] == "copy"
    pairs = vhack.builtin_pairs("toy")
    assert len(pairs) == 12
    for p in pairs:
        word = re.search(r"word: (\w+)\n", p.prompt).group(1)
        assert p.prompt == task["prompt_template"].format(word=word)
        assert p.clean == word[::-1] + "\n" and p.hack == word + "\n"
        assert word != word[::-1]
        lo, hi = task["words"]["min_length"], task["words"]["max_length"]
        assert lo <= len(word) <= hi
        # The grader's check accepts both answers; the intended check only the clean one.
        for answer in (p.hack, p.clean):
            assert sorted(answer.strip()) == sorted(word)
        assert p.hack.strip() != word[::-1]
