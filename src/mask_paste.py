"""Pasting fixed-size mask probabilities into their boxes of the original image (bilinear, box area only).

Two rules (`test.mask_paste`): `centres` (default, `paste_masks`): the pixels whose centres lie in the box read
the S x S cells spanning it; `torchvision` (`paste_masks_torchvision`): torchvision's `paste_masks_in_image`, see
docs/torchvision_differences.md 21.
"""
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



TORCHVISION_PADDING = 1         # torchvision pads the S x S map by one zero cell per side and widens the box to match


def torch_bilinear_matrix(out_size: int, in_size: int) -> np.ndarray:
    """(out_size, in_size) float32 weights of torch's F.interpolate(bilinear, align_corners=False) along one axis:
    source = max((i + 0.5) * in / out - 0.5, 0), upper neighbour clamped to the last cell."""
    scale = np.float32(in_size) / np.float32(out_size)
    source = np.maximum((np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5),
                        np.float32(0.0))
    low = np.minimum(np.floor(source).astype(np.int64), in_size - 1)
    high = np.minimum(low + 1, in_size - 1)
    frac = (source - low).astype(np.float32)
    weights = np.zeros((out_size, in_size), np.float32)
    rows = np.arange(out_size)
    np.add.at(weights, (rows, low), np.float32(1.0) - frac)
    np.add.at(weights, (rows, high), frac)
    return weights


def paste_masks_torchvision(masks: np.ndarray, boxes: np.ndarray, img_h: int, img_w: int,
                            threshold: float) -> np.ndarray:
    """torchvision's mask pasting: (K, S, S) probabilities, (K, 4) original-frame boxes -> (K, img_h, img_w) 0/1.

    The map is zero-padded to S + 2, the box scaled about its centre by (S + 2) / S (float32) and truncated to
    integers; the padded map is resized bilinearly (edge clamped) to int(x2 - x1 + 1) x int(y2 - y1 + 1) pixels,
    written at (x1, y1) inclusive and clipped to the image; a pixel is in the mask when its value is > threshold.
    """
    masks = np.asarray(masks, np.float32)
    boxes = np.asarray(boxes, np.float32)
    if masks.ndim != 3 or masks.shape[1] != masks.shape[2] or len(masks) != len(boxes):
        raise ValueError(f"paste_masks_torchvision: need masks (K, S, S) and boxes (K, 4), got {masks.shape} and "
                         f"{boxes.shape}")
    mask_size = masks.shape[1]
    pad = TORCHVISION_PADDING
    padded = np.pad(masks, ((0, 0), (pad, pad), (pad, pad)))
    scale = np.float32((mask_size + 2 * pad) / mask_size)
    half_w = (boxes[:, 2] - boxes[:, 0]) * np.float32(0.5) * scale
    half_h = (boxes[:, 3] - boxes[:, 1]) * np.float32(0.5) * scale
    centre_x = (boxes[:, 2] + boxes[:, 0]) * np.float32(0.5)
    centre_y = (boxes[:, 3] + boxes[:, 1]) * np.float32(0.5)
    expanded = np.stack([centre_x - half_w, centre_y - half_h, centre_x + half_w, centre_y + half_h], axis=1)
    expanded = np.trunc(expanded).astype(np.int64)                                  # torch .to(int64)
    out = np.zeros((len(masks), img_h, img_w), np.uint8)
    for k, (x1, y1, x2, y2) in enumerate(expanded):
        width, height = max(int(x2 - x1 + 1), 1), max(int(y2 - y1 + 1), 1)
        region = torch_bilinear_matrix(height, padded.shape[1]) @ padded[k] @ \
            torch_bilinear_matrix(width, padded.shape[2]).T                         # (height, width)
        x_0, x_1 = max(x1, 0), min(x2 + 1, img_w)
        y_0, y_1 = max(y1, 0), min(y2 + 1, img_h)
        if x_1 <= x_0 or y_1 <= y_0:
            continue
        out[k, y_0:y_1, x_0:x_1] = region[y_0 - y1:y_1 - y1, x_0 - x1:x_1 - x1] > threshold
    return out


PASTE_RULES = {"centres": paste_masks, "torchvision": paste_masks_torchvision}
