"""Anchors (src/maskrcnn/anchor_generator.py) against a plain loop over cells and (ratio, scale)."""
import math

import numpy as np

from src.config import load_config
from src.maskrcnn.anchor_generator import generate_anchors


def loop_anchors(stride, shape, scales, ratios):
    rows = []
    for i in range(shape[0]):
        for j in range(shape[1]):
            cx, cy = (j + 0.5) * stride, (i + 0.5) * stride
            for ratio in ratios:
                for scale in scales:
                    w = stride * scale / math.sqrt(ratio)
                    h = stride * scale * math.sqrt(ratio)
                    rows.append([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])
    return np.array(rows)


def test_anchors_match_loop_on_tiny_config():
    cfg = load_config("tiny", {"anchor.anchor_scales": "[4.0, 8.0]"})   # two scales: order is visible
    anchors = generate_anchors(cfg)
    assert len(anchors) == len(cfg.anchor.anchor_strides)
    assert sum(len(x) for x in anchors) == cfg.num_bboxes
    for stride, shape, got in zip(cfg.anchor.anchor_strides, cfg.feature_shapes, anchors):
        assert got.dtype == np.float32 and got.shape == (shape[0] * shape[1] * cfg.num_anchors, 4)
        want = loop_anchors(stride, shape, cfg.anchor.anchor_scales, cfg.anchor.anchor_ratios)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-4)


def test_anchor_layout_matches_rpn_output_flattening():
    """Row index of (row i, col j, anchor a) equals the flat index of (B, A, h, w) -> (B, h, w, A)."""
    cfg = load_config("tiny")
    stride, (h, w), num_a = cfg.anchor.anchor_strides[1], cfg.feature_shapes[1], cfg.num_anchors
    anchors = generate_anchors(cfg)[1]
    head = np.arange(num_a * h * w).reshape(num_a, h, w)            # value = (a, i, j) label
    flat = head.transpose(1, 2, 0).reshape(-1)
    for row in (0, 1, num_a, 5 * num_a + 2, len(flat) - 1):
        a, rest = divmod(int(flat[row]), h * w)
        i, j = divmod(rest, w)
        box = anchors[row]
        assert ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2) == ((j + 0.5) * stride, (i + 0.5) * stride)
        ratio = cfg.anchor.anchor_ratios[a]
        assert math.isclose((box[3] - box[1]) / (box[2] - box[0]), ratio, rel_tol=1e-5)
