"""HackBasis: schema-v2 files, k slicing, the pooled noise floor, the model fingerprint, bad files."""

import json

import pytest
import safetensors.torch
import torch

import vhack
from vhack.basis import SCHEMA, BasisFileError, HackBasis
from vhack.extract import basis_from_gradients, extraction_metadata
from vhack.packing import pack_blocks

N_TRAIN = 10


def _adapter(seed=0, **config):
    model = vhack.models.tiny_model(seed, **{k: v for k, v in config.items() if k != "dtype"})
    if "dtype" in config:
        model = model.to(config["dtype"])
    return vhack.wrap(model, use_cache=False, progress=False)


def _basis(adapter, top_k=12, tau_axis=0.0, seed=0):
    """A basis with real metadata, from random gradients (no forward pass needed)."""
    gen = torch.Generator().manual_seed(seed)
    R = adapter.delta.numel()
    G_hack, G_clean = torch.randn(2, N_TRAIN, R, generator=gen)
    pairs = vhack.builtin_pairs("coding")
    meta = extraction_metadata(adapter, pairs, top_k, tau_axis, n_heldout=2)
    return basis_from_gradients(G_hack, G_clean, adapter, top_k, tau_axis, meta)


@pytest.fixture
def adapter():
    return _adapter()


def test_save_load_round_trip_and_metadata(adapter, tmp_path):
    basis = _basis(adapter)
    path = basis.save(tmp_path / "b.safetensors")
    loaded = HackBasis.load(path)
    assert loaded.names == adapter.names == basis.names  # packed order survives the file
    for name in basis.names:
        assert torch.equal(loaded.V(name), basis.V(name))
        assert torch.equal(loaded.sv(name), basis.sv(name))
        assert loaded.V(name).shape == (N_TRAIN, adapter.modules[name].rank)  # min(top_k, n)
    meta = loaded.metadata
    assert meta["schema"] == SCHEMA == "v2_with_sv"
    assert meta["top_k"] == "12" and float(meta["tau_axis"]) == 0.0
    assert (meta["n_pairs"], meta["n_train"], meta["n_heldout"]) == ("12", "10", "2")
    assert meta["model"] == "Qwen3ForCausalLM" and meta["dtype"] == "float32"
    assert meta["pairset_hash"] == vhack.pairs.pairset_hash(vhack.builtin_pairs("coding"))
    assert meta["vhack_version"] == vhack.__version__
    fp = json.loads(meta["fingerprint"])
    assert set(fp) == {"structure", "spectrum"} and set(fp["spectrum"]) == set(adapter.names)
    raw = safetensors.torch.load_file(str(path))
    assert set(raw) == {*basis.names, *(f"_sv/{n}" for n in basis.names)}
    assert all(v.dtype == torch.float32 for v in raw.values())


def test_load_places_on_adapter_device_and_packs(adapter, tmp_path):
    path = _basis(adapter).save(tmp_path / "b.safetensors")
    basis = HackBasis.load(path, adapter, k=3)
    packed = basis.packed(adapter)
    expected = pack_blocks([basis.V(n) for n in adapter.names], adapter.ranks)
    for got, want in zip(packed, expected, strict=True):
        assert torch.equal(got, want)
    assert packed.ks.tolist() == [3] * len(adapter)


def test_packed_leaves_uncovered_modules_at_k0(adapter):
    basis = _basis(adapter)
    partial = HackBasis(
        {n: basis.V(n) for n in basis.names[:2]}, {n: basis.sv(n) for n in basis.names[:2]}
    )
    ks = partial.packed(adapter).ks.tolist()
    assert ks == [N_TRAIN, N_TRAIN] + [0] * (len(adapter) - 2)


def test_k_slicing(adapter, tmp_path):
    path = _basis(adapter).save(tmp_path / "b.safetensors")
    full = HackBasis.load(path)
    for k in (1, 5):
        basis = HackBasis.load(path, k=k)
        for name in full.names:
            assert torch.equal(basis.V(name), full.V(name)[:k])
            assert torch.equal(basis.sv(name), full.sv(name)[:k])
    # 10 < k <= top_k: only 10 axes were stored (10 training pairs), all are kept.
    assert {HackBasis.load(path, k=12).k(n) for n in full.names} == {N_TRAIN}
    with pytest.raises(ValueError, match=r"k=13 is larger than the stored top_k=12"):
        HackBasis.load(path, k=13)
    with pytest.raises(ValueError, match="k must be"):
        HackBasis.load(path, k=0)


def test_noise_floor_pools_singular_values():
    sv = {"a": [9.0, 5.0, 1.0], "b": [4.0, 0.5, 0.2], "c": [0.3, 0.1]}
    V = {n: torch.eye(4)[: len(s)] for n, s in sv.items()}
    basis = HackBasis(V, {n: torch.tensor(s) for n, s in sv.items()})
    pooled = torch.tensor([x for s in sv.values() for x in s], dtype=torch.float64)
    floor = torch.quantile(pooled, 0.5).item()  # 0.75 for these 8 values
    cut = basis.noise_floor(0.5)
    assert cut.names == ["a", "b"]  # "c" has nothing above the floor and is dropped
    assert cut.sv("a").tolist() == [9.0, 5.0, 1.0] and cut.sv("b").tolist() == [4.0]
    assert all(x >= floor for n in cut.names for x in cut.sv(n).tolist())
    assert torch.equal(cut.V("b"), V["b"][:1])
    assert basis.noise_floor(0.0) is basis
    for bad in (-0.1, 1.0, "x"):
        with pytest.raises(ValueError, match="drop_bottom_frac"):
            basis.noise_floor(bad)


