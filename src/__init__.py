"""Mask R-CNN ModelZoo-style package.

Importing it decides oneDNN's ISA cap (src/ops/backend.py says why) before any network runs; it compiles and
downloads nothing.
"""
from src.ops import backend

backend.decide_isa()
