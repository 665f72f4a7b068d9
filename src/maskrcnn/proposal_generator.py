"""RPN proposals: top-k anchors per level, decoded, clipped, NMS'd, then the best over all levels."""
import mindspore as ms
from mindspore import nn, ops

from src.maskrcnn import box_ops

# Score given to boxes that are filtered out (too small, suppressed, padding); real scores are sigmoids >= 0.
DISCARDED = -1.0


def _stop_gradient_each(tensors):
    """stop_gradient on each tensor of a tuple: on the tuple itself, the ONNX exporter drops the tuple's items."""
    stopped = ()
    for tensor in tensors:
        stopped += (ops.stop_gradient(tensor),)
    return stopped


class Proposal(nn.Cell):
    """Fixed-size proposal sets for a batch, with gradients stopped.

    Uses cfg.proposal_train when `training`, else cfg.proposal_test. Per image and level: sigmoid scores,
    top k = min(nms_pre, anchors of the level), decode with the rpn means/stds, clip to the valid image
    region, drop boxes with a side < min_bbox_size, NMS (IoU > nms_thr suppresses), keep the nms_post best.
    Then the max_num best over all levels.

    construct(cls_scores: tuple over levels of (B, h*w*A) logits,
              bbox_deltas: tuple over levels of (B, h*w*A, 4),
              anchors: tuple over levels of (h*w*A, 4), image_shape (B, 4)) ->
      proposals (B, max_num, 4) float32, sorted by decreasing score;
      proposal_valid (B, max_num) bool. Invalid rows (fewer survivors than max_num) hold the image's
      whole valid region, a harmless box for RoIAlign.
    """

    def __init__(self, cfg, training: bool):
        super().__init__()
        p = cfg.proposal_train if training else cfg.proposal_test
        level_sizes = [h * w * cfg.num_anchors for h, w in cfg.feature_shapes]
        self.pre_nms_counts = [min(p.nms_pre, n) for n in level_sizes]
        self.post_nms_counts = [min(p.nms_post, k) for k in self.pre_nms_counts]
        self.max_num = p.max_num
        self.num_ranked = min(p.max_num, sum(self.post_nms_counts))
        self.num_padding = p.max_num - self.num_ranked
        self.min_bbox_size = p.min_bbox_size
        self.nms = ops.NMSWithMask(p.nms_thr)
        self.means = box_ops.as_tensor(cfg.rpn.rpn_target_means)
        self.stds = box_ops.as_tensor(cfg.rpn.rpn_target_stds)

    def _level_proposals(self, logits, deltas, anchors, height, width, level):
        """One image, one level: (N,), (N, 4), (N, 4) -> boxes (post_k, 4), scores (post_k,)."""
        scores, index = ops.topk(ops.sigmoid(logits), self.pre_nms_counts[level])         # (k,)
        boxes = box_ops.decode(ops.gather(anchors, index, 0), ops.gather(deltas, index, 0), self.means, self.stds)
        boxes = box_ops.clip_boxes(boxes, height, width)                                   # (k, 4)
        big_enough = ops.logical_and(boxes[:, 2] - boxes[:, 0] >= self.min_bbox_size,
                                     boxes[:, 3] - boxes[:, 1] >= self.min_bbox_size)
        scores = ops.where(big_enough, scores, ops.full_like(scores, DISCARDED))
        # Re-sort so filtered boxes come last: on Ascend NMSWithMask keeps the input order, ignoring scores.
        scores, order = ops.topk(scores, self.pre_nms_counts[level])
        boxes = ops.gather(boxes, order, 0)
        nms_boxes, _, keep = self.nms(ops.concat((boxes, scores[:, None]), axis=1))        # (k, 5), (k,)
        kept_scores = ops.where(ops.logical_and(keep, nms_boxes[:, 4] >= 0.0), nms_boxes[:, 4],
                                ops.full_like(scores, DISCARDED))
        top_scores, top_index = ops.topk(kept_scores, self.post_nms_counts[level])
        return ops.gather(nms_boxes[:, :4], top_index, 0), top_scores

    def _image_proposals(self, cls_scores, bbox_deltas, anchors, image_shape, image):
        """All levels of one image -> (max_num, 4), (max_num,)."""
        height, width = box_ops.valid_region(image_shape[image])
        level_boxes, level_scores = (), ()
        for level in range(len(self.pre_nms_counts)):
            boxes, scores = self._level_proposals(cls_scores[level][image], bbox_deltas[level][image],
                                                  anchors[level], height, width, level)
            level_boxes += (boxes,)
            level_scores += (scores,)
        scores, index = ops.topk(ops.concat(level_scores, axis=0), self.num_ranked)
        boxes = ops.gather(ops.concat(level_boxes, axis=0), index, 0)                      # (num_ranked, 4)
        valid = scores >= 0.0
        zero = ops.zeros_like(width)
        whole_image = ops.broadcast_to(ops.stack((zero, zero, width, height))[None, :], (self.max_num, 4))
        if self.num_padding > 0:
            boxes = ops.concat((boxes, whole_image[:self.num_padding]), axis=0)
            valid = ops.concat((valid, ops.zeros((self.num_padding,), ms.bool_)), axis=0)
        return ops.where(valid[:, None], boxes, whole_image), valid

    def construct(self, cls_scores, bbox_deltas, anchors, image_shape):
        cls_scores = _stop_gradient_each(cls_scores)
        bbox_deltas = _stop_gradient_each(bbox_deltas)
        proposals, valids = (), ()
        for image in range(image_shape.shape[0]):
            boxes, valid = self._image_proposals(cls_scores, bbox_deltas, anchors, image_shape, image)
            proposals += (boxes,)
            valids += (valid,)
        return ops.stop_gradient(ops.stack(proposals)), ops.stop_gradient(ops.stack(valids))
