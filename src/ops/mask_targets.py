"""Mask targets: the aligned RoIAlign (roi_align.py's conventions) of GT masks over RoIs, thresholded to 0/1, on
the CPU kernel (kernels/mask_targets.cpp, straight from the uint8 masks, bytes or bits) or the gather version."""
import mindspore as ms
import numpy as np
from mindspore import nn, ops

from src.ops import backend, constants
from src.ops.custom import kernel
from src.ops.roi_align import CELL_CENTRE, SingleLevelRoIAlign


class MaskTargets(nn.Cell):
    """construct(masks, rois (R, 5) = (mask row b * M + m, x1, y1, x2, y2) in mask pixels at `stride`) ->
    (R, size, size) float32: 1 where the RoIAlign of the RoI's mask row is >= the threshold
    (constants.MASK_TARGET_THRESHOLD), else 0; with binary=False the RoIAlign itself (soft targets in [0, 1],
    torchvision's). No gradient flows. masks: (B, M, H, width) uint8 0/1, or the same as bits, (B, M, H,
    ceil(width / 8)) (src/data/mask_bits.py); the last dimension tells which."""

    def __init__(self, size: int, sample_ratio: int, stride: float, width: int, binary: bool = True):
        super().__init__()
        self.binary = binary
        self.width = width
        self.uses_kernel = backend.enabled() and size in constants.MASK_TARGET_SIZES and binary
        self.kernel = kernel(f"MaskTargets{size}", lambda rois, settings, masks: [rois[0], size, size],
                             lambda rois, settings, masks: ms.float32) if self.uses_kernel else None
        self.settings = ms.Tensor(np.array([sample_ratio, CELL_CENTRE, stride, width], np.float32))
        self.align = SingleLevelRoIAlign(size, stride, sample_ratio)

    def construct(self, masks, rois):
        rois = ops.stop_gradient(rois)
        if self.uses_kernel:
            return self.kernel(rois, self.settings, masks)
        if masks.shape[-1] != self.width:
            masks = unpack_bits(masks, self.width)
        batch, num_gts, height, width = masks.shape
        rows = masks.reshape(batch * num_gts, 1, height, width)                      # uint8: only taps become float
        soft = self.align(rows, rois)[:, 0]                                           # (R, size, size)
        if not self.binary:
            return ops.stop_gradient(soft)
        return ops.stop_gradient(ops.cast(soft >= constants.MASK_TARGET_THRESHOLD, ms.float32))


_BIT_VALUES = ms.Tensor(np.left_shift(1, np.arange(8)).astype(np.uint8))             # bit k of a byte: 2 ** k


def unpack_bits(packed, width: int):
    """(..., ceil(width / 8)) uint8 bits -> (..., width) uint8 0/1 (src/data/mask_bits.py's layout), in the graph."""
    planes = ops.bitwise_and(packed.expand_dims(-1), _BIT_VALUES)                  # (..., bytes, 8)
    pixels = ops.cast(planes > 0, ms.uint8).reshape(packed.shape[:-1] + (packed.shape[-1] * 8,))
    return pixels[..., :width]
