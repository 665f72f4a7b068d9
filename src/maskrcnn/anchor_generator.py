"""Anchors for every FPN level, laid out exactly like the flattened RPN head outputs.

Conventions (box_ops coordinates: continuous input pixels, width = x2 - x1):
- Level l has stride s = anchor_strides[l] and a (h, w) = feature_shapes[l] grid; the anchors of cell
  (row i, column j) are centred on ((j + o) * s, (i + o) * s), o = anchor.anchor_offset: 0.5 (the cell centre,
  default) or 0 (the cell's top-left corner, torchvision).
- Anchor a of a cell enumerates (ratio, scale) ratio-major: a = ratio_index * len(scales) + scale_index.
  The anchor has area (s * scale)^2 and height / width = ratio: w = s * scale / sqrt(ratio),
  h = s * scale * sqrt(ratio). No rounding, unless anchor.round_base_anchors: then the corners of the cell
  anchors centred on (0, 0) are rounded half to even (torchvision), before the shifts are added.
- Level array rows are ordered cell-major (row, then column), anchor-minor: row (i * w + j) * A + a,
  i.e. the RPN output (B, A, h, w) transposed to (B, h, w, A) and flattened.
"""
from typing import List

import numpy as np


def cell_anchors(stride: float, scales, ratios, rounded: bool = False) -> np.ndarray:
    """(A, 4) anchors of one cell centred on (0, 0), in the documented (ratio, scale) order."""
    ratios = np.asarray(ratios, np.float64)[:, None]         # (R, 1)
    sizes = stride * np.asarray(scales, np.float64)[None, :]  # (1, S)
    half_w = (sizes / np.sqrt(ratios) / 2.0).reshape(-1)     # (R * S,)
    half_h = (sizes * np.sqrt(ratios) / 2.0).reshape(-1)
    corners = np.stack([-half_w, -half_h, half_w, half_h], axis=1)
    # torchvision rounds its float32 corners; np.round is half to even like torch.round
    return np.round(corners.astype(np.float32)).astype(np.float64) if rounded else corners


def level_anchors(stride: float, feature_shape, scales, ratios, offset: float = 0.5,
                  rounded: bool = False) -> np.ndarray:
    """(h * w * A, 4) float32 anchors of one level, cell-major and anchor-minor."""
    height, width = feature_shape
    centre_x = (np.arange(width, dtype=np.float64) + offset) * stride
    centre_y = (np.arange(height, dtype=np.float64) + offset) * stride
    cy, cx = np.meshgrid(centre_y, centre_x, indexing="ij")                       # (h, w)
    shifts = np.stack([cx, cy, cx, cy], axis=-1).reshape(-1, 1, 4)               # (h * w, 1, 4)
    anchors = shifts + cell_anchors(stride, scales, ratios, rounded)[None, :, :]  # (h * w, A, 4)
    return anchors.reshape(-1, 4).astype(np.float32)


def generate_anchors(cfg) -> List[np.ndarray]:
    """One (h * w * A, 4) float32 array per level of `cfg.anchor.anchor_strides`."""
    a = cfg.anchor
    return [level_anchors(stride, shape, a.anchor_scales, a.anchor_ratios, a.anchor_offset, a.round_base_anchors)
            for stride, shape in zip(a.anchor_strides, cfg.feature_shapes)]
