"""RPN head: per-level output shapes, the documented flatten order, init, parameter count, and its loss."""
import numpy as np
import pytest
from mindspore import Tensor, nn

from src.config import load_config
from src.maskrcnn.rpn import RPN, SMOOTH_L1_BETA
from references import analytic_rpn_count, numpy_bce_with_logits, numpy_smooth_l1

CLS_TAG, REG_TAG = 0.1, 0.01           # bias offsets that tag the anchor / delta channel in the flatten test


def numpy_rpn_loss(cfg, cls, deltas, labels, label_weights, targets, bbox_weights):
    num = max(label_weights.sum(), 1.0)
    cls_loss = (numpy_bce_with_logits(cls, (labels > 0).astype(np.float64)) * label_weights).sum() / num
    reg_loss = (numpy_smooth_l1(deltas - targets, SMOOTH_L1_BETA).sum(-1) * bbox_weights).sum() / num
    cls_loss *= cfg.rpn.rpn_loss_cls_weight
    reg_loss *= cfg.rpn.rpn_loss_reg_weight
    return cls_loss + reg_loss, cls_loss, reg_loss


class RpnLoss(nn.Cell):
    """Calls RPN.loss from a graph-mode construct, as the full network does."""

    def __init__(self, rpn):
        super().__init__()
        self.rpn = rpn

    def construct(self, *inputs):
        return self.rpn.loss(*inputs)


@pytest.fixture(scope="module")
def position_run(tiny):
    """RPN whose outputs encode position: channel 0 of the input holds the cell index y * w + x, the 3x3
    conv passes it through, anchor a's logit adds a * CLS_TAG and delta channel c adds c * REG_TAG.
    16 channels instead of 256 keep the 3x3 conv cheap on this CPU; the layout does not depend on them."""
    rpn = RPN(load_config("tiny", {"rpn.rpn_in_channels": 16, "rpn.rpn_feat_channels": 16}))
    conv = np.zeros(rpn.rpn_conv.weight.shape, np.float32)
    conv[0, 0, 1, 1] = 1.0
    rpn.rpn_conv.weight.set_data(Tensor(conv))
    for head, tag in ((rpn.rpn_cls, CLS_TAG), (rpn.rpn_reg, REG_TAG)):
        weight = np.zeros(head.weight.shape, np.float32)
        weight[:, 0] = 1.0
        head.weight.set_data(Tensor(weight))
        head.bias.set_data(Tensor(np.arange(weight.shape[0], dtype=np.float32) * tag))
    feats = []
    for h, w in tiny.feature_shapes:
        feat = np.zeros((2, rpn.rpn_conv.in_channels, h, w), np.float32)
        feat[:, 0] = np.arange(h * w, dtype=np.float32).reshape(h, w)
        feats.append(Tensor(feat))
    cls_scores, bbox_deltas = rpn(tuple(feats))
    return [c.asnumpy() for c in cls_scores], [d.asnumpy() for d in bbox_deltas]


def test_per_level_output_shapes(tiny, position_run):
    cls_scores, bbox_deltas = position_run
    a = tiny.num_anchors
    assert [c.shape for c in cls_scores] == [(2, h * w * a) for h, w in tiny.feature_shapes]
    assert [d.shape for d in bbox_deltas] == [(2, h * w * a, 4) for h, w in tiny.feature_shapes]
    assert sum(c.shape[1] for c in cls_scores) == tiny.num_bboxes


def test_flatten_order_is_cell_major_anchor_minor(tiny, position_run):
    cls_scores, bbox_deltas = position_run
    a = tiny.num_anchors
    for (h, w), cls, deltas in zip(tiny.feature_shapes, cls_scores, bbox_deltas):
        n = np.arange(h * w * a)
        cell, anchor = n // a, n % a
        np.testing.assert_allclose(cls[1], cell + anchor * CLS_TAG, atol=1e-3)
        coord = np.arange(4)
        expected = cell[:, None] + (anchor[:, None] * 4 + coord[None, :]) * REG_TAG
        np.testing.assert_allclose(deltas[1], expected, atol=1e-3)


