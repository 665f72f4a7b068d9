"""RoIAlign: bilinear pooling of RoIs from NCHW maps, one output size per op.

Coordinate convention: RoIs are continuous input-pixel boxes (x1, y1, x2, y2). Feature cell k of a level with
stride s covers input pixels [k * s, (k + 1) * s), so its value sits at input coordinate (k + 0.5) * s and
input coordinate X maps to feature coordinate X / s - 0.5 (the "aligned" RoIAlign of detectron2/torchvision,
the default). With aligned=False (torchvision's Mask R-CNN, `roi.roi_aligned: false`) X maps to X / s: the
sampling grid sits half a cell towards the bottom right.
There is no legacy "+1" on the box end; RoIs narrower than one feature cell are widened to one cell, so
degenerate boxes still give finite, bounded outputs. Each bin averages sample_ratio x sample_ratio
bilinear samples; a sample more than one cell outside the map counts as zero, one less than a cell
outside reads the border.

Two implementations with these conventions. On CPU (backend.enabled()) the C++ kernel (kernels/roi_align.cpp)
reads the NCHW maps directly. Elsewhere (other devices, export) bilinear sampling is written as a gather: the maps
are flattened channels-last into one table of rows (one row = the C channels of one cell), and each output bin is
a weighted sum of its (2 * sample_ratio)^2 taps, one batched (1 x K) @ (K x C) product. A RoI reads only its own
level, so a multi-level pool costs one level's work, shapes stay static, and the backward is the exact adjoint
(scatter-add of the same taps). ops.ROIAlign is not used: on CPU it pooled all RoIs on every level, and its
gradient kernel ignores roi_end_mode (it spreads the gradient over a box one input pixel larger, without the
one-cell widening), so it was not the adjoint of the forward pass.
"""
import mindspore as ms
import numpy as np
from mindspore import nn, ops

from src.ops import backend, constants
from src.ops.custom import kernel

BATCH_COLUMN = 0            # RoI column holding the image index
CELL_CENTRE = 0.5           # feature cell k's value sits at k + 0.5 cells from the map's edge


def cell_offset(aligned: bool) -> float:
    """Feature coordinate = input coordinate / stride - cell_offset."""
    return CELL_CENTRE if aligned else 0.0
CORNERS = 2                 # bilinear taps per sample along one axis


def flatten_levels(feats):
    """Tuple of (B, C, h_l, w_l) maps -> (B * sum_l h_l * w_l, C) table: level-major, then image, row, column."""
    rows = ()
    for feat in feats:
        channels = feat.shape[1]
        cells = feat if channels == 1 else feat.transpose(0, 2, 3, 1)          # (B, h, w, C)
        rows += (cells.reshape(-1, channels),)
    return rows[0] if len(rows) == 1 else ops.concat(rows, axis=0)


class TableRoIAlign(nn.Cell):
    """RoIAlign of RoIs that each name their level, from a table made by `flatten_levels`.

    construct(table (N, C), rois (R, 5), level (R,) int32, level_shapes: tuple of (B, C, h, w) per level,
              strides: tuple of floats per level) -> (R, C, out, out) float32.
    """

    def __init__(self, out_size: int, sample_ratio: int, aligned: bool = True):
        super().__init__()
        self.out_size = out_size
        self.sample_ratio = sample_ratio
        self.cell_offset = cell_offset(aligned)
        samples = out_size * sample_ratio
        # Sample k of an axis sits at (k + 0.5) / samples of the RoI extent: bin k // sr, sub-sample k % sr.
        self.sample_positions = ms.Tensor(((np.arange(samples) + 0.5) / samples).astype(np.float32)[None, :])

    @staticmethod
    def _per_roi(level, values, dtype=ms.float32):
        """Python numbers, one per level -> (R,) value of each RoI's level."""
        return ops.gather(ms.Tensor(values, dtype), level, 0)

    def _axis_taps(self, start, extent, size):
        """Bilinear taps of the samples along one axis of every RoI.

        start, extent, size (R,) in cells -> tap indices (R, out, 2 * sr) int32 and weights (R, out, 2 * sr):
        for each bin, its samples' (low, high) cells and weights, with 1 / sr of the bin average folded in.
        """
        coord = start[:, None] + self.sample_positions * extent[:, None]             # (R, out * sr)
        limit = size[:, None] - 1.0
        inside = ops.cast(ops.logical_and(coord >= -1.0, coord <= size[:, None]), ms.float32)
        coord = ops.minimum(ops.maximum(coord, 0.0), limit)
        low = ops.floor(coord)
        high = ops.minimum(low + 1.0, limit)
        frac = coord - low
        scale = inside * (1.0 / self.sample_ratio)
        index = ops.stack((low, high), axis=-1)                                      # (R, out * sr, 2)
        weight = ops.stack(((1.0 - frac) * scale, frac * scale), axis=-1)
        shape = (start.shape[0], self.out_size, self.sample_ratio * CORNERS)
        return ops.cast(index, ms.int32).reshape(shape), weight.reshape(shape)

    def construct(self, table, rois, level, level_shapes, strides):
        rois = ops.stop_gradient(rois)
        batch = level_shapes[0][0]
        heights = [shape[2] for shape in level_shapes]
        widths = [shape[3] for shape in level_shapes]
        cells = [shape[2] * shape[3] for shape in level_shapes]
        level_rows = [0]                                                             # first table row of each level
        for level_cells in cells[:-1]:
            level_rows.append(level_rows[-1] + batch * level_cells)
        stride = self._per_roi(level, list(strides))
        height = self._per_roi(level, heights)
        width = self._per_roi(level, widths)
        image_rows = (self._per_roi(level, level_rows, ms.int32)                     # (R,) first row of the RoI's map
                      + ops.cast(rois[:, BATCH_COLUMN], ms.int32) * self._per_roi(level, cells, ms.int32))

        x1 = rois[:, 1] / stride - self.cell_offset
        y1 = rois[:, 2] / stride - self.cell_offset
        roi_w = ops.maximum((rois[:, 3] - rois[:, 1]) / stride, 1.0)
        roi_h = ops.maximum((rois[:, 4] - rois[:, 2]) / stride, 1.0)
        y_index, y_weight = self._axis_taps(y1, roi_h, height)                        # (R, out, 2sr)
        x_index, x_weight = self._axis_taps(x1, roi_w, width)
        y_rows = y_index * ops.cast(width, ms.int32)[:, None, None] + image_rows[:, None, None]

        num_rois, out, taps = rois.shape[0], self.out_size, self.sample_ratio * CORNERS
        grid = (num_rois, out, out, taps, taps)                                       # (R, bin y, bin x, tap y, tap x)
        index = (ops.broadcast_to(y_rows.reshape(num_rois, out, 1, taps, 1), grid)
                 + ops.broadcast_to(x_index.reshape(num_rois, 1, out, 1, taps), grid))
        weight = (ops.broadcast_to(y_weight.reshape(num_rois, out, 1, taps, 1), grid)
                  * ops.broadcast_to(x_weight.reshape(num_rois, 1, out, 1, taps), grid))
        bins, bin_taps, channels = num_rois * out * out, taps * taps, table.shape[1]
        tapped = ops.gather(table, index.reshape(-1), 0)                             # (R * out^2 * K, C)
        if channels == 1:
            pooled = (ops.cast(tapped, ms.float32).reshape(bins, bin_taps) * weight.reshape(bins, bin_taps)).sum(-1)
            return pooled.reshape(num_rois, 1, out, out)
        pooled = ops.bmm(weight.reshape(bins, 1, bin_taps), tapped.reshape(bins, bin_taps, channels))
        return pooled.reshape(num_rois, out, out, channels).transpose(0, 3, 1, 2)     # (R, C, out, out)


