"""The five validation tests on synthetic gradients where the answer is known, the report, and
`vhack validate` on the tiny model."""

import json
from types import SimpleNamespace

import pytest
import torch

import vhack
from vhack import cli
from vhack.basis import HackBasis
from vhack.extract import basis_from_gradients
from vhack.validate import (
    bootstrap_stability,
    cin_discrimination,
    cin_per_sample,
    heldout_projection,
    load_samples,
    per_source_cin,
    random_null,
    validate,
    write_report,
)

LAYOUT = SimpleNamespace(names=["a", "b", "c"], ranks=[16, 24, 8])
R = sum(LAYOUT.ranks)
STRENGTH = 5.0  # planted hack component per sample; the noise has unit variance per coordinate


def _planted_direction(seed=0):
    """A unit hack direction per module, packed [R]."""
    gen = torch.Generator().manual_seed(seed)
    parts = [
        torch.nn.functional.normalize(torch.randn(r, generator=gen), dim=0) for r in LAYOUT.ranks
    ]
    return torch.cat(parts)


def _pairs(n, u, gen, strength=STRENGTH):
    """(G_hack, G_clean) [n, R]: noise, plus the planted direction on the hack side."""
    return torch.randn(n, R, generator=gen) + strength * u, torch.randn(n, R, generator=gen)


def _module(x, m):
    lo = sum(LAYOUT.ranks[:m])
    return x[..., lo : lo + LAYOUT.ranks[m]]


@pytest.fixture
def planted():
    u = _planted_direction()
    gen = torch.Generator().manual_seed(1)
    train = _pairs(10, u, gen)
    held = _pairs(4, u, gen)
    basis = basis_from_gradients(*train, LAYOUT, top_k=12).sliced(3)
    return u, train, held, basis, gen


def _random_basis(k, seed):
    gen = torch.Generator().manual_seed(seed)
    V = {}
    for name, r in zip(LAYOUT.names, LAYOUT.ranks, strict=True):
        q, _ = torch.linalg.qr(torch.randn(r, k, generator=gen, dtype=torch.float64))
        V[name] = q.T.float()
    return HackBasis(V, {n: torch.ones(k) for n in LAYOUT.names})


# ---- cin ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("statistic", ["hackward", "both"])
def test_cin_per_sample_matches_its_definition(planted, statistic):
    _, train, _, basis, _ = planted
    grads = torch.cat(train)
    got = cin_per_sample(basis, LAYOUT, grads, statistic)
    expected = torch.zeros(grads.shape[0], dtype=torch.float64)
    for m, name in enumerate(LAYOUT.names):
        g = _module(grads, m).double()
        c = g @ basis.V(name).double().T
        c = torch.relu(c) if statistic == "hackward" else c
        expected += c.norm(dim=1) / g.norm(dim=1) / len(LAYOUT.names)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-7)


# ---- planted direction: every test finds it ---------------------------------------------------------


def test_extraction_finds_the_planted_direction(planted):
    u, _, _, basis, _ = planted
    for m, name in enumerate(LAYOUT.names):
        cos = torch.dot(basis.V(name)[0], _module(u, m)).item()
        assert cos > 0.8, (name, cos)  # found (random: ~0.2), and oriented hack-ward (positive)


def test_heldout_projection_on_planted_pairs(planted):
    _, _, held, basis, _ = planted
    result = heldout_projection(basis, LAYOUT, held[0] - held[1])
    assert result["n_pairs"] == 4 and result["n_modules"] == 3
    assert result["frac_positive"] == 1.0 and result["median_cos"] > 0.5
    # Pairs with the labels swapped point the other way.
    swapped = heldout_projection(basis, LAYOUT, held[1] - held[0])
    assert swapped["frac_positive"] == 0.0


def test_random_null_puts_the_planted_basis_on_top(planted):
    _, _, held, basis, _ = planted
    result = random_null(basis, LAYOUT, held[0] - held[1], n_random=100, seed=0)
    assert result["percentile"] == 100.0 and result["value"] > result["null_p95"]
    assert len(result["null"]) == 100


def test_random_basis_sits_at_the_null_median():
    """With no planted signal and a random V, V's percentile is uniform on [0, 100]: over 40
    random V (deterministic seeds) its median and mean sit near 50 (standard errors ~8 and ~5)."""
    gen = torch.Generator().manual_seed(3)
    grads = torch.randn(1, R, generator=gen)
    percentiles = torch.tensor(
        [
            random_null(_random_basis(2, seed), LAYOUT, grads, n_random=40, seed=seed)["percentile"]
            for seed in range(40)
        ]
    )
    assert 30 <= percentiles.median() <= 70, percentiles
    assert 35 <= percentiles.mean() <= 65, percentiles
    assert percentiles.min() < 20 and percentiles.max() > 80  # spread out, not stuck


def test_cin_discrimination_separates_planted_pools(planted):
    u, _, _, basis, gen = planted
    hack, clean = (
        torch.randn(12, R, generator=gen) + STRENGTH * u,
        torch.randn(12, R, generator=gen),
    )
    result = cin_discrimination(basis, LAYOUT, torch.cat([hack, clean]), [True] * 12 + [False] * 12)
    assert result["n_hack"] == result["n_clean"] == 12
    assert result["diff"] > 0.3 and result["ci95"][0] > 0 and result["effect_size"] > 2
    assert result["ci95"][0] <= result["diff"] <= result["ci95"][1]
    # Two pools of the same distribution: the CI covers 0.
    null = cin_discrimination(basis, LAYOUT, torch.randn(24, R, generator=gen), [True, False] * 12)
    assert null["ci95"][0] < 0 < null["ci95"][1]


