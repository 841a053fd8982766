"""Compile every Triton kernel variant of vhack.kernels (svd_linear and project) for an H100/H200
(sm_90) without a GPU: the full Triton pipeline down to cubin, which the interpreter never
exercises. Run by tests/test_svd_linear_kernels.py in a subprocess with TRITON_INTERPRET=0 (under
the interpreter triton.jit returns interpreted functions).

Prints one line per variant with its shared memory and, from `ptxas -v` run on the variant's PTX
(the ptxas Triton ships, with the flags Triton uses), its registers per thread and spill bytes:
CompiledKernel.n_regs / n_spills only exist once a driver has loaded the binary, i.e. on a GPU.
Exits non-zero on a compile error. `--no-ptxas` skips the register report (faster)."""

import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource
from vhack.kernels import project as P
from vhack.kernels import svd_linear as K

TARGET = GPUTarget("cuda", 90, 32)
CUDA = torch.device("cuda")  # only read by the block-size helpers; no GPU is touched
TYPES = {"bfloat16": "bf16", "float32": "fp32"}


def compile_kernel(fn, types: dict, const: dict, cfg: dict):
    names = fn.arg_names
    const = {**const, **{k: v for k, v in cfg.items() if k.startswith("BLOCK") or k == "GROUP_M"}}
    signature = {n: ("constexpr" if n in const else types[n]) for n in names}
    constexprs = {(names.index(k),): v for k, v in const.items()}
    options = dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return triton.compile(ASTSource(fn, signature, constexprs), target=TARGET, options=options)


def registers(kernel) -> str:
    """'regs R, spill S/L B' of a compiled kernel, from ptxas -v on its PTX (sm_90a)."""
    with tempfile.TemporaryDirectory() as tmp:
        ptx = Path(tmp) / "k.ptx"
        ptx.write_text(kernel.asm["ptx"])
        cmd = [get_ptxas(90).path, "-v", "--regAllocOptLevel=2", "--gpu-name=sm_90a", str(ptx),
               "-o", str(Path(tmp) / "k.o")]  # fmt: skip
        log = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if regs is None or spill is None:
        raise RuntimeError(f"unexpected ptxas -v output:\n{log}")
    return f"regs {regs[1]}, spill {spill[1]}/{spill[2]} B"


def report(what: str, kernel, ptxas: bool) -> None:
    extra = f", {registers(kernel)}" if ptxas else ""
    print(f"{what}: shared {kernel.metadata.shared} B{extra}", flush=True)


def svd_linear_variants(ptxas: bool) -> None:
    for dtype, native, precision in [
        (torch.bfloat16, True, "ieee"),
        (torch.float32, False, "tf32"),  # "ieee" differs only in the dot's precision flag
    ]:
        t = "*" + TYPES[str(dtype).removeprefix("torch.")]
        for n_rows in (8, 4096):
            cfg = K._gemm_blocks(n_rows, 4096, 2560, dtype, CUDA)
            types = dict(a_ptr=t, b_ptr=t, c_ptr=t, s1_ptr="*fp32", s2_ptr="*fp32", bias_ptr=t,
                         add_ptr=t, M="i32", N="i32", K="i32", stride_am="i32", stride_ak="i32",
                         stride_bk="i32", stride_bn="i32")  # fmt: skip
            for scale, scale_sum, bias, add in [(2, True, False, False), (0, False, True, False),
                                                (1, True, False, False), (1, False, False, True)]:  # fmt: skip
                const = dict(SCALE=scale, SCALE_SUM=scale_sum, HAS_BIAS=bias, HAS_ADD=add,
                             DOT_F32=not native, PRECISION=precision)  # fmt: skip
                k = compile_kernel(K._svd_linear_matmul_kernel, types, const, cfg)
                tile = f"{cfg['BLOCK_M']}x{cfg['BLOCK_N']}x{cfg['BLOCK_K']}"
                report(f"matmul {dtype} rows={n_rows} tile {tile} {const}", k, ptxas)
            cfg = K._dS_blocks(n_rows, 2560, dtype, CUDA)
            types = dict(x_ptr=t, gy_ptr=t, u_ptr=t, vh_ptr=t, s_ptr="*fp32", ds_ptr="*fp32",
                         seg_ptr="*i64", out_ptr="*fp32", gh_ptr=t, n_rows="i32", d_in="i32",
                         d_out="i32", r="i32", n_segments="i32")  # fmt: skip
            for per_segment, store_gh in [(False, False), (True, False), (False, True)]:
                const = dict(PER_SEGMENT=per_segment, STORE_GH=store_gh, DOT_F32=not native,
                             PRECISION=precision)  # fmt: skip
                k = compile_kernel(K._svd_linear_dS_kernel, types, const, cfg)
                tile = f"{cfg['BLOCK_M']}x{cfg['BLOCK_R']}x{cfg['BLOCK_K']}"
                report(f"dS {dtype} rows={n_rows} tile {tile} {const}", k, ptxas)


def project_variants(ptxas: bool) -> None:
    """The fused projection: every mode (preserve_magnitude where it applies), the k = 12 and
    k = 5 tiles, float32 and bfloat16 gradients (the basis is float32)."""
    for grad_type in ("fp32", "bf16"):
        types = dict(grad_ptr="*" + grad_type, offsets_ptr="*i64", basis_ptr="*fp32",
                     basis_offsets_ptr="*i64", ks_ptr="*i64", order_ptr="*i64",
                     stats_ptr="*fp32", alpha="fp32")  # fmt: skip
        for k_max in (12, 5):
            k_pad, block_r, num_warps = P.block_sizes(k_max)
            cfg = dict(BLOCK_R=block_r, num_warps=num_warps, num_stages=3)
            for mode, code in P.MODES.items():
                for preserve in (False, True) if mode != "measure" else (False,):
                    const = dict(MODE=code, PRESERVE=preserve, K_PAD=k_pad)
                    k = compile_kernel(P._project_fused_kernel, types, const, cfg)
                    what = f"project grad {grad_type} k_max={k_max} tile {k_pad}x{block_r}"
                    report(f"{what} mode={mode} preserve={preserve}", k, ptxas)


def main() -> None:
    ptxas = "--no-ptxas" not in sys.argv[1:]
    svd_linear_variants(ptxas)
    project_variants(ptxas)


if __name__ == "__main__":
    main()
