"""The SVD disk cache checks what it reads and survives a cache directory it cannot write."""

import os
import warnings

import pytest
import safetensors.torch
import torch

import vhack
from vhack import svd_cache

TARGET = ["model.layers.0.mlp.up_proj"]


def _weight(model):
    return model.get_submodule(TARGET[0]).weight


def _cached_file(tmp_path):
    (path,) = (tmp_path / "svd").glob("*.safetensors")
    return path


def _exact_sv(weight):
    return torch.linalg.svdvals(weight.detach().float())


def test_factors_of_another_weight_are_recomputed(tiny, tmp_path):
    """A well-formed file under this weight's name, holding another weight's factors (a copied
    cache, a hash collision, an edit that kept the metadata): never used."""
    model, _ = tiny
    vhack.wrap(model, cache_dir=tmp_path, targets=TARGET, progress=False).unwrap()
    path = _cached_file(tmp_path)
    other = torch.randn_like(_weight(model))
    U, S, Vh = svd_cache.svd_factors(other, None)
    factors = {"U": U, "S": S, "Vh": Vh}
    safetensors.torch.save_file(factors, str(path), metadata={"factors": svd_cache._hash(U, S, Vh)})
    with pytest.warns(UserWarning, match="do not reproduce the weight"):
        _, S2, _ = svd_cache.svd_factors(_weight(model), tmp_path / "svd")
    assert torch.allclose(S2, _exact_sv(_weight(model)), rtol=1e-5, atol=1e-6)
    # ... and the file was rewritten with the right factors: the next read is silent
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, S3, _ = svd_cache.svd_factors(_weight(model), tmp_path / "svd")
    assert torch.equal(S3, S2)


def test_flipped_bytes_in_a_valid_file_are_recomputed(tiny, tmp_path):
    model, _ = tiny
    vhack.wrap(model, cache_dir=tmp_path, targets=TARGET, progress=False).unwrap()
    path = _cached_file(tmp_path)
    with safetensors.safe_open(str(path), "pt") as fh:
        meta = fh.metadata()
        f = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
    f["S"][0] *= 1.5  # still a readable file, the hash no longer matches
    safetensors.torch.save_file(f, str(path), metadata=meta)
    with pytest.warns(UserWarning, match="stored hash"):
        _, S, _ = svd_cache.svd_factors(_weight(model), tmp_path / "svd")
    assert torch.allclose(S, _exact_sv(_weight(model)), rtol=1e-5, atol=1e-6)


def test_unwritable_cache_directory_warns_once_and_wraps(tiny, tmp_path, monkeypatch):
    model, _ = tiny
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("VHACK_CACHE_DIR", str(blocker / "cache"))  # mkdir fails, even as root
    svd_cache._warned.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        adapter = vhack.wrap(model, progress=False)
        adapter.unwrap()
        vhack.wrap(model, progress=False).unwrap()
    messages = [str(w.message) for w in caught if "SVD cache" in str(w.message)]
    assert len(messages) == 1, messages
    assert "without the disk cache" in messages[0]


def test_cache_write_failure_warns_once_and_wraps(tiny, tmp_path, monkeypatch):
    model, _ = tiny
    svd_cache._warned.clear()

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(svd_cache, "atomic_path", full_disk)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        adapter = vhack.wrap(model, cache_dir=tmp_path, progress=False)
    assert len(adapter) > 1
    messages = [str(w.message) for w in caught if "cannot write the SVD cache" in str(w.message)]
    assert len(messages) == 1, messages
    assert not list((tmp_path / "svd").iterdir())  # nothing half-written is left


def test_cache_files_follow_the_umask(tiny, tmp_path):
    model, _ = tiny
    old = os.umask(0o022)
    try:
        vhack.wrap(model, cache_dir=tmp_path, targets=TARGET, progress=False).unwrap()
    finally:
        os.umask(old)
    assert _cached_file(tmp_path).stat().st_mode & 0o777 == 0o644


def test_nonfinite_weight_is_refused_naming_the_module(tiny):
    model, _ = tiny
    with torch.no_grad():
        model.get_submodule("model.layers.1.self_attn.o_proj").weight[3, 5] = float("nan")
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.o_proj: weight holds NaN"):
        vhack.wrap(model, use_cache=False, progress=False)
    assert not any(isinstance(m, vhack.SVDLinear) for m in model.modules())  # untouched
