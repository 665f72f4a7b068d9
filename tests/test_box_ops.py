"""Box math (src/maskrcnn/box_ops.py) against NumPy, compiled in GRAPH_MODE on CPU."""

import mindspore as ms
import numpy as np
import pytest
from mindspore import nn

from src.config import load_config
from src.maskrcnn import box_ops
from references import np_decode, np_iou


class BoxOpsNet(nn.Cell):
    """Every box_ops function in one graph, so the module compiles once."""

    def __init__(self, means, stds):
        super().__init__()
        self.means = box_ops.as_tensor(means)
        self.stds = box_ops.as_tensor(stds)

    def construct(self, boxes, targets, deltas, other, image_shape):
        height, width = box_ops.valid_region(image_shape)
        return (box_ops.encode(boxes, targets, self.means, self.stds),
                box_ops.decode(boxes, deltas, self.means, self.stds),
                box_ops.decode(boxes, box_ops.encode(boxes, targets, self.means, self.stds), self.means, self.stds),
                box_ops.box_iou(boxes, other),
                box_ops.clip_boxes(deltas * 100.0, height, width),
                box_ops.boxes_inside(targets, image_shape))


# ---------------------------------------------------------------- NumPy references

def np_encode(boxes, targets, means, stds):
    pw, ph = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    px, py = boxes[:, 0] + 0.5 * pw, boxes[:, 1] + 0.5 * ph
    gw, gh = targets[:, 2] - targets[:, 0], targets[:, 3] - targets[:, 1]
    gx, gy = targets[:, 0] + 0.5 * gw, targets[:, 1] + 0.5 * gh
    d = np.stack([(gx - px) / pw, (gy - py) / ph, np.log(gw / pw), np.log(gh / ph)], axis=1)
    return (d - means) / stds


def random_boxes(rng, n, size=(128, 192)):
    xy = rng.uniform(-10, [size[1], size[0]], size=(n, 2))
    wh = rng.uniform(1, 80, size=(n, 2))
    return np.concatenate([xy, xy + wh], axis=1).astype(np.float32)


# ---------------------------------------------------------------- tests

@pytest.fixture(scope="module")
def outputs():
    cfg = load_config("tiny")
    means, stds = [0.1, -0.2, 0.05, 0.0], cfg.rcnn.rcnn_target_stds
    rng = np.random.default_rng(0)
    n = 40
    boxes, other = random_boxes(rng, n), random_boxes(rng, 30)
    targets = boxes + rng.uniform(-15, 15, size=(n, 4)).astype(np.float32)
    targets[:, 2:] = np.maximum(targets[:, 2:], targets[:, :2] + 1.0)
    deltas = rng.normal(0, 1, size=(n, 4)).astype(np.float32)
    deltas[0, 2:] = [30.0, -30.0]                       # must be clamped, not overflow
    image_shape = np.array([100.0, 150.0, 1.2, 1.1], np.float32)   # valid region 120 x 165
    net = BoxOpsNet(means, stds)
    got = [o.asnumpy() for o in net(*(ms.Tensor(x) for x in (boxes, targets, deltas, other, image_shape)))]
    return dict(zip(("encoded", "decoded", "round_trip", "iou", "clipped", "inside"), got),
                boxes=boxes, targets=targets, deltas=deltas, other=other, image_shape=image_shape,
                means=np.array(means), stds=np.array(stds))


def test_encode_matches_numpy(outputs):
    want = np_encode(outputs["boxes"], outputs["targets"], outputs["means"], outputs["stds"])
    np.testing.assert_allclose(outputs["encoded"], want, rtol=1e-4, atol=1e-4)


def test_decode_matches_numpy_and_clamps_scale(outputs):
    want = np_decode(outputs["boxes"], outputs["deltas"], outputs["means"], outputs["stds"])
    np.testing.assert_allclose(outputs["decoded"], want, rtol=1e-4, atol=1e-3)
    assert np.all(np.isfinite(outputs["decoded"]))
    width = outputs["decoded"][0, 2] - outputs["decoded"][0, 0]
    ref_width = outputs["boxes"][0, 2] - outputs["boxes"][0, 0]
    assert width == pytest.approx(ref_width * 1000.0 / 16.0, rel=1e-4)


def test_encode_decode_round_trip(outputs):
    np.testing.assert_allclose(outputs["round_trip"], outputs["targets"], rtol=1e-4, atol=1e-3)


def test_iou_matches_numpy(outputs):
    want = np_iou(outputs["boxes"], outputs["other"])
    assert (want > 0).sum() > 10                         # the random boxes overlap enough to mean something
    np.testing.assert_allclose(outputs["iou"], want, atol=1e-5)


def test_clip_to_valid_region(outputs):
    raw = outputs["deltas"] * 100.0
    want = raw.copy()
    want[:, 0::2] = np.clip(raw[:, 0::2], 0, 150.0 * 1.1)
    want[:, 1::2] = np.clip(raw[:, 1::2], 0, 100.0 * 1.2)
    assert (want != raw).any() and (want == raw).any()
    np.testing.assert_allclose(outputs["clipped"], want, rtol=1e-6)


def test_inside_check(outputs):
    t = outputs["targets"]
    want = (t[:, 0] >= 0) & (t[:, 1] >= 0) & (t[:, 2] <= 165.0) & (t[:, 3] <= 120.0)
    assert 0 < want.sum() < len(want)
    np.testing.assert_array_equal(outputs["inside"], want)


def test_degenerate_encode_is_finite():
    zero = ms.Tensor(np.zeros((2, 4), np.float32))
    means, stds = box_ops.as_tensor([0, 0, 0, 0]), box_ops.as_tensor([1, 1, 1, 1])
    assert np.all(np.isfinite(box_ops.encode(zero, zero, means, stds).asnumpy()))
