"""Box math used by every stage: delta encode/decode, IoU, clipping and the inside-the-image check.

Coordinate convention (the whole model uses it): boxes are (x1, y1, x2, y2) in continuous input pixels.
A box's width is x2 - x1 (no legacy "+1"); pixel (i, j) of the input covers [j, j+1) x [i, i+1), so the
valid region of an image of `image_shape` = (ori_h, ori_w, scale_h, scale_w) is [0, ori_w * scale_w] x
[0, ori_h * scale_h]. All functions are plain MindSpore ops and compile inside a GRAPH_MODE construct.
"""
import math

import mindspore as ms
from mindspore import ops

from src.ops.boxes import IOU_EPS, box_area, box_iou  # noqa: F401  (IoU is shared with the assigner op)

# |dw|, |dh| are clamped to this before exp so one wild regression output cannot overflow to inf
# (a box at most 1000/16 times larger or smaller than its reference, the usual bound).
MAX_LOG_SCALE = math.log(1000.0 / 16.0)
# Widths/heights are floored at this when encoding, so a degenerate reference or target box gives a large
# but finite delta instead of inf/NaN (such rows always carry zero weight, but NaN * 0 is still NaN).
MIN_ENCODE_SIZE = 1e-3


def _centre_size(boxes):
    """(..., 4) corners -> centre x, centre y, width, height, each (...)."""
    x1, y1, x2, y2 = boxes[..., 0], boxes[..., 1], boxes[..., 2], boxes[..., 3]
    return (x1 + x2) * 0.5, (y1 + y2) * 0.5, x2 - x1, y2 - y1


def encode(boxes, targets, means, stds):
    """Regression deltas that move `boxes` onto `targets`.

    boxes, targets: (..., 4) float32 corners; means, stds: (4,) float32 Tensors.
    Returns (..., 4) = ((dx, dy, dw, dh) - means) / stds with dx = (gx - px) / pw, dw = log(gw / pw).
    """
    px, py, pw, ph = _centre_size(boxes)
    gx, gy, gw, gh = _centre_size(targets)
    pw = ops.maximum(pw, MIN_ENCODE_SIZE)
    ph = ops.maximum(ph, MIN_ENCODE_SIZE)
    gw = ops.maximum(gw, MIN_ENCODE_SIZE)
    gh = ops.maximum(gh, MIN_ENCODE_SIZE)
    deltas = ops.stack(((gx - px) / pw, (gy - py) / ph, ops.log(gw / pw), ops.log(gh / ph)), axis=-1)
    return (deltas - means) / stds


def decode(boxes, deltas, means, stds):
    """Inverse of `encode`: apply (..., 4) deltas to (..., 4) reference boxes; returns (..., 4) corners.

    dw, dh are clamped to +-MAX_LOG_SCALE. No clipping here: use `clip_boxes`.
    """
    deltas = deltas * stds + means
    px, py, pw, ph = _centre_size(boxes)
    dw = ops.clip_by_value(deltas[..., 2], -MAX_LOG_SCALE, MAX_LOG_SCALE)
    dh = ops.clip_by_value(deltas[..., 3], -MAX_LOG_SCALE, MAX_LOG_SCALE)
    cx = px + deltas[..., 0] * pw
    cy = py + deltas[..., 1] * ph
    half_w = pw * ops.exp(dw) * 0.5
    half_h = ph * ops.exp(dh) * 0.5
    return ops.stack((cx - half_w, cy - half_h, cx + half_w, cy + half_h), axis=-1)


def valid_region(image_shape):
    """image_shape (..., 4) = (ori_h, ori_w, scale_h, scale_w) -> (height, width), each (...)."""
    return image_shape[..., 0] * image_shape[..., 2], image_shape[..., 1] * image_shape[..., 3]


def clip_boxes(boxes, height, width):
    """Clip (..., 4) boxes into [0, width] x [0, height]; height, width broadcast against boxes[..., 0]."""
    zero = ops.zeros_like(boxes[..., 0])
    x1 = ops.minimum(ops.maximum(boxes[..., 0], zero), width)
    y1 = ops.minimum(ops.maximum(boxes[..., 1], zero), height)
    x2 = ops.minimum(ops.maximum(boxes[..., 2], zero), width)
    y2 = ops.minimum(ops.maximum(boxes[..., 3], zero), height)
    return ops.stack((x1, y1, x2, y2), axis=-1)


def boxes_inside(boxes, image_shape):
    """(N, 4) boxes, image_shape (4,) -> (N,) bool: box lies entirely within the valid image region.

    This is the valid-anchor check (no allowed border): anchors sticking out of the image are ignored
    by the stage-1 sampler.
    """
    height, width = valid_region(image_shape)
    return ops.logical_and(
        ops.logical_and(boxes[:, 0] >= 0.0, boxes[:, 1] >= 0.0),
        ops.logical_and(boxes[:, 2] <= width, boxes[:, 3] <= height))


def as_tensor(values):
    """Config list (e.g. target means) -> float32 Tensor, for cells to keep as constants."""
    return ms.Tensor(list(values), ms.float32)
