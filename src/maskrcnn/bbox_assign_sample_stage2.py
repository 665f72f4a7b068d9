"""Stage-2 (R-CNN) RoI sampling: the shared assigner/sampler over proposals plus the image's GT boxes."""
import numpy as np

import mindspore as ms
from mindspore import nn, ops

from src.maskrcnn import box_ops
from src.maskrcnn.bbox_assign_sample import RCNN_STREAM, FixedCountSampler, MaxIoUAssigner


class BboxAssignSampleForRcnn(nn.Cell):
    """Sampled RoIs and their classification / regression targets for one image.

    Candidates are the P = cfg.proposal_train.max_num proposals followed by the M GT boxes (GTs are always
    added as proposals, so every valid GT is a positive candidate of itself).
    construct(gt_bboxes (M, 4), gt_labels (M,) int32, gt_valids (M,) bool, proposals (P, 4),
              proposal_valid (P,) bool, seed int32 scalar, image_index int or int32 scalar) ->
      rois (S, 4): S = num_expected_total_stage2 sample rows; the first Pn = cfg.num_pos_stage2 rows are the
          positive slots, used by positives from the front, and the negatives fill every row after the last
          positive, so S rows hold all S samples without padding rows (when enough candidates exist);
          an empty row holds the whole-input box (0, 0, W, H), never a degenerate box;
      labels (S,) int32: GT class on positive rows, else 0;
      label_weights (S,) float32: 1 on real samples (positives + negatives up to S - positives);
      bbox_targets (S, 4) float32: rcnn means/stds deltas on positive rows, else 0;
      bbox_weights (S,) float32: 1 on positive rows;
      pos_gt_index (Pn,) int32: index of the matched GT (for mask targets), 0 on unused slots;
      pos_valid (Pn,) bool: the positive slot holds a positive (slots are used from the front).
    """

    def __init__(self, cfg):
        super().__init__()
        c = cfg.rcnn
        num_gts = cfg.data.max_instance_count
        num_candidates = cfg.proposal_train.max_num + num_gts
        self.num_rows = c.num_expected_total_stage2
        self.num_pos_slots = cfg.num_pos_stage2
        self.row_ids = ms.Tensor(np.arange(self.num_rows, dtype=np.int32))
        self.assigner = MaxIoUAssigner(c.pos_iou_thr_stage2, c.neg_iou_thr_stage2, c.min_pos_iou_stage2, num_gts)
        self.sampler = FixedCountSampler(num_candidates, cfg.num_pos_stage2, c.num_expected_total_stage2,
                                         RCNN_STREAM)
        self.means = box_ops.as_tensor(c.rcnn_target_means)
        self.stds = box_ops.as_tensor(c.rcnn_target_stds)
        self.empty_slot_box = box_ops.as_tensor([[0.0, 0.0, cfg.data.img_width, cfg.data.img_height]])   # (1, 4)
        self.num_proposals = cfg.proposal_train.max_num
        self.fixed_proposals = None

    def fix_sample(self, proposals, positives, negatives):
        """Test hook: from now on sample exactly these RoIs (set before the graph compiles).

        proposals: one (k, 4) array per image (k <= cfg.proposal_train.max_num) standing in for the RPN's
        proposals; positives, negatives: per image, indices into that image's candidates (the k proposals,
        then padding up to max_num, then the M GT boxes). Used to replay another implementation's RoI sample.
        """
        boxes = np.tile(self.empty_slot_box.asnumpy(), (len(proposals), self.num_proposals, 1))
        valid = np.zeros((len(proposals), self.num_proposals), bool)
        for image, rois in enumerate(proposals):
            rois = np.asarray(rois, np.float32).reshape(-1, 4)
            if len(rois) > self.num_proposals:
                raise ValueError(f"image {image}: {len(rois)} fixed proposals exceed proposal_train.max_num "
                                 f"({self.num_proposals})")
            boxes[image, :len(rois)], valid[image, :len(rois)] = rois, True
        self.sampler.fix_sample(positives, negatives)
        self.fixed_proposals = (ms.Tensor(boxes), ms.Tensor(valid))

    def _slot_boxes(self, candidates, index, used):
        """Boxes of the chosen candidates, (K, 4); the whole-input box on unused slots."""
        boxes = ops.gather(candidates, index, 0)
        return ops.where(used[:, None], boxes, ops.broadcast_to(self.empty_slot_box, boxes.shape))

    def construct(self, gt_bboxes, gt_labels, gt_valids, proposals, proposal_valid, seed, image_index):
        if self.fixed_proposals is not None:
            proposals, proposal_valid = self.fixed_proposals[0][image_index], self.fixed_proposals[1][image_index]
        candidates = ops.concat((proposals, gt_bboxes), axis=0)                      # (P + M, 4)
        candidate_valid = ops.concat((proposal_valid, gt_valids), axis=0)
        assigned_gt, positive, negative = self.assigner(gt_bboxes, gt_valids, candidates, candidate_valid)
        pos_index, pos_valid, neg_index, neg_used = self.sampler(positive, negative, seed, image_index)

        pos_gt_index = ops.gather(assigned_gt, pos_index, 0)                          # (Pn,)
        pos_gt_index = ops.where(pos_valid, pos_gt_index, ops.zeros_like(pos_gt_index))
        pos_rois = self._slot_boxes(candidates, pos_index, pos_valid)                 # (Pn, 4)
        pos_deltas = box_ops.encode(pos_rois, ops.gather(gt_bboxes, pos_gt_index, 0), self.means, self.stds)
        pos_deltas = ops.where(pos_valid[:, None], pos_deltas, ops.zeros_like(pos_deltas))
        pos_labels = ops.gather(gt_labels, pos_gt_index, 0)
        pos_labels = ops.where(pos_valid, pos_labels, ops.zeros_like(pos_labels))

        # row r holds positive r while r < the positive count, else negative r - count (the sampler gives
        # the positives as a prefix and exactly S - count usable negatives)
        num_pos = ops.reduce_sum(ops.cast(pos_valid, ms.int32))
        neg_slot = ops.clip(self.row_ids - num_pos, 0, self.num_rows - 1)
        row_neg_index = ops.gather(neg_index, neg_slot, 0)
        row_neg_used = ops.logical_and(ops.gather(neg_used, neg_slot, 0), self.row_ids >= num_pos)
        row_pos = self._pad_rows(pos_valid)                                           # (S,) bool
        row_index = ops.where(row_pos, self._pad_rows(pos_index), row_neg_index)
        row_used = ops.logical_or(row_pos, row_neg_used)

        rois = self._slot_boxes(candidates, row_index, row_used)                     # (S, 4)
        bbox_weights = ops.cast(row_pos, ms.float32)
        return (rois, self._pad_rows(pos_labels), ops.cast(row_used, ms.float32), self._pad_rows(pos_deltas),
                bbox_weights, pos_gt_index, pos_valid)

    def _pad_rows(self, slots):
        """(Pn, ...) positive-slot values -> (S, ...), zeros after the positive slots."""
        padding = ops.zeros((self.num_rows - self.num_pos_slots,) + slots.shape[1:], slots.dtype)
        return ops.concat((slots, padding), axis=0)
