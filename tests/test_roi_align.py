"""Multi-level RoIAlign (src/maskrcnn/roi_align.py) against a NumPy bilinear-sampling reference."""
import math

import mindspore as ms
import numpy as np
import pytest
from mindspore import nn

from src.config import load_config
from src.maskrcnn.roi_align import MultiLevelRoIAlign, roi_levels
from src.ops import backend
from src.ops.roi_align import SingleLevelRoIAlign

CHANNELS = 3
BATCH = 2


@pytest.fixture(scope="module")
def cfg():
    """The tiny preset at the recipe's finest scale (56), which the fixed per-level RoIs below are sized for."""
    return load_config("tiny", {"roi.roi_align_finest_scale": 56})


# ---------------------------------------------------------------- NumPy reference

def np_bilinear(feature, y, x):
    """feature (C, H, W) at feature coordinates (y, x); zero beyond one cell outside the map."""
    _, height, width = feature.shape
    if y < -1.0 or y > height or x < -1.0 or x > width:
        return np.zeros(feature.shape[0])
    y, x = min(max(y, 0.0), height - 1.0), min(max(x, 0.0), width - 1.0)
    y0, x0 = int(math.floor(y)), int(math.floor(x))
    y1, x1 = min(y0 + 1, height - 1), min(x0 + 1, width - 1)
    ly, lx = y - y0, x - x0
    return ((1 - ly) * (1 - lx) * feature[:, y0, x0] + (1 - ly) * lx * feature[:, y0, x1]
            + ly * (1 - lx) * feature[:, y1, x0] + ly * lx * feature[:, y1, x1])


def np_roi_align(feature, box, stride, out, samples):
    """Aligned RoIAlign of one input-pixel box: feature coordinate = pixel / stride - 0.5, RoI >= 1 cell."""
    x1, y1, x2, y2 = box
    start_x, start_y = x1 / stride - 0.5, y1 / stride - 0.5
    bin_w = max((x2 - x1) / stride, 1.0) / out
    bin_h = max((y2 - y1) / stride, 1.0) / out
    result = np.zeros((feature.shape[0], out, out))
    for ph in range(out):
        for pw in range(out):
            total = 0.0
            for iy in range(samples):
                for ix in range(samples):
                    y = start_y + (ph + (iy + 0.5) / samples) * bin_h
                    x = start_x + (pw + (ix + 0.5) / samples) * bin_w
                    total = total + np_bilinear(feature, y, x)
            result[:, ph, pw] = total / samples ** 2
    return result


def np_level(box, finest_scale, num_levels):
    scale = math.sqrt(max(box[2] - box[0], 0) * max(box[3] - box[1], 0))
    level = math.floor(math.log2(scale / finest_scale + 1e-6))
    return min(max(level, 0), num_levels - 1)


# ---------------------------------------------------------------- fixtures

def random_rois(rng, count, input_hw):
    """Boxes from 2 px to 2.5x the input (log-uniform), some sticking out of the input, random image."""
    size = np.exp(rng.uniform(np.log(2.0), np.log(2.5 * max(input_hw)), size=(count, 2)))
    centre = rng.uniform(-10, [input_hw[1] + 10, input_hw[0] + 10], size=(count, 2))
    boxes = np.concatenate([centre - size / 2, centre + size / 2], axis=1)
    boxes[-4:] = [[30, 20, 70, 62], [-40, 10, 120, 150],          # one RoI per level for sure:
                  [-60, -90, 240, 210], [-20, -30, 460, 430]]     # sides ~40, ~150, ~300, ~460
    return np.concatenate([rng.integers(0, BATCH, size=(count, 1)), boxes], axis=1).astype(np.float32)


def pyramid(cfg, rng):
    return [rng.normal(size=(BATCH, CHANNELS, h, w)).astype(np.float32)
            for (h, w), _ in zip(cfg.feature_shapes, cfg.roi.roi_align_featmap_strides)]


class PoolNet(nn.Cell):
    def __init__(self, cfg, out_size):
        super().__init__()
        self.pool = MultiLevelRoIAlign(cfg, out_size)

    def construct(self, rois, feats):
        return self.pool(rois, feats)


