"""Assigner, sampler and both stage wrappers against NumPy references (GRAPH_MODE, CPU, tiny config)."""
import contextlib

import mindspore as ms
import numpy as np
import pytest
from mindspore import nn

from src.config import load_config
from src.maskrcnn.anchor_generator import generate_anchors
from src.maskrcnn.bbox_assign_sample import (RPN_STREAM, RCNN_STREAM, BboxAssignSample, FixedCountSampler,
                                             MaxIoUAssigner, random_keys, rpn_num_pos)
from src.maskrcnn.bbox_assign_sample_stage2 import BboxAssignSampleForRcnn
from src.ops import backend
from references import np_iou

SEED = 1234


@pytest.fixture(scope="module")
def cfg():
    """The tiny preset with the recipe's anchor scale (8), which the hand-built GT layouts below are sized for."""
    return load_config("tiny", {"anchor.anchor_scales": [8.0]})


def t(x, dtype=None):
    return ms.Tensor(x, dtype) if dtype is not None else ms.Tensor(x)


# ---------------------------------------------------------------- NumPy references

def np_hash(x):
    x = np.asarray(x, np.uint32).copy()
    x ^= x >> np.uint32(16)
    x *= np.uint32(0x21F0AAAD)
    x ^= x >> np.uint32(15)
    x *= np.uint32(0x735A2D97)
    x ^= x >> np.uint32(15)
    return x


def np_keys(seed, image_index, stream, n):
    state = np_hash(np.uint32(seed & 0xFFFFFFFF))
    state = np_hash(state ^ np.uint32(stream))
    state = np_hash(state ^ np.uint32(image_index))
    bits = np_hash(np.arange(n, dtype=np.uint32) ^ state)
    return (bits >> np.uint32(8)).astype(np.float64) / 2.0 ** 24


def np_assign(gt, gt_valid, boxes, box_valid, pos_thr, neg_thr, min_pos):
    """mmdet-v1 loop. Returns per box: -1 ignored, 0 negative, k + 1 positive for GT k."""
    iou = np_iou(gt.astype(np.float32), boxes.astype(np.float32)).astype(np.float32)
    iou[~gt_valid] = 0.0
    result = np.full(len(boxes), -1)
    max_iou, argmax = iou.max(0), iou.argmax(0)
    result[box_valid & (max_iou >= 0) & (max_iou < neg_thr)] = 0
    result[box_valid & (max_iou >= pos_thr)] = argmax[box_valid & (max_iou >= pos_thr)] + 1
    for k in range(len(gt)):
        if not gt_valid[k]:
            continue
        best = np.where(box_valid, iou[k], -1).max()
        if best >= min_pos:
            result[box_valid & (iou[k] == best)] = k + 1
    return result


def np_sample(assignment, keys, num_pos, num_total):
    """Chosen positive and negative candidate indices, in the order of decreasing key."""
    def top(mask, k):
        idx = np.flatnonzero(mask)
        return idx[np.argsort(-keys[idx], kind="stable")][:k]
    pos = top(assignment > 0, num_pos)
    return pos, top(assignment == 0, num_total - len(pos))


def np_encode(boxes, targets, means, stds):
    pw, ph = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    gw, gh = targets[:, 2] - targets[:, 0], targets[:, 3] - targets[:, 1]
    d = np.stack([(targets[:, 0] + gw / 2 - boxes[:, 0] - pw / 2) / pw,
                  (targets[:, 1] + gh / 2 - boxes[:, 1] - ph / 2) / ph, np.log(gw / pw), np.log(gh / ph)], 1)
    return (d - np.array(means)) / np.array(stds)


def jitter(rng, boxes, amount):
    out = boxes + rng.uniform(-amount, amount, size=boxes.shape)
    out[:, 2:] = np.maximum(out[:, 2:], out[:, :2] + 2.0)
    return out.astype(np.float32)


