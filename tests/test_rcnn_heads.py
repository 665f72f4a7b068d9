"""R-CNN box and mask heads: shapes, losses against NumPy, mask targets, and the model's parameter budget."""
import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor, nn

from src.config import load_config
from src.data.mask_bits import pack_masks
from src.maskrcnn.fpn_neck import FeatPyramidNeck
from src.maskrcnn.rcnn_cls import RcnnCls
from src.maskrcnn.rcnn_mask import RcnnMask
from src.maskrcnn.resnet50 import ResNet50
from src.maskrcnn.rpn import RPN
from src.ops import backend
from src.ops.mask_targets import MaskTargets
from references import (analytic_fpn_count, analytic_resnet_count, analytic_rpn_count, learnable_count,
                        numpy_bce_with_logits, numpy_smooth_l1)

# torchvision's maskrcnn_resnet50_fpn reports 44,401,393 parameters: 91 classes and FrozenBatchNorm2d, whose
# 53,120 affine values are buffers there. At 81 classes with the affine values counted, the same network has
# 44,401,393 + 53,120 - 10 * (1024 + 1) - 40 * (1024 + 1) - 10 * (256 + 1) parameters.
TORCHVISION_MASK_RCNN_AT_81_CLASSES = 44_401_393 + 53_120 - 10 * 1025 - 40 * 1025 - 10 * 257


def analytic_box_head_count(cfg):
    c, n = cfg.rcnn, cfg.num_classes
    in_features = c.rcnn_in_channels * cfg.roi.roi_out_size ** 2
    fc = c.rcnn_fc_out_channels
    return in_features * fc + fc + fc * fc + fc + fc * n + n + fc * 4 * n + 4 * n


def analytic_mask_head_count(cfg):
    c, n = cfg.rcnn, cfg.num_classes
    ch = c.rcnn_mask_out_channels
    up = c.mask_shape // cfg.roi.mask_out_size
    convs = c.rcnn_in_channels * ch * 9 + ch + 3 * (ch * ch * 9 + ch)
    return convs + ch * ch * up * up + ch + ch * n + n


def numpy_bilinear(image, y, x):
    """Bilinear sample with the RoIAlign border rules (pixel i at coordinate i)."""
    height, width = image.shape
    if y < -1.0 or y > height or x < -1.0 or x > width:
        return 0.0
    y, x = max(y, 0.0), max(x, 0.0)
    y0, x0 = int(np.floor(y)), int(np.floor(x))
    if y0 >= height - 1:
        y0 = y1 = height - 1
        y = float(y0)
    else:
        y1 = y0 + 1
    if x0 >= width - 1:
        x0 = x1 = width - 1
        x = float(x0)
    else:
        x1 = x0 + 1
    ly, lx = y - y0, x - x0
    return ((1 - ly) * (1 - lx) * image[y0, x0] + (1 - ly) * lx * image[y0, x1]
            + ly * (1 - lx) * image[y1, x0] + ly * lx * image[y1, x1])


def numpy_mask_target(mask, box, size, samples):
    """Continuous-pixel RoIAlign of one mask over box (x1, y1, x2, y2), thresholded at 0.5."""
    x1, y1, x2, y2 = box
    bin_w, bin_h = (x2 - x1) / size, (y2 - y1) / size
    out = np.zeros((size, size))
    offsets = (np.arange(samples) + 0.5) / samples
    for u in range(size):
        for v in range(size):
            values = [numpy_bilinear(mask, y1 + bin_h * (u + oy) - 0.5, x1 + bin_w * (v + ox) - 0.5)
                      for oy in offsets for ox in offsets]
            out[u, v] = np.mean(values)
    return out


class HeadMethod(nn.Cell):
    """Calls one method of a head from a graph-mode construct, as the full network does."""

    def __init__(self, head, method):
        super().__init__()
        self.head = head
        self.method = method

    def construct(self, *inputs):
        if self.method == "loss":
            return self.head.loss(*inputs)
        return self.head.mask_targets(*inputs)


class MaskLossGrad(nn.Cell):
    def __init__(self, head):
        super().__init__()
        self.grad_fn = ms.grad(head.loss, grad_position=0)

    def construct(self, logits, labels, targets, weights):
        return self.grad_fn(logits, labels, targets, weights)


@pytest.fixture(scope="module")
def box_head(tiny):
    return RcnnCls(tiny)


@pytest.fixture(scope="module")
def mask_head():
    """32 hidden channels instead of 256 keep the 3x3 convs cheap on this CPU; targets and loss ignore them."""
    return RcnnMask(load_config("tiny", {"rcnn.rcnn_mask_out_channels": 32}))


