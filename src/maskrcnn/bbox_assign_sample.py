"""Max-IoU assignment and fixed-count random sampling shared by both stages, and the stage-1 (RPN) wrapper.

`MaxIoUAssigner` (the op src/ops/max_iou_assign.py) and `FixedCountSampler` are the one core;
`BboxAssignSample` (anchors, here) and `BboxAssignSampleForRcnn` (proposals + GT boxes,
bbox_assign_sample_stage2.py) only adapt inputs/outputs.

Sampling randomness is a pure function of (seed, image index, stage stream, candidate index): an in-graph
integer hash gives every candidate a uniform key and the sampler keeps the top keys. There is no RNG
state, so a run resumed from a checkpoint (seed = the step counter) samples exactly as an uninterrupted one.
"""
import mindspore as ms
import numpy as np
from mindspore import nn, ops

from src.maskrcnn import box_ops
from src.ops.max_iou_assign import MaxIoUAssigner

UINT32_MASK = 0xFFFFFFFF
# Integer hash (Chris Wellons' "lowbias32" family): xor-shift / multiply rounds on 32-bit values. Both
# multipliers are < 2**31, so the products of 32-bit values fit in int64 with no overflow.
HASH_MULTIPLIERS = (0x21F0AAAD, 0x735A2D97)
HASH_SHIFTS = (16, 15, 15)
KEY_BITS = 24               # keys are the top 24 hash bits: exactly representable as float32 in [0, 1)
# Hash streams keep stage-1 and stage-2 draws independent for the same seed and image.
RPN_STREAM = 1
RCNN_STREAM = 2
NOT_A_CANDIDATE = -1.0      # key of candidates outside the pool being sampled (real keys are >= 0)


def hash_uint32(x):
    """Elementwise 32-bit hash of an int64 Tensor holding values in [0, 2**32)."""
    x = ops.bitwise_xor(x, ops.bitwise_right_shift(x, ms.Tensor(HASH_SHIFTS[0], ms.int64)))
    for multiplier, shift in zip(HASH_MULTIPLIERS, HASH_SHIFTS[1:]):
        x = ops.bitwise_and(x * multiplier, ms.Tensor(UINT32_MASK, ms.int64))
        x = ops.bitwise_xor(x, ops.bitwise_right_shift(x, ms.Tensor(shift, ms.int64)))
    return x


def _as_uint32(value):
    """int32 scalar Tensor or Python int -> int64 scalar Tensor of its low 32 bits."""
    if isinstance(value, int):
        value = ms.Tensor(value, ms.int64)
    return ops.bitwise_and(ops.cast(value, ms.int64), ms.Tensor(UINT32_MASK, ms.int64))


def random_keys(seed, image_index, stream, candidate_ids):
    """Uniform float32 keys in [0, 1), one per candidate id (int64 (N,)), fixed by (seed, image, stream)."""
    state = hash_uint32(_as_uint32(seed))
    state = hash_uint32(ops.bitwise_xor(state, ms.Tensor(stream, ms.int64)))
    state = hash_uint32(ops.bitwise_xor(state, _as_uint32(image_index)))
    bits = hash_uint32(ops.bitwise_xor(candidate_ids, state))                       # (N,)
    top_bits = ops.bitwise_right_shift(bits, ms.Tensor(32 - KEY_BITS, ms.int64))
    return ops.cast(top_bits, ms.float32) * (1.0 / (1 << KEY_BITS))


class FixedCountSampler(nn.Cell):
    """Random fixed-count sampling with static shapes, for one image.

    Picks up to `num_pos` positives, then `num_total - picked positives` negatives, each uniformly at random
    (the candidates with the largest `random_keys`). Returns slot tensors: the chosen candidate indices plus
    a mask of which slots hold a real sample (a slot is empty when its pool ran out).
    """

    def __init__(self, num_candidates: int, num_pos: int, num_total: int, stream: int):
        super().__init__()
        if not 0 <= num_pos <= num_total <= num_candidates:
            raise ValueError(f"sampler needs 0 <= num_pos ({num_pos}) <= num_total ({num_total}) <= "
                             f"number of candidates ({num_candidates}); check the sampling sizes in the config")
        self.num_pos = num_pos
        self.num_total = num_total
        self.stream = stream
        self.num_candidates = num_candidates
        self.candidate_ids = ms.Tensor(np.arange(num_candidates, dtype=np.int64))
        self.negative_ranks = ms.Tensor(np.arange(num_total, dtype=np.int32))
        self.fixed = None

    def fix_sample(self, positives, negatives):
        """Test hook: from now on return these picks instead of drawing (set before the graph compiles).

        positives, negatives: one int array of candidate indices per image of the batch (at most num_pos
        positives and num_total picks in all), e.g. the picks recorded from another implementation's sampler.
        The picks are taken as given: a picked positive is a positive whatever the assigner says of it.
        """
        pos_slots = [_as_slots(p, self.num_pos, self.num_candidates, "positives") for p in positives]
        neg_slots = [_as_slots(n, self.num_total, self.num_candidates, "negatives") for n in negatives]
        for image, (p, n) in enumerate(zip(positives, negatives)):
            if len(p) + len(n) > self.num_total:
                raise ValueError(f"image {image}: {len(p)} positives + {len(n)} negatives exceed the "
                                 f"{self.num_total} samples per image")
        self.fixed = tuple(ms.Tensor(np.stack(field)) for field in (
            [index for index, _ in pos_slots], [used for _, used in pos_slots],
            [index for index, _ in neg_slots], [used for _, used in neg_slots]))

    def construct(self, positive, negative, seed, image_index):
        """positive, negative (N,) bool; seed int32 scalar Tensor; image_index int or int32 scalar Tensor ->
        (pos_index (num_pos,) int32, pos_used (num_pos,) bool,
         neg_index (num_total,) int32, neg_used (num_total,) bool); at most num_total slots are used."""
        if self.fixed is not None:
            return (self.fixed[0][image_index], self.fixed[1][image_index], self.fixed[2][image_index],
                    self.fixed[3][image_index])
        keys = random_keys(seed, image_index, self.stream, self.candidate_ids)       # (N,)
        absent = ops.full_like(keys, NOT_A_CANDIDATE)
        pos_keys, pos_index = ops.topk(ops.where(positive, keys, absent), self.num_pos)
        pos_used = pos_keys >= 0.0
        num_neg = self.num_total - ops.reduce_sum(ops.cast(pos_used, ms.int32))
        neg_keys, neg_index = ops.topk(ops.where(negative, keys, absent), self.num_total)
        neg_used = ops.logical_and(neg_keys >= 0.0, self.negative_ranks < num_neg)
        return pos_index, pos_used, neg_index, neg_used


