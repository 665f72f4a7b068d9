"""NumPy references and analytic counts shared by the tests (boxes in x1, y1, x2, y2 pixels)."""
import math

import numpy as np

MOVING_STATS = ("moving_mean", "moving_variance")     # BatchNorm statistics: parameters, but not learnable


def np_iou(a, b):
    """(N, 4), (M, 4) -> (N, M) intersection over union; 0 for boxes without area."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])
    return inter / np.maximum(area(a)[:, None] + area(b)[None, :] - inter, 1e-9)


def np_decode(boxes, deltas, means, stds):
    """Apply (K, 4) normalised (dx, dy, dw, dh) deltas to (K, 4) boxes; dw, dh clipped at log(1000 / 16)."""
    d = deltas * stds + means
    bound = math.log(1000.0 / 16.0)
    pw, ph = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    px, py = boxes[:, 0] + 0.5 * pw, boxes[:, 1] + 0.5 * ph
    w, h = pw * np.exp(np.clip(d[:, 2], -bound, bound)), ph * np.exp(np.clip(d[:, 3], -bound, bound))
    cx, cy = px + d[:, 0] * pw, py + d[:, 1] * ph
    return np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)


def numpy_bce_with_logits(x, t):
    return np.maximum(x, 0) - x * t + np.log1p(np.exp(-np.abs(x)))


def numpy_smooth_l1(diff, beta):
    a = np.abs(diff)
    return np.where(a < beta, 0.5 * a * a / beta, a - 0.5 * beta)


def learnable_count(params):
    """Parameter count as torchvision reports it: weights and BN affine, not the moving statistics."""
    return sum(int(np.prod(p.shape)) for p in params if not p.name.endswith(MOVING_STATS))


def analytic_resnet_count(cfg):
    bb = cfg.backbone
    stem = bb.resnet_in_channels[0]
    total = 3 * stem * 7 * 7 + 2 * stem
    for depth, cin, cout in zip(bb.resnet_block, bb.resnet_in_channels, bb.resnet_out_channels):
        mid = cout // 4
        for i in range(depth):
            block_in = cin if i == 0 else cout
            total += block_in * mid + mid * mid * 9 + mid * cout + 2 * (mid + mid + cout)
            if i == 0:
                total += block_in * cout + 2 * cout
    return total


def analytic_fpn_count(cfg):
    out = cfg.fpn.fpn_out_channels
    lateral = sum(c * out + out for c in cfg.fpn.fpn_in_channels)
    smooth = len(cfg.fpn.fpn_in_channels) * (out * out * 9 + out)
    return lateral + smooth


def analytic_rpn_count(cfg):
    r, a = cfg.rpn, cfg.num_anchors
    return (r.rpn_in_channels * r.rpn_feat_channels * 9 + r.rpn_feat_channels
            + r.rpn_feat_channels * a + a + r.rpn_feat_channels * 4 * a + 4 * a)