def test_per_source_cin(planted):
    u, _, _, basis, gen = planted
    grads = torch.cat(
        [torch.randn(5, R, generator=gen) + STRENGTH * u, torch.randn(7, R, generator=gen)]
    )
    sources = ["teacher"] * 5 + ["student"] * 7
    result = per_source_cin(basis, LAYOUT, grads, sources)
    assert list(result) == ["teacher", "student"]
    assert result["teacher"]["n"] == 5 and result["student"]["n"] == 7
    assert result["teacher"]["cin"] > 0.8 > 0.5 > result["student"]["cin"]
    expected = cin_per_sample(basis, LAYOUT, grads[:5].sum(0, keepdim=True))[0].item()
    assert result["teacher"]["cin"] == pytest.approx(expected, rel=1e-6)
    prepacked = per_source_cin(basis.packed(LAYOUT), LAYOUT, grads, sources)
    assert prepacked == result


def test_bootstrap_stability_planted_vs_noise(planted):
    _, train, _, basis, gen = planted
    stable = bootstrap_stability(basis.sliced(1), LAYOUT, train[0] - train[1], n_boot=10, seed=0)
    assert stable["n_boot"] == 10 and stable["n_train"] == 10
    assert stable["lead_sign_agreement"] == 1.0
    assert stable["median_principal_cos"] > 0.9 and stable["median_lead_cos"] > 0.9
    noise = torch.randn(10, R, generator=gen), torch.randn(10, R, generator=gen)
    noise_basis = basis_from_gradients(*noise, LAYOUT, top_k=1)
    unstable = bootstrap_stability(noise_basis, LAYOUT, noise[0] - noise[1], n_boot=10, seed=0)
    assert unstable["median_principal_cos"] < stable["median_principal_cos"] - 0.2


def test_bad_inputs(planted):
    _, train, _, basis, _ = planted
    grads = torch.cat(train)
    with pytest.raises(ValueError, match=r"packed per-sample gradients \[n, 48\]"):
        cin_per_sample(basis, LAYOUT, grads[:, :10])
    with pytest.raises(ValueError, match="at least one hack and one clean"):
        cin_discrimination(basis, LAYOUT, grads, [True] * 20)
    with pytest.raises(ValueError, match="one label per gradient row"):
        cin_discrimination(basis, LAYOUT, grads, [True, False])
    with pytest.raises(ValueError, match="one label per gradient row"):
        per_source_cin(basis, LAYOUT, grads, ["x"])
    with pytest.raises(ValueError, match="statistic"):
        cin_per_sample(basis, LAYOUT, grads, "median")
    with pytest.raises(ValueError, match="n_random"):
        random_null(basis, LAYOUT, grads, n_random=0)
    with pytest.raises(ValueError, match="n_train >= 2"):
        bootstrap_stability(basis, LAYOUT, train[0][:1] - train[1][:1])
    wrong = SimpleNamespace(names=["a", "b", "c"], ranks=[16, 24, 9])
    with pytest.raises(ValueError, match="module shapes mismatch"):
        basis.packed(wrong)


# ---- on the tiny model ---------------------------------------------------------------------------


def test_validate_and_report_on_the_tiny_model(tiny, tmp_path):
    model, tok = tiny
    adapter = vhack.wrap(model, use_cache=False, progress=False)
    report = validate(
        adapter, tok, vhack.builtin_pairs("toy"), n_random=20, n_boot=3, progress=False
    )
    assert report["basis"]["modules"] == 14 and set(report["basis"]["k"].values()) == {5}
    assert report["heldout_projection"]["n_pairs"] == 2
    assert report["cin_discrimination"]["n_hack"] == 2
    assert set(report["per_source_cin"]) == {"hack", "clean"}
    assert report["random_null"]["n_random"] == 20 and report["bootstrap_stability"]["n_boot"] == 3
    paths = write_report(report, tmp_path / "report")
    assert json.loads(paths["json"].read_text())["n_pairs"] == 12
    md = paths["md"].read_text()
    for row in (
        "1. cin discrimination",
        "2. held-out",
        "3. random",
        "4. per-source",
        "5. bootstrap",
    ):
        assert row in md
    assert paths["png"].read_bytes()[:4] == b"\x89PNG"


def test_load_samples(tmp_path):
    path = tmp_path / "samples.jsonl"
    rows = [
        {"prompt": "p", "completion": "x", "label": "hack"},
        {"prompt": [{"role": "user", "content": "q"}], "completion": "y", "label": "clean"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    samples = load_samples(path)
    assert samples[0] == ("p", "x", "hack") and samples[1][2] == "clean"
    path.write_text(json.dumps({"prompt": "p", "completion": "", "label": "hack"}) + "\n")
    with pytest.raises(ValueError, match="line 1"):
        load_samples(path)


def test_cli_validate_with_a_basis_file_and_samples(tmp_path, capsys):
    basis_path = tmp_path / "b.safetensors"
    common = ["--pairs", "toy", "--device", "cpu", "--quiet"]
    assert cli.main(["extract", *common, "--top-k", "6", "--out", str(basis_path)]) == 0
    samples = tmp_path / "samples.jsonl"
    lines = [
        {"prompt": p.prompt, "completion": c, "label": label}
        for p in vhack.builtin_pairs("toy")[:4]
        for c, label in ((p.hack, "hack"), (p.clean, "clean"))
    ]
    samples.write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    argv = ["validate", *common, "--basis", str(basis_path), "--k", "3", "--samples", str(samples)]
    argv += ["--n-random", "10", "--n-boot", "3", "--out-dir", str(tmp_path / "out")]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "5. bootstrap stability" in out
    report = json.loads((tmp_path / "out" / "validation.json").read_text())
    assert report["cin_discrimination"]["n_hack"] == 4
    assert report["basis_pairset_hash"] == report["pairset_hash"]