# ---------------------------------------------------------------- box head

def test_box_head_output_shapes(tiny, box_head):
    rows = tiny.train.batch_size * tiny.roi_sample_num
    size = tiny.roi.roi_out_size
    feats = np.random.RandomState(0).randn(rows, tiny.rcnn.rcnn_in_channels, size, size).astype(np.float32)
    cls_logits, deltas = box_head(Tensor(feats))
    assert cls_logits.shape == (rows, tiny.num_classes) and deltas.shape == (rows, tiny.num_classes, 4)
    assert np.all(np.isfinite(cls_logits.asnumpy())) and np.any(deltas.asnumpy())


def numpy_box_loss(cfg, logits, deltas, labels, label_weights, targets, bbox_weights):
    num = max(label_weights.sum(), 1.0)
    shifted = logits - logits.max(1, keepdims=True)
    log_prob = shifted - np.log(np.exp(shifted).sum(1, keepdims=True))
    ce = -log_prob[np.arange(len(labels)), labels]
    own = deltas[np.arange(len(labels)), labels]
    reg = numpy_smooth_l1(own - targets, 1.0).sum(1)
    return ((ce * label_weights).sum() / num * cfg.rcnn.rcnn_loss_cls_weight,
            (reg * bbox_weights).sum() / num * cfg.rcnn.rcnn_loss_reg_weight)


def test_box_loss_matches_numpy_and_uses_each_rows_own_class(tiny, box_head):
    rng = np.random.RandomState(1)
    rows, classes = tiny.train.batch_size * tiny.roi_sample_num, tiny.num_classes
    logits = rng.randn(rows, classes).astype(np.float32) * 2
    deltas = rng.randn(rows, classes, 4).astype(np.float32) * 1.5          # both smooth-L1 branches
    labels = np.where(rng.rand(rows) < 0.3, rng.randint(1, classes, rows), 0).astype(np.int32)
    label_weights = (rng.rand(rows) < 0.8).astype(np.float32)
    bbox_weights = label_weights * (labels > 0)
    targets = rng.randn(rows, 4).astype(np.float32)
    loss = HeadMethod(box_head, "loss")
    inputs = [logits, deltas, labels, label_weights, targets, bbox_weights]
    got = [float(v) for v in loss(*(Tensor(v) for v in inputs))]
    np.testing.assert_allclose(got, numpy_box_loss(tiny, *(np.asarray(v, np.float64) if v.dtype == np.float32
                                                          else v for v in inputs)), rtol=1e-4)
    # Only the own-class deltas of positive rows and the logits of weighted rows may matter.
    positive = np.flatnonzero(bbox_weights)
    noisy_deltas = deltas + 1e4
    noisy_deltas[positive, labels[positive]] = deltas[positive, labels[positive]]
    noisy_logits = np.where(label_weights[:, None] > 0, logits, 1e4).astype(np.float32)
    noisy = [float(v) for v in loss(*(Tensor(v) for v in (noisy_logits, noisy_deltas, labels,
                                                           label_weights, targets, bbox_weights)))]
    np.testing.assert_allclose(noisy, got, rtol=1e-5)
    empty = np.zeros(rows, np.float32)
    assert [float(v) for v in loss(*(Tensor(v) for v in (logits, deltas, labels, empty, targets, empty)))] == [0, 0]


# ---------------------------------------------------------------- mask head

def test_mask_head_output_shape(tiny, mask_head):
    rows = tiny.train.batch_size * tiny.num_pos_stage2
    size = tiny.roi.mask_out_size
    feats = np.random.RandomState(2).randn(rows, tiny.rcnn.rcnn_in_channels, size, size).astype(np.float32)
    logits = mask_head(Tensor(feats)).asnumpy()
    assert logits.shape == (rows, tiny.num_classes, tiny.rcnn.mask_shape, tiny.rcnn.mask_shape)
    assert np.all(np.isfinite(logits)) and 0 < np.abs(logits).max() < 1.0      # near p = 0.5 at init


@pytest.fixture(scope="module", params=["cpu_kernel", "mindspore_ops"])
def target_net(request, mask_head):
    """Mask targets from the C++ kernel (CPU) and from the RoIAlign table version (other devices)."""
    if request.param == "cpu_kernel":
        assert mask_head.targets.uses_kernel
        return HeadMethod(mask_head, "mask_targets")
    with backend.use_mindspore_kernels():
        head = RcnnMask(load_config("tiny", {"rcnn.rcnn_mask_out_channels": 32}))
    assert not head.targets.uses_kernel
    return HeadMethod(head, "mask_targets")


