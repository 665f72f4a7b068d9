"""Mask R-CNN ModelZoo-style package.

oneDNN (MindSpore's CPU kernels) runs MindSpore's own Conv2D as a reference loop (~1 GFLOP/s) when it may use
AVX-512, because MindSpore hands it plain OIHW weights; capped at AVX2 it uses im2col + AVX2 GEMM (~190 GFLOP/s).
The model's convolutions run on `src.cpu_kernels` instead, which lets oneDNN use AVX-512 (and MatMul gets faster
too), so the cap is only set when those kernels are unavailable or switched off, unless the user set
ONEDNN_MAX_CPU_ISA. oneDNN reads it when it creates its first primitive, so deciding when `src` is imported
(before any network runs) is early enough.
"""
from src.version_check import check_mindspore_version

check_mindspore_version()       # before any of our modules meets an API an older MindSpore lacks

from src import cpu_kernels  # noqa: E402

if cpu_kernels.library() is None:
    cpu_kernels.cap_isa_for_mindspore_kernels()
