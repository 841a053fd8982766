"""Compile every Triton kernel variant of vhack.kernels.svd_linear for an H100 (sm_90) without a
GPU: the full Triton pipeline down to cubin, which the interpreter never exercises. Run by
tests/test_svd_linear_kernels.py in a subprocess with TRITON_INTERPRET=0 (under the interpreter
triton.jit returns interpreted functions). Prints one line per variant; exits non-zero on error."""

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
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


def main() -> None:
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
                print(f"matmul {dtype} rows={n_rows} {const}: shared {k.metadata.shared} B")
            cfg = K._dS_blocks(n_rows, 2560, dtype, CUDA)
            types = dict(x_ptr=t, gy_ptr=t, u_ptr=t, vh_ptr=t, s_ptr="*fp32", ds_ptr="*fp32",
                         seg_ptr="*i64", out_ptr="*fp32", gh_ptr=t, n_rows="i32", d_in="i32",
                         d_out="i32", r="i32", n_segments="i32")  # fmt: skip
            for per_segment, store_gh in [(False, False), (True, False), (False, True)]:
                const = dict(PER_SEGMENT=per_segment, STORE_GH=store_gh, DOT_F32=not native,
                             PRECISION=precision)  # fmt: skip
                k = compile_kernel(K._svd_linear_dS_kernel, types, const, cfg)
                print(f"dS {dtype} rows={n_rows} {const}: shared {k.metadata.shared} B")


if __name__ == "__main__":
    main()