class SingleLevelRoIAlign(nn.Cell):
    """RoIAlign from one (B, C, h, w) map of the given stride: rois (R, 5) -> (R, C, out, out) float32.

    Also the tool for mask targets: stride 1 over the (B*M, 1, H, W) GT masks, which may stay uint8 (only
    the sampled taps are converted to float32).
    """

    def __init__(self, out_size: int, stride: float, sample_ratio: int, aligned: bool = True):
        super().__init__()
        self.strides = (float(stride),)
        self.pool = TableRoIAlign(out_size, sample_ratio, aligned)

    def construct(self, features, rois):
        level = ops.zeros((rois.shape[0],), ms.int32)
        return self.pool(flatten_levels((features,)), rois, level, (features.shape,), self.strides)


def _pyramid_kernel(out_size: int):
    """(rois (R, 5), level (R,) int32, settings (2 + L,) = (sample_ratio, cell offset, stride per level), L maps
    (B, C, h, w))
    -> (R, C, out_size, out_size), with its gradient to the maps."""
    backward = kernel(f"RoiAlignBackward{out_size}",
                      lambda dout, rois, level, settings, m0, m1, m2, m3: [m0, m1, m2, m3],
                      lambda dout, rois, level, settings, m0, m1, m2, m3: [m0, m1, m2, m3])

    def bprop(rois, level, settings, m0, m1, m2, m3, out, dout):
        grads = backward(dout, rois, level, settings, m0, m1, m2, m3)
        return ops.zeros_like(rois), ops.zeros_like(level), ops.zeros_like(settings), grads[0], grads[1], grads[2], \
            grads[3]

    return kernel(f"RoiAlignForward{out_size}",
                  lambda rois, level, settings, m0, m1, m2, m3: [rois[0], m0[1], out_size, out_size],
                  lambda rois, level, settings, m0, m1, m2, m3: m0, bprop=bprop)


class PyramidRoIAlign(nn.Cell):
    """RoIAlign (aligned unless told otherwise) of RoIs that each name their pyramid level.

    `prepare(feats)`: the L maps (B, C, h_l, w_l) as this op reads them (several pools of the same levels may share
    it); construct(rois (R, 5) = (batch index, x1, y1, x2, y2) in input pixels, level (R,) int32, prepared) ->
    (R, C, out_size, out_size) float32, with its gradient to the maps.
    """

    def __init__(self, out_size: int, sample_ratio: int, strides, aligned: bool = True):
        super().__init__()
        self.strides = tuple(float(s) for s in strides)
        self.num_levels = len(self.strides)
        self.uses_kernel = (backend.enabled() and out_size in constants.ROI_ALIGN_SIZES
                            and self.num_levels == constants.ROI_ALIGN_LEVELS)
        self.kernel = _pyramid_kernel(out_size) if self.uses_kernel else None
        self.kernel_settings = ms.Tensor(np.array((sample_ratio, cell_offset(aligned)) + self.strides, np.float32))
        self.table_pool = TableRoIAlign(out_size, sample_ratio, aligned)

    def prepare(self, feats):
        """The kernel reads the maps themselves; the gather version reads the channels-last table (then the maps,
        for their shapes)."""
        feats = tuple(feats[:self.num_levels])
        return feats if self.uses_kernel else (flatten_levels(feats),) + feats

    def construct(self, rois, level, prepared):
        if self.uses_kernel:
            return self.kernel(ops.stop_gradient(rois), level, self.kernel_settings, prepared[0], prepared[1],
                               prepared[2], prepared[3])
        shapes = ()
        for index in range(self.num_levels):
            shapes += (prepared[1 + index].shape,)
        return self.table_pool(prepared[0], rois, level, shapes, self.strides)
