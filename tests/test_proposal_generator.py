"""Proposal generation (src/maskrcnn/proposal_generator.py) against a NumPy pipeline with greedy NMS."""
import mindspore as ms
import numpy as np
import pytest

from src.config import load_config
from src.maskrcnn.anchor_generator import generate_anchors
from src.maskrcnn.proposal_generator import Proposal
from references import np_decode, np_iou

BATCH = 2
IMAGE_SHAPES = np.array([[100.0, 150.0, 1.2, 1.1],     # valid region 120 x 165 of the 128 x 192 input
                         [128.0, 192.0, 1.0, 1.0]], np.float32)


def np_greedy_nms(boxes, thr):
    """Boxes sorted by decreasing score -> keep mask; a kept box suppresses later ones with IoU > thr."""
    keep = np.zeros(len(boxes), bool)
    suppressed = np.zeros(len(boxes), bool)
    iou = np_iou(boxes.astype(np.float64), boxes.astype(np.float64))
    for i in range(len(boxes)):
        if not suppressed[i]:
            keep[i] = True
            suppressed |= iou[i] > thr
    return keep


def top(scores, k):
    return np.argsort(-scores, kind="stable")[:k]


def np_proposals(p, cfg, logits, deltas, anchors, image_shape):
    """One image: the documented pipeline -> (boxes (max_num, 4), valid (max_num,), suppressed count)."""
    height, width = image_shape[0] * image_shape[2], image_shape[1] * image_shape[3]
    all_boxes, all_scores, suppressed = [], [], 0
    for level_logits, level_deltas, level_anchors in zip(logits, deltas, anchors):
        scores = 1.0 / (1.0 + np.exp(-level_logits.astype(np.float64)))
        index = top(scores, p.nms_pre)
        boxes = np_decode(level_anchors[index], level_deltas[index], np.array(cfg.rpn.rpn_target_means),
                          np.array(cfg.rpn.rpn_target_stds))
        boxes[:, 0::2] = np.clip(boxes[:, 0::2], 0, width)
        boxes[:, 1::2] = np.clip(boxes[:, 1::2], 0, height)
        scores = scores[index]
        small = (boxes[:, 2] - boxes[:, 0] < p.min_bbox_size) | (boxes[:, 3] - boxes[:, 1] < p.min_bbox_size)
        scores[small] = -1.0
        order = top(scores, len(scores))
        boxes, scores = boxes[order], scores[order]
        keep = np_greedy_nms(boxes, p.nms_thr) & (scores >= 0)
        suppressed += (~keep & (scores >= 0)).sum()
        kept = np.flatnonzero(keep)[:p.nms_post]
        all_boxes.append(boxes[kept])
        all_scores.append(scores[kept])
    boxes, scores = np.concatenate(all_boxes), np.concatenate(all_scores)
    best = top(scores, p.max_num)
    valid = np.zeros(p.max_num, bool)
    valid[:len(best)] = True
    out = np.tile([0.0, 0.0, width, height], (p.max_num, 1))
    out[:len(best)] = boxes[best]
    return out, valid, suppressed


def make_inputs(cfg, seed):
    rng = np.random.default_rng(seed)
    anchors = generate_anchors(cfg)
    logits = [rng.normal(0, 2, size=(BATCH, len(a))).astype(np.float32) for a in anchors]
    deltas = [rng.normal(0, 0.3, size=(BATCH, len(a), 4)).astype(np.float32) for a in anchors]
    return logits, deltas, anchors


def run(net, logits, deltas, anchors):
    proposals, valid = net(tuple(ms.Tensor(x) for x in logits), tuple(ms.Tensor(x) for x in deltas),
                           tuple(ms.Tensor(x) for x in anchors), ms.Tensor(IMAGE_SHAPES))
    return proposals.asnumpy(), valid.asnumpy()


SMALL_TEST_PHASE = {"proposal_test.nms_pre": 10, "proposal_test.nms_post": 60, "proposal_test.max_num": 60,
                    "proposal_test.min_bbox_size": 6.0, "proposal_test.nms_thr": 0.3}


@pytest.mark.parametrize("training, overrides", [(True, {}), (False, SMALL_TEST_PHASE)],
                         ids=["train-tiny", "test-padded-minsize"])
def test_proposals_match_numpy_pipeline(training, overrides):
    cfg = load_config("tiny", overrides)
    p = cfg.proposal_train if training else cfg.proposal_test
    logits, deltas, anchors = make_inputs(cfg, seed=int(training))
    proposals, valid = run(Proposal(cfg, training), logits, deltas, anchors)
    assert proposals.shape == (BATCH, p.max_num, 4) and proposals.dtype == np.float32
    assert valid.shape == (BATCH, p.max_num) and valid.dtype == np.bool_
    for image in range(BATCH):
        want, want_valid, suppressed = np_proposals(p, cfg, [x[image] for x in logits],
                                                    [x[image] for x in deltas], anchors, IMAGE_SHAPES[image])
        assert suppressed > 0                                   # NMS had work to do
        np.testing.assert_array_equal(valid[image], want_valid)
        np.testing.assert_allclose(proposals[image], want, rtol=1e-5, atol=1e-3)
        height, width = IMAGE_SHAPES[image, 0] * IMAGE_SHAPES[image, 2], IMAGE_SHAPES[image, 1] * IMAGE_SHAPES[image, 3]
        boxes = proposals[image][valid[image]]
        assert boxes[:, 0::2].max() <= width + 1e-3 and boxes[:, 1::2].max() <= height + 1e-3
        assert boxes.min() >= 0.0
        sides = np.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
        assert sides.min() >= p.min_bbox_size - 1e-4
    if not training:
        assert not valid.all()                                 # padding rows exist and are flagged


class ProposalLoss(ms.nn.Cell):
    """A scalar that depends on the proposals, as a function of the level-0 logits and deltas."""

    def __init__(self, cfg):
        super().__init__()
        self.proposal = Proposal(cfg, training=True)

    def construct(self, logits0, deltas0, logits, deltas, anchors, image_shape):
        proposals, _ = self.proposal((logits0,) + logits[1:], (deltas0,) + deltas[1:], anchors, image_shape)
        return proposals.sum()


def test_gradients_are_stopped():
    cfg = load_config("tiny")
    logits, deltas, anchors = make_inputs(cfg, seed=2)
    grad_fn = ms.grad(ProposalLoss(cfg), grad_position=(0, 1))
    grads = grad_fn(ms.Tensor(logits[0]), ms.Tensor(deltas[0]), tuple(ms.Tensor(x) for x in logits),
                    tuple(ms.Tensor(x) for x in deltas), tuple(ms.Tensor(x) for x in anchors),
                    ms.Tensor(IMAGE_SHAPES))
    assert [g.shape for g in grads] == [logits[0].shape, deltas[0].shape]
    assert not any(np.any(g.asnumpy()) for g in grads)
