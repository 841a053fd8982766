"""The `vhack` command line, in-process and as the installed console script."""

import json
import os
import re
import shutil
import stat
import subprocess
import time

import pytest
import torch
from helpers import assert_one_line_error

import vhack
from vhack import cli


def test_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for command in ("demo", "example", "extract", "info", "train", "validate"):
        assert command in out


def test_no_command_prints_help_and_fails(capsys):
    assert cli.main([]) == 1
    assert "usage: vhack" in capsys.readouterr().out


def test_info_is_json(capsys):
    assert cli.main(["info"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert {"vhack", "torch", "backends"} <= set(info)


def test_example_runs_end_to_end(capsys):
    assert cli.main(["example", "--steps", "4"]) == 0
    out = capsys.readouterr().out
    assert "wrapped 14 Linear modules" in out
    moved = {}
    for line in out.splitlines():
        for arm in ("measure only", "grad projected", "update projected"):
            if line.startswith(arm) and "AdamW" not in line:
                moved[arm] = float(line.split()[-2])  # change on the basis pairs
    assert set(moved) == {"measure only", "grad projected", "update projected"}
    # The whole pipeline (extract -> Projector -> optimizer hook) must slow the drift toward the
    # hacks on the pairs the basis came from.
    assert moved["grad projected"] < moved["measure only"]
    assert moved["update projected"] < moved["measure only"]


def test_console_script_is_installed():
    exe = shutil.which("vhack")
    assert exe, "the vhack console script is not on PATH: install the package (see README)"
    result = subprocess.run([exe, "--version"], capture_output=True, text=True, check=True)
    assert result.stdout.startswith("vhack ")


# ---- user errors: one line, exit status 2, before any work -------------------------------------


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `vhack ARGV` run in-process (argparse errors included)."""
    try:
        rc = cli.main(argv)
    except SystemExit as exc:
        rc = exc.code
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


@pytest.fixture
def no_work(monkeypatch):
    """Fails the test if a command gets as far as loading a model."""

    def load(*args, **kwargs):
        pytest.fail("the command started its work before checking its arguments")

    monkeypatch.setattr(vhack.models, "load", load)


@pytest.fixture
def bad_inputs(tmp_path):
    """Files for the error cases: a plain file, a duplicate pair file, an invalid pair file."""
    pair = vhack.builtin_pairs("toy")[0].to_json()
    plain = tmp_path / "plain.txt"
    plain.write_text("not a directory\n")
    dups = tmp_path / "dups.jsonl"
    dups.write_text("\n".join(json.dumps(p.to_json()) for p in vhack.builtin_pairs("toy")[:4]))
    dups.write_text(dups.read_text() + "\n" + json.dumps(pair) + "\n")
    invalid = tmp_path / "invalid.jsonl"
    invalid.write_text("{not json\n")
    return {"tmp": tmp_path, "plain": plain, "dups": dups, "invalid": invalid}


ARGUMENT_ERRORS = [
    # (argv, fragments the one-line message must contain); {tmp}, {plain}, ... are bad_inputs
    (["validate", "--n-boot", "0"], ["--n-boot", "integer >= 1", "'0'"]),
    (["validate", "--n-random", "-3"], ["--n-random"]),
    (["validate", "--k", "zero"], ["--k", "integer"]),
    (["validate", "--drop-bottom-frac", "1"], ["--drop-bottom-frac", "[0.0, 1.0)"]),
    (["extract", "--top-k", "0"], ["--top-k"]),
    (["extract", "--tau-axis", "1.5"], ["--tau-axis"]),
    (["extract", "--batch-size", "0"], ["--batch-size"]),
    (["example", "--lr", "nan"], ["--lr"]),
    (["example", "--steps", "0"], ["--steps"]),
    (["example", "--pairs", "mine.jsonl"], ["--pairs", "invalid choice"]),
    (["extract", "--pairs", "nope"], ["--pairs nope", "coding, toy", "JSONL file"]),
    (["extract", "--pairs", "{invalid}"], ["--pairs", "line 1", "not valid JSON"]),
    (["extract", "--pairs", "{dups}"], ["pairs 0 and 4 are identical"]),
    (["extract", "--pairs", "toy", "--n-heldout", "11"], ["12 pairs", "n_heldout + 2"]),
    (["extract", "--pairs", "toy", "--top-k", "11"], ["--top-k 11", "at most 10", "<= 10"]),
    (["validate", "--pairs", "toy", "--k", "11"], ["--k 11", "only 10 axes"]),
    (["example", "--k", "11"], ["--k 11", "only 10 axes"]),
    (["extract", "--out", "{plain}/basis.safetensors"], ["--out", "is a file, not a directory"]),
    (["extract", "--out", "{tmp}"], ["--out", "is a directory; pass a file name"]),
    (["validate", "--out-dir", "{plain}"], ["--out-dir", "not a directory"]),
    (["validate", "--out-dir", "{plain}/sub/dir"], ["--out-dir", "is a file, not a directory"]),
    (
        ["extract", "--device", "cuda:0"]
        if not torch.cuda.is_available()
        else ["extract", "--device", "mps"],
        ["--device"],
    ),
    (["validate", "--basis", "{tmp}/missing.safetensors"], ["--basis", "no hack basis file"]),
    (["validate", "--basis", "{plain}"], ["--basis", "cannot read the hack basis file"]),
    (["validate", "--samples", "{tmp}/missing.jsonl"], ["--samples", "missing.jsonl"]),
]


@pytest.mark.parametrize(("argv", "fragments"), ARGUMENT_ERRORS, ids=lambda v: " ".join(v))
def test_user_errors_are_one_line_before_any_work(argv, fragments, bad_inputs, no_work, capsys):
    argv = [a.format(**bad_inputs) for a in argv]
    rc, _, err = run_cli(argv, capsys)
    assert_one_line_error(rc, err, argv[0], *fragments)


def test_bad_model_paths_and_names_fail_fast(tmp_path, monkeypatch, capsys):
    empty = tmp_path / "empty-model"
    empty.mkdir()
    cases = [
        ([str(tmp_path / "no" / "such" / "dir")], "no such model directory or hub name"),
        ([str(empty)], "holds no config.json"),
        (["./not-there"], "no such model directory or hub name"),
    ]
    for model, fragment in cases:
        rc, _, err = run_cli(["extract", "--model", *model], capsys)
        assert_one_line_error(rc, err, "extract", f"--model {model[0]}", fragment)
    # offline: a hub name not in the local Hugging Face cache fails at once, no download tried
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    rc, _, err = run_cli(["extract", "--model", "nobody/no-such-model-vhack"], capsys)
    assert_one_line_error(rc, err, "extract", "no such model directory", "HF_HUB_OFFLINE")
    assert time.perf_counter() - t0 < 5


def test_unknown_hub_name_fails_fast_online(monkeypatch, capsys):
    """Without HF_HUB_OFFLINE one metadata request decides: an unknown name (hub reachable) or an
    unreachable hub (no network, as on CI) is one error line, not transformers' retry loop."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    t0 = time.perf_counter()
    rc, _, err = run_cli(["extract", "--model", "nobody/no-such-model-vhack"], capsys)
    assert_one_line_error(rc, err, "extract", "no such model directory")
    assert time.perf_counter() - t0 < cli.HUB_TIMEOUT_S + 10


def test_model_from_a_local_directory(tmp_path, capsys):
    model, tok = vhack.models.load("tiny", seed=3)
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    out = tmp_path / "b.safetensors"
    argv = ["extract", "--model", str(tmp_path / "m"), "--pairs", "toy", "--top-k", "2"]
    assert cli.main([*argv, "--out", str(out), "--device", "cpu", "--quiet"]) == 0
    assert vhack.HackBasis.load(out).metadata["model_arg"] == str(tmp_path / "m")
    # the saved weights are the tiny model of seed 3: its fingerprint matches
    wrapped = vhack.wrap(vhack.models.load("tiny", seed=3)[0], use_cache=False, progress=False)
    assert len(vhack.HackBasis.load(out, wrapped)) == len(wrapped)


# ---- validate and a basis file ------------------------------------------------------------------

UMASK = 0o027


@pytest.fixture(scope="module")
def toy_basis(tmp_path_factory):
    """A basis file from `vhack extract --pairs toy --top-k 4` (seed 0, written under umask
    0o027), and one from the Python API with top_k=12 on the same pairs (10 rows stored)."""
    root = tmp_path_factory.mktemp("toy-basis")
    cli_path, api_path = root / "cli.safetensors", root / "api.safetensors"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VHACK_CACHE_DIR", str(root / "cache"))
        old = os.umask(UMASK)
        try:
            argv = ["extract", "--pairs", "toy", "--top-k", "4", "--device", "cpu", "--quiet"]
            assert cli.main([*argv, "--out", str(cli_path)]) == 0
        finally:
            os.umask(old)
        model, tok = vhack.models.load("tiny")
        adapter = vhack.wrap(model, progress=False)
        vhack.extract(adapter, tok, vhack.builtin_pairs("toy"), top_k=12, progress=False).save(
            api_path
        )
    return {"cli": cli_path, "api": api_path, "root": root}


def test_basis_file_follows_the_umask(toy_basis):
    assert stat.S_IMODE(os.stat(toy_basis["cli"]).st_mode) == 0o666 & ~UMASK


def test_extract_records_how_the_basis_was_made(toy_basis):
    meta = vhack.HackBasis.load(toy_basis["cli"]).metadata
    assert (meta["pairs"], meta["model_arg"], meta["model_seed"], meta["top_k"]) == (
        "toy",
        "tiny",
        "0",
        "4",
    )


def test_validate_reads_the_basis_pair_set(toy_basis, tmp_path, capsys):
    argv = ["validate", "--basis", str(toy_basis["cli"]), "--k", "3", "--device", "cpu"]
    argv += ["--n-random", "5", "--n-boot", "2", "--quiet", "--out-dir", str(tmp_path)]
    rc, out, err = run_cli(argv, capsys)
    assert rc == 0, err
    assert "pairs: toy (the pair set the basis was extracted from)" in out
    report = json.loads((tmp_path / "validation.json").read_text())
    assert report["pairset_hash"] == report["basis_pairset_hash"]
    assert (report["n_pairs"], report["n_heldout"]) == (12, 2)


def test_validate_warns_loudly_on_other_pairs(toy_basis, tmp_path, capsys, monkeypatch):
    class Stop(Exception):
        pass

    def stop(*args, **kwargs):
        raise Stop  # the warning is printed before any work; no need to run the tests

    monkeypatch.setattr(vhack.models, "load", stop)
    argv = ["validate", "--basis", str(toy_basis["cli"]), "--pairs", "coding", "--k", "3"]
    with pytest.raises(Stop):
        cli.main([*argv, "--out-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert "vhack validate: WARNING: --pairs coding are not the pairs this basis was" in err


def test_validate_needs_the_basis_pairs_when_they_are_gone(toy_basis, tmp_path, capsys, no_work):
    pairs = tmp_path / "mine.jsonl"
    toy = vhack.builtin_pairs("toy")
    pairs.write_text("\n".join(json.dumps(p.to_json()) for p in toy[::-1]) + "\n")
    basis = vhack.HackBasis.load(toy_basis["cli"])
    basis.metadata["pairs"] = str(pairs)
    basis.metadata["pairset_hash"] = vhack.pairs.pairset_hash(toy[::-1])
    basis.save(tmp_path / "b.safetensors")
    pairs.unlink()
    rc, _, err = run_cli(["validate", "--basis", str(tmp_path / "b.safetensors")], capsys)
    assert_one_line_error(rc, err, "validate", "now missing or changed", "--pairs FILE")


def test_validate_k_above_the_stored_rows(toy_basis, tmp_path, capsys, no_work):
    # the CLI basis stores 4 rows (top_k 4); the API one 10 rows (top_k=12, 10 training pairs)
    for path, rows in ((toy_basis["cli"], 4), (toy_basis["api"], 10)):
        argv = ["validate", "--basis", str(path), "--k", str(rows + 1), "--out-dir", str(tmp_path)]
        rc, _, err = run_cli(argv, capsys)
        assert_one_line_error(rc, err, "validate", f"at most {rows} axes", f"--k <= {rows}")
    argv = ["validate", "--basis", str(toy_basis["cli"]), "--top-k", "3"]
    rc, _, err = run_cli([*argv, "--out-dir", str(tmp_path)], capsys)
    assert_one_line_error(rc, err, "validate", "drop --top-k")


def test_validate_fingerprint_mismatch_names_the_flag(toy_basis, tmp_path, capsys):
    argv = ["validate", "--basis", str(toy_basis["cli"]), "--seed", "1", "--k", "3"]
    rc, _, err = run_cli([*argv, "--quiet", "--out-dir", str(tmp_path)], capsys)
    assert_one_line_error(rc, err, "validate", "another model than --model tiny --seed 1")
    assert "pass --seed 0" in err
    # a basis from the Python API has no CLI metadata: the message names the model it records
    argv[2] = str(toy_basis["api"])
    rc, _, err = run_cli([*argv, "--quiet", "--out-dir", str(tmp_path)], capsys)
    assert_one_line_error(rc, err, "validate", "'Qwen3ForCausalLM'", "--seed")


def test_duplicate_pairs_are_refused_by_the_api_too(tiny):
    model, tok = tiny
    adapter = vhack.wrap(model, use_cache=False, progress=False)
    pairs = vhack.builtin_pairs("toy")
    with pytest.raises(ValueError, match="pairs 1 and 12 are identical"):
        vhack.extract(adapter, tok, [*pairs, pairs[1]], progress=False)


# ---- --help shows every default -----------------------------------------------------------------


def _option_blocks(help_text: str) -> dict[str, str]:
    """{first option string: its help text} of an argparse help page."""
    blocks: dict[str, str] = {}
    current = None
    for line in help_text.split("options:", 1)[1].splitlines():
        m = re.match(r"^  (-[-\w]+)", line)
        if m:
            current = m.group(1)
            blocks[current] = line
        elif current and line.startswith("    "):
            blocks[current] += " " + line.strip()
    return blocks


@pytest.mark.parametrize("command", ["demo", "example", "extract", "train", "validate"])
def test_help_shows_every_default_once(command, capsys):
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    blocks = _option_blocks(capsys.readouterr().out)
    assert len(blocks) > 5
    for option, text in blocks.items():
        if option != "-h":
            assert text.count("default") == 1, f"vhack {command} --help: {option}: {text}"
            assert "default: None" not in text, f"vhack {command} --help: {option}: {text}"


def test_each_default_is_written_once():
    """train's and demo's GRPO defaults are GRPOConfig's; extraction's top_k is EXTRACT_TOP_K."""
    import inspect

    from vhack.cli.train import GRPO_OPTIONS, TRAIN_DEFAULTS
    from vhack.extract_config import EXTRACT_TOP_K
    from vhack.grpo.config import GRPOConfig
    from vhack.grpo.demo import DemoSettings

    args = cli.build_parser().parse_args(["train"])
    parsed = GRPOConfig(**{name: getattr(args, name) for name in GRPO_OPTIONS})
    assert parsed == GRPOConfig(**TRAIN_DEFAULTS)
    demo = DemoSettings()
    for name in ("steps", "lr", "k", "top_k", "refresh_every", "prompts_per_step"):
        assert getattr(demo, name) == getattr(GRPOConfig(), name), name
    for func in (vhack.extract, vhack.load_or_extract, vhack.validate.validate):
        assert inspect.signature(func).parameters["top_k"].default == EXTRACT_TOP_K, func


def test_train_refuses_k_above_top_k_like_extract(tmp_path, no_work, capsys):
    argv = ["train", "--model", "tiny", "--k", "7", "--top-k", "6", "--out", str(tmp_path)]
    rc, _, err = run_cli(argv, capsys)
    assert_one_line_error(rc, err, "train", "--k 7", "only 6 axes", "--top-k")


# ---- the SVD disk cache ----------------------------------------------------------------------


def test_svd_cache_off_switch(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VHACK_CACHE_DIR", str(tmp_path))
    model, _ = vhack.models.load("tiny")
    monkeypatch.setenv("VHACK_SVD_CACHE", "0")
    adapter = vhack.wrap(model, progress=False)
    assert not list(tmp_path.glob("svd/*")), "VHACK_SVD_CACHE=0 still wrote SVD files"
    assert cli.main(["info"]) == 0
    cache = json.loads(capsys.readouterr().out)["cache"]
    assert cache == {"dir": str(tmp_path), "svd_cache": False, "svd_bytes": 0}
    adapter.unwrap()
    monkeypatch.delenv("VHACK_SVD_CACHE")
    vhack.wrap(model, progress=False)
    files = list(tmp_path.glob("svd/*.safetensors"))
    assert len(files) == len(adapter)
    assert cli.main(["info"]) == 0
    cache = json.loads(capsys.readouterr().out)["cache"]
    assert cache["svd_cache"] and cache["svd_bytes"] == sum(f.stat().st_size for f in files)