# ---------------------------------------------------------------- tests

def test_level_assignment_by_hand(cfg):
    sides = [0.0, 20.0, 55.0, 56.0, 111.9, 112.0, 224.0, 447.0, 448.0, 1000.0]
    rois = np.array([[0, 10, 10, 10 + s, 10 + s] for s in sides], np.float32)
    got = roi_levels(ms.Tensor(rois), 56.0, 4).asnumpy()
    np.testing.assert_array_equal(got, [0, 0, 0, 0, 0, 1, 2, 2, 3, 3])


@pytest.mark.parametrize("out_attr", ["roi_out_size", "mask_out_size"])
def test_multilevel_roi_align_matches_numpy(cfg, out_attr):
    out = getattr(cfg.roi, out_attr)
    rng = np.random.default_rng(len(out_attr))
    input_hw = (cfg.data.img_height, cfg.data.img_width)
    feats = pyramid(cfg, rng)
    rois = random_rois(rng, 24, input_hw)
    got = PoolNet(cfg, out)(ms.Tensor(rois), tuple(ms.Tensor(f) for f in feats)).asnumpy()
    assert got.shape == (len(rois), CHANNELS, out, out)

    strides, finest = cfg.roi.roi_align_featmap_strides, cfg.roi.roi_align_finest_scale
    levels = [np_level(r[1:], finest, len(strides)) for r in rois]
    assert set(levels) == set(range(len(strides)))          # every level is exercised
    np.testing.assert_array_equal(roi_levels(ms.Tensor(rois), float(finest), len(strides)).asnumpy(), levels)
    for roi, level, pooled in zip(rois, levels, got):
        want = np_roi_align(feats[level][int(roi[0])], roi[1:], strides[level], out, cfg.roi.roi_sample_ratio)
        np.testing.assert_allclose(pooled, want, rtol=1e-4, atol=1e-4)


def test_single_level_stride_one_samples_pixel_centres():
    """Mask-target use: a box covering pixels [x1, x2) pools exactly those pixels' values at 1 bin/pixel."""
    image = np.arange(2 * 1 * 12 * 16, dtype=np.float32).reshape(2, 1, 12, 16)
    rois = np.array([[1, 3, 2, 9, 8]], np.float32)               # pixels x 3..8, y 2..7 of image 1
    got = SingleLevelRoIAlign(6, 1, 2)(ms.Tensor(image), ms.Tensor(rois)).asnumpy()
    np.testing.assert_allclose(got[0, 0], image[1, 0, 2:8, 3:9], atol=1e-4)


class PoolSum(nn.Cell):
    def __init__(self, cfg):
        super().__init__()
        self.pool = MultiLevelRoIAlign(cfg, cfg.roi.roi_out_size)

    def construct(self, p2, p3, p4, p5, rois):
        return self.pool(rois, (p2, p3, p4, p5)).sum()


def test_gradient_reaches_only_the_assigned_level(cfg):
    """Bilinear weights of an in-map sample sum to 1, so d(sum)/d(level map) sums to RoIs_on_level * out^2."""
    rng = np.random.default_rng(7)
    feats = pyramid(cfg, rng)
    rois = np.array([[0, 10, 10, 40, 40],          # side 30  -> level 0
                     [1, 20, 5, 60, 45],           # side 40  -> level 0
                     [1, 0, 0, 120, 110]],         # side ~115 -> level 1
                    np.float32)
    grads = ms.grad(PoolSum(cfg), grad_position=(0, 1, 2, 3))(*(ms.Tensor(f) for f in feats), ms.Tensor(rois))
    out = cfg.roi.roi_out_size
    per_level = [g.asnumpy().sum(axis=(0, 2, 3)) for g in grads]            # (C,) per level
    np.testing.assert_allclose(per_level[0], 2 * out * out, rtol=1e-4)
    np.testing.assert_allclose(per_level[1], 1 * out * out, rtol=1e-4)
    assert not np.any(grads[2].asnumpy()) and not np.any(grads[3].asnumpy())
    assert not np.any(grads[0].asnumpy()[1, :, 12:, :])       # image 1's level-0 box ends at feature row 10.75


