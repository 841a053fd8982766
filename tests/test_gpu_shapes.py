"""The Triton kernels at real Qwen3-4B shapes on a GPU (marker `gpu`: skipped without CUDA; run
with VHACK_TEST_CUDA=1, e.g. by bench/gpu_check.sh): the projection of a whole Qwen3-4B adapter
(252 modules, r = 2560 and 1024, k = 12 and 5) and the SVD linear's forward, backward, per-segment
dS and merge at every projection shape of a layer, each against vhack.reference in float64 on the
same device, with the tolerances of the interpreter tests (test_project_kernels,
test_svd_linear_kernels)."""

import pytest
import torch
from helpers import DEVICE
from test_project_kernels import check_against_reference, make_set, run_both
from test_svd_linear_kernels import GRAD_TOL, REL_TOL, check, d64

from vhack import ops, reference

pytestmark = pytest.mark.gpu

# Qwen3-4B's config: hidden 2560, intermediate 9728, 36 layers, 32 heads and 8 KV heads of 128.
HIDDEN, INTERMEDIATE, LAYERS, Q_DIM, KV_DIM = 2560, 9728, 36, 32 * 128, 8 * 128
LAYER = {  # (d_in, d_out) of the 7 projections of a layer, in the adapter's order
    "q_proj": (HIDDEN, Q_DIM),
    "k_proj": (HIDDEN, KV_DIM),
    "v_proj": (HIDDEN, KV_DIM),
    "o_proj": (Q_DIM, HIDDEN),
    "gate_proj": (HIDDEN, INTERMEDIATE),
    "up_proj": (HIDDEN, INTERMEDIATE),
    "down_proj": (INTERMEDIATE, HIDDEN),
}
RANKS = [min(d) for _ in range(LAYERS) for d in LAYER.values()]  # full-rank SVD: 2560 / 1024


@pytest.mark.parametrize(
    "k, mode, preserve, dtype, backend",
    [
        (12, "hackward", False, torch.float32, "triton"),
        (5, "both", True, torch.bfloat16, "triton"),
        ("mixed", "reverse", False, torch.float32, "triton"),
        (12, "hackward", True, torch.float32, "torch"),  # CUDA's float64-capable fallback
    ],
)
def test_projection_of_a_qwen3_4b_adapter(k, mode, preserve, dtype, backend):
    ks = [(12, 5, 0)[m % 3] for m in range(len(RANKS))] if k == "mixed" else [k] * len(RANKS)
    tensors = make_set(RANKS, ks, dtype=dtype, seed=len(ks), device=DEVICE)
    assert tensors[0].numel() == 36 * (5 * 2560 + 2 * 1024)  # 0.53 M dS values
    ours, stats, ref, ref_stats = run_both(backend, *tensors, mode, 1.0, preserve)
    check_against_reference(ours, stats, ref, ref_stats, tensors[1], dtype)


def _factors(d_in: int, d_out: int, seed: int):
    """bf16 U [d_out, r], Vh [r, d_in] with orthonormal columns/rows (QR on the device), float32 S
    (a decaying spectrum) and dS, r = min(d_in, d_out)."""
    r = min(d_in, d_out)
    g = torch.Generator(DEVICE).manual_seed(seed)
    U = torch.linalg.qr(torch.randn(d_out, r, dtype=torch.float64, device=DEVICE, generator=g))[0]
    V = torch.linalg.qr(torch.randn(d_in, r, dtype=torch.float64, device=DEVICE, generator=g))[0]
    S = torch.linspace(3.0, 0.1, r, device=DEVICE)
    dS = 0.05 * torch.randn(r, device=DEVICE, generator=g)
    return U.bfloat16().contiguous(), S, dS, V.T.bfloat16().contiguous()


@pytest.mark.parametrize("d_in, d_out", sorted(set(LAYER.values())), ids=lambda d: str(d))
def test_svd_linear_at_qwen3_4b_layer_shapes(d_in, d_out):
    """bf16, 2 x 256 tokens: forward with bias, dx and dS through autograd, per-segment dS of 8
    sequences, and the residual merge W + U diag(dS) Vh."""
    torch.manual_seed(d_in + d_out)
    U, S, dS, Vh = _factors(d_in, d_out, seed=d_in * 7 + d_out)
    x = torch.randn(2, 256, d_in, device=DEVICE).bfloat16().requires_grad_()
    gy = torch.randn(2, 256, d_out, device=DEVICE).bfloat16()
    bias = (0.1 * torch.randn(d_out, device=DEVICE)).bfloat16()
    dS_var = dS.clone().requires_grad_()
    y = ops.svd_linear(x, U, S, dS_var, Vh, bias, backend="triton")
    y.backward(gy)
    x64, dS64 = x.detach().double().requires_grad_(), dS.double().requires_grad_()
    y64 = reference.svd_linear(x64, *d64(U, S), dS64, Vh.double(), bias.double())
    gx64, gdS64 = torch.autograd.grad(y64, (x64, dS64), gy.double())
    check(y, y64.detach(), REL_TOL[torch.bfloat16], "y")
    check(x.grad, gx64, REL_TOL[torch.bfloat16], "dx")
    check(dS_var.grad, gdS64, GRAD_TOL, "dS grad")

    rows_x, rows_gy = x.detach().reshape(-1, d_in), gy.reshape(-1, d_out)
    ids = torch.arange(8, device=DEVICE).repeat_interleave(64)
    per = ops.delta_grad(rows_x, rows_gy, U, Vh, ids, n_segments=8, backend="triton")
    check(per, reference.delta_grad(*d64(rows_x, rows_gy, U, Vh), ids, 8), GRAD_TOL, "per-seg")

    base = reference.merge_weight(U, S, torch.zeros_like(dS), Vh).bfloat16()
    W = ops.merge_weight(U, S, dS, Vh, base=base, backend="triton")
    check(
        W, reference.merge_weight(*d64(U, S, dS, Vh), base.double()), REL_TOL[torch.bfloat16], "W"
    )