def random_gts(rng, count, max_count, valid_hw=(120.0, 165.0)):
    """`count` valid GT boxes inside the valid region, then padding (one padded row is a real-looking box)."""
    xy = rng.uniform(0, [valid_hw[1] - 60, valid_hw[0] - 60], size=(count, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(20, 60, size=(count, 2))], 1)
    pad = np.zeros((max_count - count, 4))
    pad[0] = boxes[0] + 1.0                              # padded rows must be ignored even when they overlap
    valid = np.arange(max_count) < count
    return np.concatenate([boxes, pad]).astype(np.float32), valid


# ---------------------------------------------------------------- keys and sampler

class KeysNet(nn.Cell):
    def __init__(self, n):
        super().__init__()
        self.ids = t(np.arange(n, dtype=np.int64))

    def construct(self, seed, image_index):
        return random_keys(seed, image_index, RPN_STREAM, self.ids)


def test_random_keys_are_the_documented_hash():
    n = 1000
    net = KeysNet(n)
    for seed, image in ((0, 0), (SEED, 1), (-5, 3)):
        got = net(t(seed, ms.int32), t(image, ms.int32)).asnumpy()
        np.testing.assert_array_equal(got, np_keys(seed, image, RPN_STREAM, n).astype(np.float32))
    keys = net(t(SEED, ms.int32), t(0, ms.int32)).asnumpy()
    assert 0.0 <= keys.min() and keys.max() < 1.0 and abs(keys.mean() - 0.5) < 0.05
    assert len(np.unique(keys)) > 0.99 * n


class SamplerNet(nn.Cell):
    def __init__(self, n, num_pos, num_total):
        super().__init__()
        self.sampler = FixedCountSampler(n, num_pos, num_total, RCNN_STREAM)

    def construct(self, positive, negative, seed, image_index):
        return self.sampler(positive, negative, seed, image_index)


@pytest.mark.parametrize("num_positive", [3, 40])
def test_sampler_counts_and_choice_match_numpy(num_positive):
    n, num_pos, num_total = 200, 10, 32
    rng = np.random.default_rng(num_positive)
    assignment = np.full(n, -1)
    order = rng.permutation(n)
    assignment[order[:num_positive]] = 1
    assignment[order[num_positive:num_positive + 100]] = 0
    net = SamplerNet(n, num_pos, num_total)
    pos_index, pos_used, neg_index, neg_used = (x.asnumpy() for x in net(
        t(assignment > 0), t(assignment == 0), t(SEED, ms.int32), t(2, ms.int32)))
    want_pos, want_neg = np_sample(assignment, np_keys(SEED, 2, RCNN_STREAM, n), num_pos, num_total)
    assert pos_used.sum() == min(num_positive, num_pos) and neg_used.sum() == num_total - pos_used.sum()
    np.testing.assert_array_equal(pos_index[pos_used], want_pos)
    np.testing.assert_array_equal(neg_index[neg_used], want_neg)
    assert np.all(neg_used[:neg_used.sum()])                 # used negative slots come first


def test_fixed_sample_replaces_the_draw_per_image_and_is_checked():
    net = SamplerNet(50, 4, 8)
    net.sampler.fix_sample([[7, 3], []], [[0, 1, 2], [9, 8, 6, 5, 4, 49]])
    everything = t(np.ones(50, bool))
    for image, (pos, neg) in enumerate((([7, 3], [0, 1, 2]), ([], [9, 8, 6, 5, 4, 49]))):
        pos_index, pos_used, neg_index, neg_used = (x.asnumpy() for x in net(
            everything, everything, t(SEED, ms.int32), image))
        assert list(pos_index[pos_used]) == pos and list(neg_index[neg_used]) == neg
    with pytest.raises(ValueError, match="fixed positives must be at most 4 distinct indices in \\[0, 50\\)"):
        net.sampler.fix_sample([[1, 1]], [[]])
    with pytest.raises(ValueError, match="image 0: 4 positives \\+ 5 negatives exceed the 8 samples"):
        net.sampler.fix_sample([[0, 1, 2, 3]], [[4, 5, 6, 7, 8]])


