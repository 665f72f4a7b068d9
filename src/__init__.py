"""Mask R-CNN ModelZoo-style package.

oneDNN (MindSpore's CPU kernels) picks a reference convolution for float32 NCHW tensors when it may use
AVX-512: measured 0.5 GFLOP/s against 55 GFLOP/s with AVX2 JIT kernels, on this project's Xeon CPUs. The
ISA is capped at AVX2 unless the user set ONEDNN_MAX_CPU_ISA. oneDNN reads it when it creates its first
primitive, so setting it when `src` is imported (before any network runs) is early enough.
"""
import os

os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX2")
