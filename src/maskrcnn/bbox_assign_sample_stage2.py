"""Stage-2 (R-CNN) RoI sampling: the shared assigner/sampler over proposals plus the image's GT boxes."""
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
      rois (Pn + S, 4): Pn = cfg.num_pos_stage2 positive slots, then S = num_expected_total_stage2
          negative slots; empty slots hold the whole-input box (0, 0, W, H), never a degenerate box;
      labels (Pn + S,) int32: GT class on used positive rows, else 0;
      label_weights (Pn + S,) float32: 1 on real samples (positives used + negatives up to S - positives);
      bbox_targets (Pn + S, 4) float32: rcnn means/stds deltas on used positive rows, else 0;
      bbox_weights (Pn + S,) float32: 1 on used positive rows;
      pos_gt_index (Pn,) int32: index of the matched GT (for mask targets), 0 on unused slots;
      pos_valid (Pn,) bool: the positive slot is used.
    """

    def __init__(self, cfg):
        super().__init__()
        c = cfg.rcnn
        num_gts = cfg.data.max_instance_count
        num_candidates = cfg.proposal_train.max_num + num_gts
        self.num_neg_slots = c.num_expected_total_stage2
        self.assigner = MaxIoUAssigner(c.pos_iou_thr_stage2, c.neg_iou_thr_stage2, c.min_pos_iou_stage2, num_gts)
        self.sampler = FixedCountSampler(num_candidates, cfg.num_pos_stage2, c.num_expected_total_stage2,
                                         RCNN_STREAM)
        self.means = box_ops.as_tensor(c.rcnn_target_means)
        self.stds = box_ops.as_tensor(c.rcnn_target_stds)
        self.empty_slot_box = box_ops.as_tensor([[0.0, 0.0, cfg.data.img_width, cfg.data.img_height]])   # (1, 4)

    def _slot_boxes(self, candidates, index, used):
        """Boxes of the chosen candidates, (K, 4); the whole-input box on unused slots."""
        boxes = ops.gather(candidates, index, 0)
        return ops.where(used[:, None], boxes, ops.broadcast_to(self.empty_slot_box, boxes.shape))

    def construct(self, gt_bboxes, gt_labels, gt_valids, proposals, proposal_valid, seed, image_index):
        candidates = ops.concat((proposals, gt_bboxes), axis=0)                      # (P + M, 4)
        candidate_valid = ops.concat((proposal_valid, gt_valids), axis=0)
        assigned_gt, positive, negative = self.assigner(gt_bboxes, gt_valids, candidates, candidate_valid)
        pos_index, pos_valid, neg_index, neg_used = self.sampler(positive, negative, seed, image_index)

        pos_gt_index = ops.gather(assigned_gt, pos_index, 0)                          # (Pn,)
        pos_gt_index = ops.where(pos_valid, pos_gt_index, ops.zeros_like(pos_gt_index))
        pos_rois = self._slot_boxes(candidates, pos_index, pos_valid)                 # (Pn, 4)
        neg_rois = self._slot_boxes(candidates, neg_index, neg_used)                  # (S, 4)
        pos_deltas = box_ops.encode(pos_rois, ops.gather(gt_bboxes, pos_gt_index, 0), self.means, self.stds)
        pos_deltas = ops.where(pos_valid[:, None], pos_deltas, ops.zeros_like(pos_deltas))
        pos_labels = ops.gather(gt_labels, pos_gt_index, 0)
        pos_labels = ops.where(pos_valid, pos_labels, ops.zeros_like(pos_labels))
        pos_weights = ops.cast(pos_valid, ms.float32)

        rois = ops.concat((pos_rois, neg_rois), axis=0)                               # (Pn + S, 4)
        labels = ops.concat((pos_labels, ops.zeros((self.num_neg_slots,), ms.int32)), axis=0)
        label_weights = ops.concat((pos_weights, ops.cast(neg_used, ms.float32)), axis=0)
        bbox_targets = ops.concat((pos_deltas, ops.zeros((self.num_neg_slots, 4), ms.float32)), axis=0)
        bbox_weights = ops.concat((pos_weights, ops.zeros((self.num_neg_slots,), ms.float32)), axis=0)
        return rois, labels, label_weights, bbox_targets, bbox_weights, pos_gt_index, pos_valid