class WeightedPool(nn.Cell):
    def __init__(self, out, stride, samples):
        super().__init__()
        self.pool = SingleLevelRoIAlign(out, stride, samples)

    def construct(self, feature, rois, cotangent):
        return (self.pool(feature, rois) * cotangent).sum()


def test_gradient_is_the_adjoint_of_the_forward_pass():
    """d(sum(pool * g))/d(feature) equals the NumPy pooling of unit impulses, weighted by g: the backward
    spreads each bin over exactly the taps the forward read (narrow RoIs widened to one cell, no "+1" end,
    RoIs partly outside the map)."""
    rng = np.random.default_rng(3)
    out, stride, samples, height, width = 3, 4, 2, 6, 8
    feature = rng.normal(size=(1, 1, height, width)).astype(np.float32)
    rois = np.array([[0, 5, 7, 21, 19], [0, 9, 3, 11, 4], [0, -6, -3, 20, 30]], np.float32)
    cotangent = rng.normal(size=(len(rois), 1, out, out)).astype(np.float32)
    got = ms.grad(WeightedPool(out, stride, samples))(ms.Tensor(feature), ms.Tensor(rois),
                                                      ms.Tensor(cotangent)).asnumpy()
    want = np.zeros_like(feature)
    for y in range(height):
        for x in range(width):
            impulse = np.zeros((1, height, width))
            impulse[0, y, x] = 1.0
            want[0, 0, y, x] = sum((np_roi_align(impulse, roi[1:], stride, out, samples) * g).sum()
                                   for roi, g in zip(rois, cotangent))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


class PoolWeighted(nn.Cell):
    """sum(pool(rois, maps) * cotangent), so that its gradients are the pool's vector-Jacobian product."""

    def __init__(self, pool):
        super().__init__()
        self.pool = pool

    def construct(self, p2, p3, p4, p5, rois, cotangent):
        return (self.pool(rois, (p2, p3, p4, p5)) * cotangent).sum()


@pytest.mark.parametrize("out_attr", ["roi_out_size", "mask_out_size"])
def test_cpu_kernel_matches_the_table_implementation(cfg, out_attr):
    """The CPU kernel (src/ops/kernels/roi_align.cpp) and the gather-table version agree on values and map gradients, on RoIs
    of every level, narrow ones and ones partly outside the image."""
    out = getattr(cfg.roi, out_attr)
    rng = np.random.default_rng(11)
    feats = [ms.Tensor(f) for f in pyramid(cfg, rng)]
    height, width = cfg.data.img_height, cfg.data.img_width
    rois = np.concatenate([random_rois(rng, 24, (height, width)),
                           np.array([[0, 10, 10, 10.5, 40], [1, -30, -20, 60, 50], [1, width - 20, 5, width + 40, 30]],
                                    np.float32)])
    kernel_pool = MultiLevelRoIAlign(cfg, out)
    with backend.use_mindspore_kernels():
        table_pool = MultiLevelRoIAlign(cfg, out)
    assert kernel_pool.align.uses_kernel and not table_pool.align.uses_kernel
    got = PoolNet(cfg, out)
    got.pool = kernel_pool
    want = PoolNet(cfg, out)
    want.pool = table_pool
    np.testing.assert_allclose(got(ms.Tensor(rois), tuple(feats)).asnumpy(),
                               want(ms.Tensor(rois), tuple(feats)).asnumpy(), rtol=1e-5, atol=1e-5)
    cotangent = ms.Tensor(rng.normal(size=(len(rois), CHANNELS, out, out)).astype(np.float32))
    positions = (0, 1, 2, 3)
    grads_got = ms.grad(PoolWeighted(kernel_pool), grad_position=positions)(*feats, ms.Tensor(rois), cotangent)
    grads_want = ms.grad(PoolWeighted(table_pool), grad_position=positions)(*feats, ms.Tensor(rois), cotangent)
    for mine, theirs in zip(grads_got, grads_want):
        assert np.any(theirs.asnumpy())
        np.testing.assert_allclose(mine.asnumpy(), theirs.asnumpy(), rtol=1e-4, atol=1e-4)
