"""Bad input to the library is refused before it changes anything (issue 17): Projector's alpha,
two Projectors on one optimizer, a NaN dS through load_state_dict, a non-orthonormal basis
handed to validate, a FIFO as a samples file."""

from __future__ import annotations

import os
import threading

import pytest
import torch

import vhack
from vhack.validate import load_samples


@pytest.fixture(scope="module")
def toy():
    """(adapter, tokenizer, basis) of the tiny model, shared by the module's tests (built once)."""
    model, tok = vhack.models.load("tiny", seed=0)
    adapter = vhack.wrap(model, use_cache=False, progress=False)
    basis = vhack.extract(adapter, tok, vhack.builtin_pairs("toy"), top_k=2, progress=False)
    return adapter, tok, basis


@pytest.mark.parametrize("alpha", [-1.0, float("inf"), float("nan")])
def test_projector_refuses_a_negative_or_nonfinite_alpha(toy, alpha):
    adapter, _, basis = toy
    with pytest.raises(ValueError, match="alpha must be a finite number >= 0"):
        vhack.Projector(adapter, basis, alpha=alpha)


def test_two_projectors_on_one_optimizer_are_refused(toy):
    adapter, _, basis = toy
    opt = torch.optim.SGD([adapter.delta], lr=0.1)
    first = vhack.Projector(adapter, basis).attach(opt)
    second = vhack.Projector(adapter, basis)
    with pytest.raises(RuntimeError, match="another Projector is already attached"):
        second.attach(opt)
    first.detach()
    second.attach(opt)  # once the first is gone, the second may take its place
    assert second.attached


def test_load_state_dict_refuses_nan_and_leaves_ds_untouched(toy):
    adapter, _, _ = toy
    with torch.no_grad():
        adapter.delta.add_(0.25)
    before = adapter.delta.detach().clone()
    state = adapter.state_dict()
    state[adapter.names[3]] = state[adapter.names[3]].clone()
    state[adapter.names[3]][0] = float("nan")
    with pytest.raises(ValueError, match=f"NaN/inf .*{adapter.names[3]}"):
        adapter.load_state_dict(state)
    assert torch.equal(adapter.delta.detach(), before)


def scaled(basis, factor: float):
    return vhack.HackBasis(
        {n: factor * basis.V(n) for n in basis.names},
        {n: basis.sv(n) for n in basis.names},
        basis.metadata,
    )


def test_validate_refuses_a_basis_the_projector_refuses(toy):
    adapter, tok, basis = toy
    bad = scaled(basis, 1.5)
    with pytest.raises(ValueError, match="orthonormal"):
        vhack.Projector(adapter, bad)
    with pytest.raises(ValueError, match="orthonormal"):
        vhack.validate.validate(adapter, tok, vhack.builtin_pairs("toy"), bad, k=2, n_boot=1)


def test_cli_validate_refuses_a_scaled_basis_in_one_line(toy, tmp_path, capsys):
    _, _, basis = toy
    path = tmp_path / "scaled.safetensors"
    scaled(basis, 1.5).save(path)
    rc = vhack.cli.main(["validate", "--basis", str(path), "--out-dir", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.count("\n") == 1 and err.startswith("vhack validate: error: --basis ")
    assert "orthonormal" in err


def test_a_fifo_samples_file_is_refused_not_read(tmp_path):
    fifo = tmp_path / "samples.jsonl"
    os.mkfifo(fifo)
    errors = []

    def read():
        try:
            load_samples(fifo)
        except ValueError as err:
            errors.append(err)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout=10)
    if reader.is_alive():  # it opened the FIFO and waits for a writer: unblock it, then fail
        os.close(os.open(fifo, os.O_WRONLY))
        reader.join()
        pytest.fail("load_samples blocked on a FIFO instead of refusing it")
    assert errors and "FIFO" in str(errors[0])