def test_sampler_rejects_impossible_sizes():
    with pytest.raises(ValueError, match="num_total"):
        FixedCountSampler(10, 4, 16, RCNN_STREAM)


# ---------------------------------------------------------------- assigner

IMPLEMENTATIONS = ["cpu_kernel", "mindspore_ops"]     # the C++ assigner and the (M, N) IoU-matrix version


class AssignerNet(nn.Cell):
    def __init__(self, num_gts, implementation, pos_thr=0.7, neg_thr=0.3, min_pos=0.3):
        super().__init__()
        with backend.use_mindspore_kernels() if implementation == "mindspore_ops" else contextlib.nullcontext():
            self.assigner = MaxIoUAssigner(pos_thr, neg_thr, min_pos, num_gts)
        assert (self.assigner.kernel is not None) == (implementation == "cpu_kernel")

    def construct(self, gt, gt_valid, boxes, box_valid):
        return self.assigner(gt, gt_valid, boxes, box_valid)


def run_assigner(net, gt, gt_valid, boxes, box_valid):
    assigned, positive, negative = (x.asnumpy() for x in net(t(gt), t(gt_valid), t(boxes), t(box_valid)))
    result = np.where(positive, assigned + 1, np.where(negative, 0, -1))
    assert not np.any(positive & negative)
    return result


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_assigner_thresholds_by_hand(implementation):
    gt = np.array([[0, 0, 10, 10], [50, 50, 60, 60], [100, 100, 110, 110], [200, 200, 210, 210]], np.float32)
    gt_valid = np.array([True, True, False, True])
    boxes = np.array([[0, 0, 10, 10],        # IoU 1.0 with GT 0         -> positive for GT 0
                      [0, 0, 10, 8],         # IoU 0.8                   -> positive for GT 0
                      [0, 0, 10, 5],         # IoU 0.5: between thrs     -> ignored
                      [0, 0, 10, 2],         # IoU 0.2 < neg_iou_thr     -> negative
                      [50, 50, 60, 54],      # GT 1's best, IoU 0.4 >= min_pos_iou -> positive for GT 1
                      [50, 50, 60, 53],      # IoU 0.3: not < neg_iou_thr -> ignored
                      [100, 100, 110, 110],  # matches only the padded GT 2 -> negative
                      [0, 0, 10, 10],        # invalid candidate           -> ignored
                      [200, 200, 210, 202]],  # GT 3's best is 0.2 < min_pos_iou -> negative, GT 3 unmatched
                     np.float32)
    box_valid = np.array([True] * 7 + [False, True])
    got = run_assigner(AssignerNet(len(gt), implementation), gt, gt_valid, boxes, box_valid)
    np.testing.assert_array_equal(got, [1, 1, -1, 0, 2, -1, 0, -1, 0])


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_assigner_matches_mmdet_loop_on_random_boxes(implementation):
    rng = np.random.default_rng(5)
    gt, gt_valid = random_gts(rng, 6, 8)
    boxes = np.concatenate([jitter(rng, np.repeat(gt[:6], 6, 0), 8.0),
                            jitter(rng, np.tile(gt[:1], (4, 1)), 3.0), jitter(rng, gt[6:7], 1.0),
                            jitter(rng, np.tile([[80, 60, 100, 80]], (20, 1)), 60.0)])
    box_valid = rng.uniform(size=len(boxes)) > 0.1
    got = run_assigner(AssignerNet(len(gt), implementation), gt, gt_valid, boxes, box_valid)
    want = np_assign(gt, gt_valid, boxes, box_valid, 0.7, 0.3, 0.3)
    assert {-1, 0}.issubset(set(want)) and (want > 0).sum() > 6
    np.testing.assert_array_equal(got, want)
    assert not np.any(got == 7)                          # the padded-but-overlapping GT row gets nothing


