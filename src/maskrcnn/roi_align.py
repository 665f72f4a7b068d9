"""RoIAlign over an FPN pyramid: each RoI is pooled from the level its size selects.

Sampling convention: RoIs are continuous input-pixel boxes (box_ops). Feature cell k of a level with
stride s covers input pixels [k * s, (k + 1) * s), so its value sits at input coordinate (k + 0.5) * s and
input coordinate X maps to feature coordinate X / s - 0.5 (the "aligned" RoIAlign of detectron2/torchvision).
ops.ROIAlign scales boxes by 1/s with no offset, so we shift boxes by -s/2 before calling it, and use
roi_end_mode=0: no legacy "+1" on the box end; RoIs narrower than one feature cell are widened to one cell
(that mode's clamp), so degenerate boxes still give finite, bounded outputs. Each bin averages
sample_ratio x sample_ratio bilinear samples; samples more than one cell outside the map count as zero.
Caveat of the CPU kernel: a RoI whose shifted x1 and x2 are both within 1e-3 of 0 (x1 = x2 = s/2, a
zero-width box) is skipped and its output left unwritten; no box this model produces is like that.
"""
import mindspore as ms
import numpy as np
from mindspore import nn, ops

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


class SingleLevelRoIAlign(nn.Cell):
    """Aligned RoIAlign from one (B, C, h, w) map of the given stride: rois (R, 5) -> (R, C, out, out).

    Also the tool for mask targets: stride 1 over the (B*M, 1, H, W) GT masks.
    """

    def __init__(self, out_size: int, stride: float, sample_ratio: int):
        super().__init__()
        half_cell = -0.5 * stride
        self.centre_shift = ms.Tensor(np.array([[0.0, half_cell, half_cell, half_cell, half_cell]], np.float32))
        self.align = ops.ROIAlign(out_size, out_size, 1.0 / stride, sample_ratio, roi_end_mode=0)

    def construct(self, features, rois):
        return self.align(features, rois + self.centre_shift)


class MultiLevelRoIAlign(nn.Cell):
    """Pool each RoI from its FPN level.

    MultiLevelRoIAlign(cfg, out_size, featmap_strides=None, finest_scale=None, sample_ratio=None): the
    optional arguments default to cfg.roi (roi_align_featmap_strides, roi_align_finest_scale,
    roi_sample_ratio). Used with out_size = cfg.roi.roi_out_size (box head) and mask_out_size (mask head).

    construct(rois (R, 5) = (batch index, x1, y1, x2, y2) in input pixels,
              feats: tuple of one (B, C, h_l, w_l) map per stride) -> (R, C, out_size, out_size).

    Static shapes: every level pools all R RoIs and a per-RoI level mask picks the result. That costs
    num_levels x the pooling of one level (RoIAlign work does not depend on box size), in exchange for no
    dynamic gather/scatter; gradients reach only the level each RoI was assigned to.
    """

    def __init__(self, cfg, out_size: int, featmap_strides=None, finest_scale=None, sample_ratio=None):
        super().__init__()
        strides = cfg.roi.roi_align_featmap_strides if featmap_strides is None else featmap_strides
        self.finest_scale = float(cfg.roi.roi_align_finest_scale if finest_scale is None else finest_scale)
        sample_ratio = cfg.roi.roi_sample_ratio if sample_ratio is None else sample_ratio
        self.num_levels = len(strides)
        self.out_size = out_size
        self.levels = nn.CellList([SingleLevelRoIAlign(out_size, s, sample_ratio) for s in strides])

    def construct(self, rois, feats):
        levels = roi_levels(rois, self.finest_scale, self.num_levels)[:, None, None, None]   # (R, 1, 1, 1)
        pooled = self.levels[0](feats[0], rois)                                               # (R, C, out, out)
        for level in range(1, self.num_levels):
            pooled = ops.where(levels == level, self.levels[level](feats[level], rois), pooled)
        return pooled
