"""Pasting fixed-size mask probabilities into their boxes of the original image (bilinear, box area only)."""
from __future__ import annotations

import numpy as np


def _interpolation_matrix(start: float, end: float, length: int, mask_size: int):
    """Bilinear weights from a mask axis of mask_size cells spanning [start, end) to image pixels.

    Returns (first_pixel, weights (n, mask_size)) for the n pixels whose centres fall inside
    [start, end); pixels outside the box are not covered (they stay 0 when pasted).
    """
    first = max(int(np.ceil(start - 0.5)), 0)
    stop = min(int(np.ceil(end - 0.5)), length)
    if stop <= first or end <= start:
        return first, np.zeros((0, mask_size), np.float32)
    centres = np.arange(first, stop, dtype=np.float64) + 0.5
    # Mask cell j covers [start + j*step, start + (j+1)*step); its value sits at the cell centre.
    position = (centres - start) / (end - start) * mask_size - 0.5
    position = np.clip(position, 0.0, mask_size - 1)
    low = np.floor(position).astype(np.int64)
    high = np.minimum(low + 1, mask_size - 1)
    frac = (position - low).astype(np.float32)
    weights = np.zeros((len(centres), mask_size), np.float32)
    rows = np.arange(len(centres))
    np.add.at(weights, (rows, low), 1.0 - frac)
    np.add.at(weights, (rows, high), frac)
    return first, weights


def paste_masks(masks: np.ndarray, boxes: np.ndarray, img_h: int, img_w: int, threshold: float) -> np.ndarray:
    """Paste (K, S, S) mask probabilities into (K, img_h, img_w) binary masks.

    boxes (K, 4) are x1, y1, x2, y2 in the same (original) pixel frame; a pixel belongs to the box when
    its centre does, and takes the bilinear interpolation of the mask cells (separable: Wy @ m @ Wx^T),
    so each mask costs only its box area.
    """
    masks = np.asarray(masks, np.float32)
    boxes = np.asarray(boxes, np.float64)
    if masks.ndim != 3 or masks.shape[1] != masks.shape[2] or len(masks) != len(boxes):
        raise ValueError(f"paste_masks: need masks (K, S, S) and boxes (K, 4), got {masks.shape} and {boxes.shape}")
    mask_size = masks.shape[1]
    out = np.zeros((len(masks), img_h, img_w), np.uint8)
    for k, (x1, y1, x2, y2) in enumerate(boxes):
        col0, wx = _interpolation_matrix(x1, x2, img_w, mask_size)
        row0, wy = _interpolation_matrix(y1, y2, img_h, mask_size)
        if len(wx) == 0 or len(wy) == 0:
            continue
        region = wy @ masks[k] @ wx.T                                   # (ny, nx)
        out[k, row0:row0 + len(wy), col0:col0 + len(wx)] = region >= threshold
    return out

