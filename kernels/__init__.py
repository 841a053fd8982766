"""Triton kernels of vhack, installed as `vhack.kernels`.

One file per op. Kernel modules import triton; `vhack.kernels.utils` does not, so the package
imports on machines without triton. Nothing here imports from `vhack` beyond this package.
"""