# ---------------------------------------------------------------- stage 1

class Stage1Net(nn.Cell):
    def __init__(self, cfg):
        super().__init__()
        self.assign_sample = BboxAssignSample(cfg)

    def construct(self, gt, gt_valid, anchors, anchor_valid, seed, image_index):
        return self.assign_sample(gt, gt_valid, anchors, anchor_valid, seed, image_index)


class Stage1Batch(nn.Cell):
    """The way the model calls it: a Python loop over images, the image index a Python int."""

    def __init__(self, cfg, batch_size):
        super().__init__()
        self.assign_sample = BboxAssignSample(cfg)
        self.batch_size = batch_size

    def construct(self, gt, gt_valid, anchors, anchor_valid, seed):
        weights = ()
        for i in range(self.batch_size):
            weights += (self.assign_sample(gt[i], gt_valid[i], anchors, anchor_valid, seed, i)[3],)
        return weights


@pytest.fixture(scope="module")
def stage1(cfg):
    anchors = np.concatenate(generate_anchors(cfg))
    valid_h, valid_w = 120.0, 165.0
    anchor_valid = ((anchors[:, 0] >= 0) & (anchors[:, 1] >= 0) & (anchors[:, 2] <= valid_w)
                    & (anchors[:, 3] <= valid_h))
    # Image 0: seven 34 px squares on stride-4 cell centres, ~5 positive anchors each (more than the quota).
    centres = np.array([[22, 22], [62, 22], [102, 22], [142, 22], [22, 82], [62, 82], [102, 82]], np.float32)
    many_gt = np.zeros((cfg.data.max_instance_count, 4), np.float32)
    many_gt[:7] = np.concatenate([centres - 17, centres + 17], 1)
    many_gt[7] = many_gt[0] + 1.0                        # padded row overlapping a real GT
    many_valid = np.arange(cfg.data.max_instance_count) < 7
    few_gt, few_valid = random_gts(np.random.default_rng(11), 2, cfg.data.max_instance_count)
    return dict(net=Stage1Net(cfg), anchors=anchors, anchor_valid=anchor_valid,
                images=[(many_gt, many_valid), (few_gt, few_valid)])


def run_stage1(stage1, image, seed, image_index):
    gt, gt_valid = stage1["images"][image]
    out = stage1["net"](t(gt), t(gt_valid), t(stage1["anchors"]), t(stage1["anchor_valid"]),
                        t(seed, ms.int32), t(image_index, ms.int32))
    return [x.asnumpy() for x in out]


@pytest.mark.parametrize("image", [0, 1])
def test_stage1_matches_numpy_pipeline(cfg, stage1, image):
    gt, gt_valid = stage1["images"][image]
    anchors, anchor_valid = stage1["anchors"], stage1["anchor_valid"]
    bbox_targets, bbox_weights, labels, label_weights = run_stage1(stage1, image, SEED, image)
    r = cfg.rpn
    assignment = np_assign(gt, gt_valid, anchors, anchor_valid, r.pos_iou_thr, r.neg_iou_thr, r.min_pos_iou)
    keys = np_keys(SEED, image, RPN_STREAM, len(anchors))
    want_pos, want_neg = np_sample(assignment, keys, rpn_num_pos(cfg), r.num_expected_total)

    num_positive = (assignment > 0).sum()
    assert (num_positive > rpn_num_pos(cfg)) if image == 0 else (0 < num_positive < rpn_num_pos(cfg))
    np.testing.assert_array_equal(np.flatnonzero(bbox_weights), np.sort(want_pos))
    np.testing.assert_array_equal(np.flatnonzero(label_weights), np.sort(np.concatenate([want_pos, want_neg])))
    assert label_weights.sum() == r.num_expected_total
    assert bbox_weights.sum() == min(num_positive, rpn_num_pos(cfg))
    np.testing.assert_array_equal(labels, bbox_weights.astype(np.int32))
    assert not np.any(label_weights[~anchor_valid])
    want_targets = np.zeros_like(bbox_targets)
    want_targets[want_pos] = np_encode(anchors[want_pos], gt[assignment[want_pos] - 1],
                                       r.rpn_target_means, r.rpn_target_stds)
    np.testing.assert_allclose(bbox_targets, want_targets, atol=1e-4)
    assert np.all(np.isfinite(bbox_targets))