def test_mask_target_of_a_rectangle(tiny, target_net):
    size = tiny.rcnn.mask_shape
    masks = np.zeros((1, 2, tiny.data.img_height, tiny.data.img_width), np.uint8)
    masks[0, 1, 20:100, 48:100] = 1                                        # x in [48, 100), y in [20, 100)
    # RoI 0 is 56 px wide (2 px per target column) and its right half lies inside the rectangle; RoI 1 is the
    # rectangle's own box, which must give all ones (no half-pixel or "+1" shift at any border).
    rois = np.array([[20, 30, 76, 86], [48, 20, 100, 100]], np.float32)
    targets = target_net(Tensor(masks), Tensor(rois), Tensor(np.array([1, 1], np.int32))).asnumpy()
    half = np.zeros((size, size), np.float32)
    half[:, size // 2:] = 1.0
    assert targets.shape == (2, size, size)
    np.testing.assert_array_equal(targets[0], half)
    np.testing.assert_array_equal(targets[1], np.ones((size, size), np.float32))


def test_soft_mask_targets_are_the_roi_align_of_the_mask(tiny):
    """rcnn.mask_target_binary false (torchvision's targets): the RoIAlign itself, not thresholded."""
    head = RcnnMask(load_config("tiny", {"rcnn.rcnn_mask_out_channels": 32, "rcnn.mask_target_binary": False}))
    assert not head.targets.uses_kernel
    size = tiny.rcnn.mask_shape
    masks = np.zeros((1, 1, tiny.data.img_height, tiny.data.img_width), np.uint8)
    masks[0, 0, :, 50:] = 1                                  # x >= 50
    # 28 px wide RoI from x = 36.5: column u covers [36.5 + u, 37.5 + u), so column 13 is half inside
    rois = np.array([[36.5, 10, 64.5, 38]], np.float32)
    targets = HeadMethod(head, "mask_targets")(Tensor(masks), Tensor(rois), Tensor(np.zeros(1, np.int32))).asnumpy()
    want = np.clip(np.arange(size) + 37.0 - 50.0 + 0.5, 0.0, 1.0)        # sample-averaged coverage per column
    np.testing.assert_allclose(targets[0], np.tile(want, (size, 1)), atol=1e-6)
    assert 0.0 < targets[0, 0, 13] < 1.0


def random_mask_case(rng, batch, num_gts, height, width, rows):
    """(masks (B*M, H, W) uint8 rectangles with holes and ragged edges, gt_index (rows,), rois (rows, 4) that
    overlap their GT only partly)."""
    masks = np.zeros((batch * num_gts, height, width), np.uint8)
    boxes = np.zeros((batch * num_gts, 4))
    for index in range(batch * num_gts):
        x0, y0 = rng.randint(10, width - 60), rng.randint(10, height - 50)
        x1, y1 = x0 + rng.randint(10, 50), y0 + rng.randint(10, 40)
        masks[index, y0:y1, x0:x1] = rng.rand(y1 - y0, x1 - x0) < 0.9
        boxes[index] = x0, y0, x1, y1
    gt_index = rng.choice(batch * num_gts, rows, replace=False).astype(np.int32)
    rois = (boxes[gt_index] + rng.uniform(-8, 8, (rows, 4))).astype(np.float32)
    return masks, gt_index, rois


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "soft"])
@pytest.mark.parametrize("kernels", ["cpu_kernel", "mindspore_ops"])
def test_mask_targets_from_bits_equal_those_from_bytes(kernels, binary):
    """The training pipeline's bits (src/data/mask_bits.py) give the same targets as one byte per pixel, on both
    paths, also for a width that is not a multiple of 8 (the last byte of a row half used)."""
    batch, num_gts, height, width, size = 2, 3, 90, 141, 28
    masks, gt_index, rois = random_mask_case(np.random.RandomState(5), batch, num_gts, height, width, rows=6)
    masks[:, :, width - 3:] = 1                                             # pixels in the last, half-used byte
    rois[0] = (width - 20, 10, width + 4, 60)                               # a RoI over the right border
    boxes = Tensor(np.concatenate([gt_index[:, None].astype(np.float32), rois], axis=1))
    if kernels == "cpu_kernel":
        op = MaskTargets(size, 2, 1.0, width, binary)
        assert op.uses_kernel == binary
    else:
        with backend.use_mindspore_kernels():
            op = MaskTargets(size, 2, 1.0, width, binary)
        assert not op.uses_kernel
    pixels = masks.reshape(batch, num_gts, height, width)
    from_bytes = op(Tensor(pixels), boxes).asnumpy()
    from_bits = op(Tensor(pack_masks(pixels)), boxes).asnumpy()
    assert 0.05 < from_bytes.mean() < 0.95
    np.testing.assert_array_equal(from_bits, from_bytes)


