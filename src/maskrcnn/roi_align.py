"""RoIAlign over an FPN pyramid: each RoI is pooled from the level its size selects.

The pooling itself (coordinate convention, CPU kernel or gather version) is the op src/ops/roi_align.py; this
module holds the level rule and the pools' settings from the config.
"""
import mindspore as ms
from mindspore import nn, ops

from src.ops.roi_align import PyramidRoIAlign

# Tolerance of the level rule floor(log2(scale / finest_scale + eps)): a RoI within eps of a level's
# lower bound already belongs to it.
LEVEL_EPS = 1e-6


def roi_levels(rois, finest_scale: float, num_levels: int):
    """(R, 5) RoIs -> (R,) int32 level = floor(log2(sqrt(w * h) / finest_scale + eps)) clipped to
    [0, num_levels - 1].

    Computed as the number of level bounds finest_scale * (2**k - eps), k >= 1, that the scale reaches:
    the same rule without float32 log2 rounding an exact power of two (224 / 56 = 4) down a level.
    """
    scale = ops.sqrt(ops.relu(rois[:, 3] - rois[:, 1]) * ops.relu(rois[:, 4] - rois[:, 2]))    # (R,)
    level = ops.zeros_like(scale)
    for k in range(1, num_levels):
        level = level + ops.cast(scale >= finest_scale * (2.0 ** k - LEVEL_EPS), ms.float32)
    return ops.cast(level, ms.int32)


class MultiLevelRoIAlign(nn.Cell):
    """Pool each RoI from its FPN level.

    MultiLevelRoIAlign(cfg, out_size, featmap_strides=None, finest_scale=None, sample_ratio=None): the
    optional arguments default to cfg.roi (roi_align_featmap_strides, roi_align_finest_scale,
    roi_sample_ratio); cfg.roi.roi_aligned chooses the aligned (default) or torchvision's aligned=False grid. Used with out_size = cfg.roi.roi_out_size (box head) and mask_out_size (mask head).

    construct(rois (R, 5) = (batch index, x1, y1, x2, y2) in input pixels,
              feats: tuple of one (B, C, h_l, w_l) map per stride) -> (R, C, out_size, out_size).
    `pool(rois, pyramid)` does the same from `prepare(feats)`, which pools of the same strides may share.
    """

    def __init__(self, cfg, out_size: int, featmap_strides=None, finest_scale=None, sample_ratio=None):
        super().__init__()
        strides = cfg.roi.roi_align_featmap_strides if featmap_strides is None else featmap_strides
        self.finest_scale = float(cfg.roi.roi_align_finest_scale if finest_scale is None else finest_scale)
        sample_ratio = cfg.roi.roi_sample_ratio if sample_ratio is None else sample_ratio
        self.num_levels = len(strides)
        self.out_size = out_size
        self.align = PyramidRoIAlign(out_size, sample_ratio, strides, cfg.roi.roi_aligned)

    def prepare(self, feats):
        """The pyramid as `pool` reads it."""
        return self.align.prepare(feats)

    def pool(self, rois, pyramid):
        return self.align(rois, roi_levels(rois, self.finest_scale, self.num_levels), pyramid)

    def construct(self, rois, feats):
        return self.pool(rois, self.prepare(feats))