def _as_slots(picks, num_slots, num_candidates, what):
    """Candidate indices -> (index (num_slots,) int32, used (num_slots,) bool), the picks in the first slots."""
    picks = np.asarray(picks, np.int64).reshape(-1)
    if len(picks) > num_slots or len(np.unique(picks)) != len(picks) or \
            (len(picks) and not 0 <= picks.min() <= picks.max() < num_candidates):
        raise ValueError(f"fixed {what} must be at most {num_slots} distinct indices in [0, {num_candidates}), "
                         f"got {len(picks)} in [{picks.min(initial=0)}, {picks.max(initial=0)}]")
    index = np.zeros(num_slots, np.int32)
    index[:len(picks)] = picks
    return index, np.arange(num_slots) < len(picks)


def rpn_num_pos(cfg) -> int:
    """Positive quota of the stage-1 sampler."""
    return int(round(cfg.rpn.num_expected_total * cfg.rpn.pos_fraction))


class BboxAssignSample(nn.Cell):
    """Stage-1 (RPN) targets for all anchors of one image, with weights on the sampled anchors.

    construct(gt_bboxes (M, 4), gt_valids (M,) bool, anchors (N, 4), anchor_valid (N,) bool,
              seed int32 scalar, image_index int or int32 scalar) ->
      bbox_targets (N, 4) float32: deltas of the assigned GT, rpn means/stds, zero off sampled positives;
      bbox_weights (N,) float32: 1 on sampled positives;
      labels (N,) int32: 1 on sampled positives, else 0;
      label_weights (N,) float32: 1 on sampled anchors (positives and negatives).
    N = cfg.num_bboxes, M = cfg.data.max_instance_count; cfg.rpn.num_expected_total anchors are sampled
    when enough negatives exist, at most round(num_expected_total * pos_fraction) of them positive.
    """

    def __init__(self, cfg):
        super().__init__()
        r = cfg.rpn
        self.num_anchors = cfg.num_bboxes
        self.assigner = MaxIoUAssigner(r.pos_iou_thr, r.neg_iou_thr, r.min_pos_iou, cfg.data.max_instance_count)
        self.sampler = FixedCountSampler(self.num_anchors, rpn_num_pos(cfg), r.num_expected_total, RPN_STREAM)
        self.means = box_ops.as_tensor(r.rpn_target_means)
        self.stds = box_ops.as_tensor(r.rpn_target_stds)

    def _slots_to_mask(self, index, used):
        """Sampled slots -> (N,) float32 mask over anchors (slot indices are distinct)."""
        return ops.scatter_nd(index[:, None], ops.cast(used, ms.float32), (self.num_anchors,))

    def construct(self, gt_bboxes, gt_valids, anchors, anchor_valid, seed, image_index):
        assigned_gt, positive, negative = self.assigner(gt_bboxes, gt_valids, anchors, anchor_valid)
        pos_index, pos_used, neg_index, neg_used = self.sampler(positive, negative, seed, image_index)
        bbox_weights = self._slots_to_mask(pos_index, pos_used)                       # (N,)
        label_weights = bbox_weights + self._slots_to_mask(neg_index, neg_used)
        matched_gt = ops.gather(gt_bboxes, assigned_gt, 0)                            # (N, 4)
        deltas = box_ops.encode(anchors, matched_gt, self.means, self.stds)
        bbox_targets = ops.where(bbox_weights[:, None] > 0, deltas, ops.zeros_like(deltas))
        labels = ops.cast(bbox_weights, ms.int32)
        return bbox_targets, bbox_weights, labels, label_weights