def test_normal_init_zero_bias_and_parameter_count():
    recipe = load_config()
    rpn = RPN(recipe)
    for conv in (rpn.rpn_conv, rpn.rpn_cls, rpn.rpn_reg):
        assert abs(conv.weight.asnumpy().std() - 0.01) < 0.002 and not np.any(conv.bias.asnumpy())
    count = sum(int(np.prod(p.shape)) for p in rpn.get_parameters())
    assert count == analytic_rpn_count(recipe) == 593_935


@pytest.fixture(scope="module")
def loss_net(tiny):
    return RpnLoss(RPN(tiny))


def random_targets(rng, batch, n, num_sampled):
    labels = (rng.rand(batch, n) < 0.3).astype(np.int32)
    label_weights = np.zeros((batch, n), np.float32)
    for b in range(batch):
        label_weights[b, rng.choice(n, num_sampled, replace=False)] = 1.0
    bbox_weights = label_weights * labels
    targets = rng.randn(batch, n, 4).astype(np.float32) * 0.2
    return labels, label_weights, targets, bbox_weights


def test_loss_matches_numpy(tiny, loss_net):
    rng = np.random.RandomState(0)
    batch, n = 2, tiny.num_bboxes
    cls = rng.randn(batch, n).astype(np.float32) * 3
    deltas = rng.randn(batch, n, 4).astype(np.float32) * 0.2     # both smooth-L1 branches (|d| vs 1/9)
    labels, label_weights, targets, bbox_weights = random_targets(rng, batch, n, tiny.rpn.num_expected_total)
    got = loss_net(*(Tensor(v) for v in (cls, deltas, labels, label_weights, targets, bbox_weights)))
    want = numpy_rpn_loss(tiny, cls.astype(np.float64), deltas.astype(np.float64), labels, label_weights,
                          targets.astype(np.float64), bbox_weights)
    np.testing.assert_allclose([float(g) for g in got], want, rtol=1e-4)
    assert float(got[2]) > 0


def test_unsampled_anchors_do_not_count_and_no_samples_gives_zero(tiny, loss_net):
    rng = np.random.RandomState(1)
    batch, n = 2, tiny.num_bboxes
    cls = rng.randn(batch, n).astype(np.float32)
    deltas = rng.randn(batch, n, 4).astype(np.float32)
    labels, label_weights, targets, bbox_weights = random_targets(rng, batch, n, 8)
    noisy_cls, noisy_deltas = cls.copy(), deltas.copy()
    noisy_cls[label_weights == 0] = 1e4
    noisy_deltas[bbox_weights == 0] = 1e4
    first = loss_net(*(Tensor(v) for v in (cls, deltas, labels, label_weights, targets, bbox_weights)))
    second = loss_net(*(Tensor(v) for v in (noisy_cls, noisy_deltas, labels, label_weights, targets, bbox_weights)))
    np.testing.assert_allclose([float(v) for v in first], [float(v) for v in second], rtol=1e-6)
    zeros = np.zeros((batch, n), np.float32)
    empty = loss_net(*(Tensor(v) for v in (cls, deltas, zeros.astype(np.int32), zeros, targets, zeros)))
    assert [float(v) for v in empty] == [0.0, 0.0, 0.0]


def test_loss_weights_scale_each_term():
    cfg = load_config("tiny", {"rpn.rpn_loss_cls_weight": 2.0, "rpn.rpn_loss_reg_weight": 0.5})
    rng = np.random.RandomState(2)
    n = 64
    cls = rng.randn(1, n).astype(np.float32)
    deltas = rng.randn(1, n, 4).astype(np.float32)
    labels, label_weights, targets, bbox_weights = random_targets(rng, 1, n, 16)
    got = RpnLoss(RPN(cfg))(*(Tensor(v) for v in (cls, deltas, labels, label_weights, targets, bbox_weights)))
    want = numpy_rpn_loss(cfg, cls.astype(np.float64), deltas.astype(np.float64), labels, label_weights,
                          targets.astype(np.float64), bbox_weights)
    np.testing.assert_allclose([float(g) for g in got], want, rtol=1e-4)
