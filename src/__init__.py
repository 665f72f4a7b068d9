"""Mask R-CNN ModelZoo-style package.

Importing it checks the MindSpore version, then decides oneDNN's ISA cap (src/ops/backend.py says why) before
any network runs; it compiles and downloads nothing.
"""
from src.version_check import check_mindspore_version

check_mindspore_version()       # before any of our modules meets an API an older MindSpore lacks

from src.ops import backend  # noqa: E402

backend.decide_isa()
