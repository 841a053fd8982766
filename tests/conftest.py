"""Test setup. Without a GPU the Triton kernels run in the interpreter: TRITON_INTERPRET must be set
before triton is imported, so it is set here, before anything imports vhack. Outputs that kernels
allocate are NaN-poisoned (VHACK_POISON_OUTPUTS) so an unwritten element fails a comparison.

Set VHACK_TEST_CUDA=1 on a GPU machine to run the compiled kernels on CUDA tensors instead of the
interpreter on CPU tensors: the one switch (tests take their device from helpers.DEVICE, which
reads it too). Without a CUDA device that setting is refused, except for --collect-only.
"""

import os

from helpers import CUDA_TESTS  # imports torch, never triton: TRITON_INTERPRET is still settable

if not CUDA_TESTS:
    os.environ["TRITON_INTERPRET"] = "1"
os.environ["VHACK_POISON_OUTPUTS"] = "1"

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    max_examples=15,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("thorough", max_examples=200, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """A CLI command run in-process sets torch's CPU threads (vhack.threads); the next test starts
    from the suite's setting again."""
    threads = torch.get_num_threads()
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def pytest_configure(config):
    if CUDA_TESTS and not config.option.collectonly and not torch.cuda.is_available():
        raise pytest.UsageError(
            "VHACK_TEST_CUDA=1 runs the kernel tests on CUDA tensors, but torch sees no CUDA "
            "device here; unset it to run them on CPU tensors in Triton's interpreter"
        )


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Every test gets its own empty vhack cache directory."""
    monkeypatch.setenv("VHACK_CACHE_DIR", str(tmp_path / "vhack-cache"))


@pytest.fixture
def tiny():
    """(model, tokenizer) of the embedded tiny model, seed 0, float32."""
    import vhack

    return vhack.models.load("tiny", seed=0)
