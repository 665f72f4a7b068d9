"""Anchors for every FPN level, laid out exactly like the flattened RPN head outputs.

Conventions (box_ops coordinates: continuous input pixels, width = x2 - x1):
- Level l has stride s = anchor_strides[l] and a (h, w) = feature_shapes[l] grid; the anchors of cell
  (row i, column j) are centred on the cell centre ((j + 0.5) * s, (i + 0.5) * s).
- Anchor a of a cell enumerates (ratio, scale) ratio-major: a = ratio_index * len(scales) + scale_index.
  The anchor has area (s * scale)^2 and height / width = ratio: w = s * scale / sqrt(ratio),
  h = s * scale * sqrt(ratio). No rounding.
- Level array rows are ordered cell-major (row, then column), anchor-minor: row (i * w + j) * A + a,
  i.e. the RPN output (B, A, h, w) transposed to (B, h, w, A) and flattened.
"""
from typing import List

import numpy as np


def cell_anchors(stride: float, scales, ratios) -> np.ndarray:
    """(A, 4) anchors of one cell centred on (0, 0), in the documented (ratio, scale) order."""
    ratios = np.asarray(ratios, np.float64)[:, None]         # (R, 1)
    sizes = stride * np.asarray(scales, np.float64)[None, :]  # (1, S)
    half_w = (sizes / np.sqrt(ratios) / 2.0).reshape(-1)     # (R * S,)
    half_h = (sizes * np.sqrt(ratios) / 2.0).reshape(-1)
    return np.stack([-half_w, -half_h, half_w, half_h], axis=1)


def level_anchors(stride: float, feature_shape, scales, ratios) -> np.ndarray:
    """(h * w * A, 4) float32 anchors of one level, cell-major and anchor-minor."""
    height, width = feature_shape
    centre_x = (np.arange(width, dtype=np.float64) + 0.5) * stride
    centre_y = (np.arange(height, dtype=np.float64) + 0.5) * stride
    cy, cx = np.meshgrid(centre_y, centre_x, indexing="ij")                       # (h, w)
    shifts = np.stack([cx, cy, cx, cy], axis=-1).reshape(-1, 1, 4)               # (h * w, 1, 4)
    anchors = shifts + cell_anchors(stride, scales, ratios)[None, :, :]          # (h * w, A, 4)
    return anchors.reshape(-1, 4).astype(np.float32)


def generate_anchors(cfg) -> List[np.ndarray]:
    """One (h * w * A, 4) float32 array per level of `cfg.anchor.anchor_strides`."""
    a = cfg.anchor
    return [level_anchors(stride, shape, a.anchor_scales, a.anchor_ratios)
            for stride, shape in zip(a.anchor_strides, cfg.feature_shapes)]