def test_stage1_seed_determinism(stage1):
    first = run_stage1(stage1, 0, SEED, 0)
    again = run_stage1(stage1, 0, SEED, 0)
    other_seed = run_stage1(stage1, 0, SEED + 1, 0)
    other_image = run_stage1(stage1, 0, SEED, 1)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(first[3], other_seed[3])
    assert not np.array_equal(first[3], other_image[3])


def test_stage1_python_int_image_index_in_a_batch_loop(cfg, stage1):
    batch = Stage1Batch(cfg, 2)
    gt = np.stack([stage1["images"][0][0]] * 2)
    gt_valid = np.stack([stage1["images"][0][1]] * 2)
    got = batch(t(gt), t(gt_valid), t(stage1["anchors"]), t(stage1["anchor_valid"]), t(SEED, ms.int32))
    for i in range(2):
        np.testing.assert_array_equal(got[i].asnumpy(), run_stage1(stage1, 0, SEED, i)[3])


# ---------------------------------------------------------------- stage 2

class Stage2Net(nn.Cell):
    def __init__(self, cfg):
        super().__init__()
        self.assign_sample = BboxAssignSampleForRcnn(cfg)

    def construct(self, gt, labels, gt_valid, proposals, proposal_valid, seed, image_index):
        return self.assign_sample(gt, labels, gt_valid, proposals, proposal_valid, seed, image_index)


@pytest.fixture(scope="module")
def stage2_net(cfg):
    return Stage2Net(cfg)


def stage2_inputs(cfg, rng, num_gts, num_near):
    """GTs, labels and proposals: `num_near` jittered copies of GTs, the rest random, 8 invalid rows."""
    m, p = cfg.data.max_instance_count, cfg.proposal_train.max_num
    gt, gt_valid = random_gts(rng, num_gts, m)
    labels = np.where(gt_valid, rng.integers(1, cfg.num_classes, size=m), 0).astype(np.int32)
    near = jitter(rng, gt[rng.integers(0, num_gts, size=num_near)], 4.0)
    far = jitter(rng, np.concatenate([rng.uniform(0, 120, (p - num_near, 2))] * 2, 1), 30.0)
    proposals = np.concatenate([near, far]).astype(np.float32)
    proposal_valid = np.ones(p, bool)
    proposal_valid[rng.choice(p, 8, replace=False)] = False
    return gt, labels, gt_valid, proposals, proposal_valid