def test_load_applies_noise_floor_after_k(adapter, tmp_path):
    path = _basis(adapter).save(tmp_path / "b.safetensors")
    sliced = HackBasis.load(path, k=5)
    expected = sliced.noise_floor(0.25)
    got = HackBasis.load(path, k=5, drop_bottom_frac=0.25)
    assert got.names == expected.names
    assert all(torch.equal(got.V(n), expected.V(n)) for n in got.names)
    assert sum(got.k(n) for n in got.names) < sum(sliced.k(n) for n in sliced.names)


# ---- the fingerprint: the right model only ----------------------------------------------------


def test_fingerprint_accepts_device_noise_and_a_bf16_copy(adapter, tmp_path):
    path = _basis(adapter).save(tmp_path / "b.safetensors")
    with torch.no_grad():  # an SVD recomputed elsewhere differs in the last bits
        for mod in adapter.modules.values():
            mod.S.mul_(1 + 3e-6 * torch.randn_like(mod.S))
    HackBasis.load(path, adapter)
    HackBasis.load(path, _adapter(0, dtype=torch.bfloat16))  # same weights, rounded


def test_fingerprint_rejects_another_seed(adapter, tmp_path):
    path = _basis(adapter).save(tmp_path / "b.safetensors")
    other = _adapter(seed=1)
    with pytest.raises(ValueError, match="fingerprint mismatch") as exc:
        HackBasis.load(path, other)
    assert str(path) in str(exc.value) and "strict=False" in str(exc.value)
    with pytest.warns(UserWarning, match="fingerprint mismatch"):
        basis = HackBasis.load(path, other, strict=False)
    assert basis.names == adapter.names


def test_load_into_another_architecture_names_the_mismatch(adapter, tmp_path):
    path = _basis(adapter).save(tmp_path / "b.safetensors")
    with pytest.raises(ValueError, match="module names mismatch"):
        HackBasis.load(path, _adapter(num_hidden_layers=1), strict=False)
    with pytest.raises(ValueError, match="module shapes mismatch.*q_proj"):
        HackBasis.load(path, _adapter(num_attention_heads=2), strict=False)


# ---- bad files ---------------------------------------------------------------------------------


def _rewrite(path, tensors=None, **meta_changes):
    with safetensors.safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
        raw = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    meta.update(meta_changes)
    meta = {k: v for k, v in meta.items() if v is not None}
    safetensors.torch.save_file(tensors if tensors is not None else raw, str(path), metadata=meta)
    return raw


def test_corrupted_and_truncated_files_name_the_file(adapter, tmp_path):
    path = _basis(adapter).save(tmp_path / "b.safetensors")
    data = path.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x07not a safetensors file at all" * 10)
    for bad in (truncated, garbage):
        with pytest.raises(ValueError, match="corrupted, truncated") as exc:
            HackBasis.load(bad)
        assert str(bad) in str(exc.value) and isinstance(exc.value, BasisFileError)
    with pytest.raises(FileNotFoundError):
        HackBasis.load(tmp_path / "missing.safetensors")


def test_unknown_or_missing_schema(adapter, tmp_path):
    path = _basis(adapter).save(tmp_path / "b.safetensors")
    _rewrite(path, schema="v1")
    with pytest.raises(ValueError, match="unknown schema 'v1'"):
        HackBasis.load(path)
    _rewrite(path, schema=None)
    with pytest.raises(ValueError, match="no 'schema' metadata"):
        HackBasis.load(path)


def test_inconsistent_files(adapter, tmp_path):
    path = _basis(adapter).save(tmp_path / "b.safetensors")
    raw = _rewrite(path, top_k="4")  # more stored axes than top_k
    with pytest.raises(ValueError, match="more than top_k=4"):
        HackBasis.load(path)
    name = adapter.names[0]
    _rewrite(path, {k: v for k, v in raw.items() if k != f"_sv/{name}"}, top_k="12")
    with pytest.raises(ValueError, match="do not match the metadata"):
        HackBasis.load(path)
    _rewrite(path, {**raw, name: raw[name] * float("nan")})
    with pytest.raises(ValueError, match="non-finite"):
        HackBasis.load(path)
    _rewrite(path, raw, fingerprint="{not json")
    with pytest.raises(ValueError, match="unreadable metadata"):
        HackBasis.load(path)


def test_constructor_and_save_checks(tmp_path):
    with pytest.raises(ValueError, match=r"V must be \[k, r\]"):
        HackBasis({"a": torch.zeros(2, 3)}, {"a": torch.zeros(3)})
    with pytest.raises(ValueError, match="same module names"):
        HackBasis({"a": torch.zeros(1, 3)}, {"b": torch.zeros(1)})
    with pytest.raises(ValueError, match="without metadata"):
        HackBasis({"a": torch.eye(3)[:1]}, {"a": torch.ones(1)}).save(tmp_path / "x.safetensors")