def test_mask_targets_match_numpy_and_pick_each_rois_gt(tiny, target_net):
    batch, num_gts, height, width = 2, tiny.data.max_instance_count, tiny.data.img_height, tiny.data.img_width
    rows = 6
    masks, gt_index, rois = random_mask_case(np.random.RandomState(3), batch, num_gts, height, width, rows)
    got = target_net(Tensor(masks.reshape(batch, num_gts, height, width)), Tensor(rois), Tensor(gt_index))
    got = got.asnumpy()
    for r in range(rows):
        soft = numpy_mask_target(masks[gt_index[r]].astype(np.float64), rois[r].astype(np.float64),
                                 tiny.rcnn.mask_shape, tiny.roi.roi_sample_ratio)
        decided = np.abs(soft - 0.5) > 1e-4
        np.testing.assert_array_equal(got[r][decided], (soft >= 0.5)[decided].astype(np.float32))
        assert 0.1 < got[r].mean() < 0.95


def numpy_mask_loss(cfg, logits, labels, targets, weights):
    own = logits[np.arange(len(labels)), labels]
    per_row = numpy_bce_with_logits(own, targets).mean((1, 2))
    return (per_row * weights).sum() / max(weights.sum(), 1.0) * cfg.rcnn.rcnn_loss_mask_weight


@pytest.fixture(scope="module")
def mask_loss_case(tiny):
    rng = np.random.RandomState(4)
    rows, classes, size = tiny.train.batch_size * tiny.num_pos_stage2, tiny.num_classes, tiny.rcnn.mask_shape
    logits = rng.randn(rows, classes, size, size).astype(np.float32) * 2
    labels = rng.randint(1, classes, rows).astype(np.int32)
    targets = (rng.rand(rows, size, size) < 0.4).astype(np.float32)
    weights = (rng.rand(rows) < 0.6).astype(np.float32)
    weights[0], weights[1] = 1.0, 0.0
    return logits, labels, targets, weights


def test_mask_loss_matches_numpy(tiny, mask_head, mask_loss_case):
    got = float(HeadMethod(mask_head, "loss")(*(Tensor(v) for v in mask_loss_case)))
    logits, labels, targets, weights = mask_loss_case
    np.testing.assert_allclose(got, numpy_mask_loss(tiny, logits.astype(np.float64), labels, targets, weights),
                               rtol=1e-4)
    scaled = RcnnMask(load_config("tiny", {"rcnn.rcnn_loss_mask_weight": 0.25}))
    np.testing.assert_allclose(float(HeadMethod(scaled, "loss")(*(Tensor(v) for v in mask_loss_case))),
                               0.25 * got, rtol=1e-5)


def test_mask_loss_gradient_only_on_own_class_of_weighted_rows(mask_head, mask_loss_case):
    logits, labels, targets, weights = mask_loss_case
    grad = MaskLossGrad(mask_head)(*(Tensor(v) for v in mask_loss_case)).asnumpy()
    touched = np.abs(grad).sum((2, 3)) > 0                                  # (R, C)
    expected = np.zeros_like(touched)
    expected[np.arange(len(labels)), labels] = weights > 0
    np.testing.assert_array_equal(touched, expected)


# ---------------------------------------------------------------- parameter budget

def test_mask_rcnn_r50_fpn_parameter_breakdown():
    recipe = load_config()
    parts = {
        "backbone (ResNet50)": (ResNet50(recipe), analytic_resnet_count(recipe)),
        "neck (FPN)": (FeatPyramidNeck(recipe), analytic_fpn_count(recipe)),
        "rpn": (RPN(recipe), analytic_rpn_count(recipe)),
        "box head (RcnnCls)": (RcnnCls(recipe), analytic_box_head_count(recipe)),
        "mask head (RcnnMask)": (RcnnMask(recipe), analytic_mask_head_count(recipe)),
    }
    total = 0
    print(f"\nMask R-CNN R50-FPN parameters at {recipe.num_classes} classes:")
    for name, (cell, expected) in parts.items():
        count = learnable_count(cell.get_parameters())
        print(f"  {name:22s} {count:>12,d}")
        assert count == expected, name
        total += count
    print(f"  {'total':22s} {total:>12,d}")
    assert total == TORCHVISION_MASK_RCNN_AT_81_CLASSES == 44_400_693