@pytest.mark.parametrize("num_near", [0, 30])
def test_stage2_matches_numpy_pipeline(cfg, stage2_net, num_near):
    rng = np.random.default_rng(num_near)
    gt, labels, gt_valid, proposals, proposal_valid = stage2_inputs(cfg, rng, 4, num_near)
    out = stage2_net(t(gt), t(labels), t(gt_valid), t(proposals), t(proposal_valid), t(SEED, ms.int32),
                     t(1, ms.int32))
    rois, row_labels, label_weights, bbox_targets, bbox_weights, pos_gt_index, pos_valid = (x.asnumpy() for x in out)
    c, num_pos_slots, num_rows = cfg.rcnn, cfg.num_pos_stage2, cfg.rcnn.num_expected_total_stage2
    assert rois.shape == (cfg.roi_sample_num, 4) == (num_rows, 4) and pos_gt_index.shape == (num_pos_slots,)

    candidates = np.concatenate([proposals, gt])
    candidate_valid = np.concatenate([proposal_valid, gt_valid])
    assignment = np_assign(gt, gt_valid, candidates, candidate_valid, c.pos_iou_thr_stage2,
                           c.neg_iou_thr_stage2, c.min_pos_iou_stage2)
    keys = np_keys(SEED, 1, RCNN_STREAM, len(candidates))
    want_pos, want_neg = np_sample(assignment, keys, num_pos_slots, num_rows)
    n_pos, n_neg = len(want_pos), len(want_neg)
    assert (n_pos == num_pos_slots) if num_near else (n_pos < num_pos_slots)
    assert n_pos + n_neg == num_rows                        # enough negatives here: every row holds a sample

    np.testing.assert_array_equal(pos_valid, np.arange(num_pos_slots) < n_pos)
    np.testing.assert_array_equal(rois, candidates[np.concatenate([want_pos, want_neg])])
    assert np.all(rois[:, 2:] > rois[:, :2])
    np.testing.assert_array_equal(label_weights, np.ones(num_rows, np.float32))
    np.testing.assert_array_equal(pos_gt_index[:n_pos], assignment[want_pos] - 1)
    assert not np.any(pos_gt_index[n_pos:])
    np.testing.assert_array_equal(row_labels[:n_pos], labels[assignment[want_pos] - 1])
    assert not np.any(row_labels[n_pos:])
    np.testing.assert_array_equal(bbox_weights, np.arange(num_rows) < n_pos)
    want_targets = np.zeros_like(bbox_targets)
    want_targets[:n_pos] = np_encode(candidates[want_pos], gt[assignment[want_pos] - 1],
                                     c.rcnn_target_means, c.rcnn_target_stds)
    np.testing.assert_allclose(bbox_targets, want_targets, atol=1e-4)

    if not num_near:                                        # every positive was sampled: GTs are among them
        for k in np.flatnonzero(gt_valid):
            row = np.flatnonzero(np.all(rois[:n_pos] == gt[k], axis=1) & (pos_gt_index[:n_pos] == k))
            assert len(row) == 1 and row_labels[row[0]] == labels[k]
    assert set(pos_gt_index[pos_valid]) <= set(np.flatnonzero(gt_valid))


def test_stage2_rows_left_empty_when_candidates_run_out_hold_the_whole_input(cfg, stage2_net):
    rng = np.random.default_rng(5)
    gt, labels, gt_valid, proposals, _ = stage2_inputs(cfg, rng, 2, 0)
    proposal_valid = np.zeros(len(proposals), bool)
    proposal_valid[:3] = True                               # 3 proposals + 2 GTs: fewer candidates than rows
    out = stage2_net(t(gt), t(labels), t(gt_valid), t(proposals), t(proposal_valid), t(SEED, ms.int32),
                     t(2, ms.int32))
    rois, row_labels, label_weights, _, bbox_weights, _, pos_valid = (x.asnumpy() for x in out)
    candidates = np.concatenate([proposals, gt])
    assignment = np_assign(gt, gt_valid, candidates, np.concatenate([proposal_valid, gt_valid]),
                           cfg.rcnn.pos_iou_thr_stage2, cfg.rcnn.neg_iou_thr_stage2, cfg.rcnn.min_pos_iou_stage2)
    keys = np_keys(SEED, 2, RCNN_STREAM, len(candidates))
    want_pos, want_neg = np_sample(assignment, keys, cfg.num_pos_stage2, cfg.rcnn.num_expected_total_stage2)
    used = len(want_pos) + len(want_neg)
    assert 2 <= len(want_pos) and used < len(rois)
    np.testing.assert_array_equal(rois[:used], candidates[np.concatenate([want_pos, want_neg])])
    whole_input = [0, 0, cfg.data.img_width, cfg.data.img_height]
    np.testing.assert_array_equal(rois[used:], np.tile(whole_input, (len(rois) - used, 1)))
    np.testing.assert_array_equal(label_weights, np.arange(len(rois)) < used)
    np.testing.assert_array_equal(bbox_weights, np.arange(len(rois)) < len(want_pos))
    assert pos_valid.sum() == len(want_pos) and not row_labels[len(want_pos):].any()


def test_stage2_without_gts_samples_only_negatives(cfg, stage2_net):
    rng = np.random.default_rng(3)
    gt, labels, _, proposals, proposal_valid = stage2_inputs(cfg, rng, 1, 0)
    gt_valid = np.zeros(len(gt), bool)
    out = stage2_net(t(gt), t(labels), t(gt_valid), t(proposals), t(proposal_valid), t(SEED, ms.int32),
                     t(0, ms.int32))
    rois, row_labels, label_weights, _, bbox_weights, _, pos_valid = (x.asnumpy() for x in out)
    assert not pos_valid.any() and not bbox_weights.any() and not row_labels.any()
    assert label_weights.sum() == cfg.rcnn.num_expected_total_stage2
    assert np.all(rois[:, 2:] > rois[:, :2])


def test_assigner_kernel_equals_the_iou_matrix_version_with_ties_and_zero_min_pos_iou():
    """Bit-for-bit the same assignment: duplicate boxes (tied IoUs: first GT wins the max, last GT the claim),
    GTs that overlap nothing, and min_pos_iou 0, where a GT with no overlap claims every IoU-0 candidate."""
    rng = np.random.default_rng(11)
    gt, gt_valid = random_gts(rng, 5, 8)
    gt[3] = gt[1]                                                  # two identical GTs: tied IoUs
    gt[4] = [500, 500, 520, 520]                                   # overlaps no candidate
    boxes = np.concatenate([jitter(rng, np.repeat(gt[:3], 5, 0), 4.0), np.repeat(gt[1:2], 3, 0),
                            jitter(rng, np.tile([[80, 60, 100, 80]], (30, 1)), 60.0)]).astype(np.float32)
    box_valid = rng.uniform(size=len(boxes)) > 0.15
    for thresholds in [(0.7, 0.3, 0.3), (0.5, 0.5, 0.0)]:
        got = [run_assigner(AssignerNet(len(gt), implementation, *thresholds), gt, gt_valid, boxes, box_valid)
               for implementation in IMPLEMENTATIONS]
        np.testing.assert_array_equal(got[0], got[1])
        np.testing.assert_array_equal(got[0], np_assign(gt, gt_valid, boxes, box_valid, *thresholds))


def test_fixed_rcnn_sample_samples_the_given_rois(cfg):
    """The stage-2 hook replays a given RoI sample: its proposals replace the RPN's, its picks the draw, while the
    targets still come from our assigner (labels of the matched GTs, deltas to them)."""
    net = Stage2Net(cfg)
    gt = np.zeros((cfg.data.max_instance_count, 4), np.float32)
    gt[:2] = [[10, 10, 50, 40], [60, 20, 100, 90]]
    labels = np.zeros(cfg.data.max_instance_count, np.int32)
    labels[:2] = [3, 1]
    valid = np.arange(cfg.data.max_instance_count) < 2
    given = np.array([[12, 8, 50, 44], [60, 20, 100, 90], [0, 100, 20, 120]], np.float32)
    net.assign_sample.fix_sample([given], [[0, 1]], [[2]])
    noise = np.tile(np.array([[0, 0, 5, 5]], np.float32), (cfg.proposal_train.max_num, 1))
    rois, row_labels, label_weights, _, bbox_weights, pos_gt_index, pos_valid = (x.asnumpy() for x in net(
        t(gt), t(labels), t(valid), t(noise), t(np.ones(cfg.proposal_train.max_num, bool)), t(SEED, ms.int32), 0))
    used = label_weights > 0
    np.testing.assert_array_equal(rois[used], given)
    assert list(row_labels[used]) == [3, 1, 0] and list(bbox_weights[used]) == [1, 1, 0]
    assert list(pos_gt_index[pos_valid]) == [0, 1]
