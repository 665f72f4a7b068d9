"""The whole Mask R-CNN R50-FPN graph: training losses and fixed-size inference outputs.

Training (`set_train(True)`): construct(image, image_shape, box, label, valid_num, mask) -> the float32
scalars named by LOSS_NAMES. Inference (`set_train(False)`): construct(image, image_shape) -> (boxes, scores,
labels, valid, masks); see `MaskRcnnResnet50`. Shapes are static: everything is sized from the config and
the batch size of the input, so one compile serves every step.
"""
import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops

from src.maskrcnn import box_ops
from src.maskrcnn.anchor_generator import generate_anchors
from src.maskrcnn.bbox_assign_sample import BboxAssignSample
from src.maskrcnn.bbox_assign_sample_stage2 import BboxAssignSampleForRcnn
from src.maskrcnn.fpn_neck import FeatPyramidNeck
from src.maskrcnn.proposal_generator import Proposal
from src.maskrcnn.rcnn_cls import RcnnCls, select_class
from src.maskrcnn.rcnn_mask import RcnnMask
from src.maskrcnn.resnet50 import ResNet50
from src.maskrcnn.roi_align import MultiLevelRoIAlign
from src.maskrcnn.rpn import RPN
from src.ops import layout

LOSS_NAMES = ("rpn_loss", "rcnn_loss", "rpn_cls_loss", "rpn_reg_loss", "rcnn_cls_loss", "rcnn_reg_loss",
              "rcnn_mask_loss", "total_loss")
DISCARDED = -1.0          # score of (box, class) candidates that cannot be detections
# The batch's positive slots, used ones first, go through the mask branch in chunks of this many rows, and
# a chunk holding no used slot is skipped: few slots are used early in training or on images with few
# objects, and the mask head is the most expensive part of the step when all of them run. Each chunk is one
# more graph branch to compile (about 4 s on this CPU).
MASK_CHUNK_ROWS = 32


def _stack_fields(per_image):
    """Tuple over images of equal-length tuples -> tuple over fields of Tensors stacked on axis 0."""
    fields = ()
    for field in range(len(per_image[0])):
        column = ()
        for outputs in per_image:
            column += (outputs[field],)
        fields += (ops.stack(column),)
    return fields


def _with_batch_index(boxes):
    """(B, K, 4) boxes -> (B * K, 5) RoIs (batch index, x1, y1, x2, y2)."""
    batch, rows = boxes.shape[0], boxes.shape[1]
    index = ops.broadcast_to(ops.arange(batch, dtype=ms.float32)[:, None, None], (batch, rows, 1))
    return ops.concat((index, boxes), axis=2).reshape(batch * rows, 5)


class DetectionSelector(nn.Cell):
    """Per-class NMS over the box head's outputs for one image, with static shapes.

    The `test_nms_pre` best (box, class) pairs above `test_score_thr` are ranked; boxes are shifted by a
    per-class offset so that one NMS never lets two classes suppress each other, which equals running NMS
    per class. The result equals exhaustive per-class NMS whenever `test_max_per_img` detections survive
    among the ranked pairs (NMS only ever removes lower-scoring boxes). Pairs whose clipped box is narrower or
    lower than `test_min_box_size` are not ranked (0: all kept).
    construct(scores (P, C) softmax, boxes (P, C, 4) clipped, proposal_valid (P,) bool) ->
      boxes (K, 4), scores (K,), labels (K,) int32 in 1..C-1, valid (K,) bool; K = test_max_per_img.
    """

    def __init__(self, cfg):
        super().__init__()
        t = cfg.test
        num_pairs = cfg.proposal_test.max_num * (cfg.num_classes - 1)
        self.num_ranked = min(t.test_nms_pre, num_pairs)
        self.num_kept = t.test_max_per_img
        self.score_thr = t.test_score_thr
        self.min_box_size = t.test_min_box_size
        self.class_offset = float(max(cfg.data.img_height, cfg.data.img_width) + 1)
        self.nms = ops.NMSWithMask(t.test_iou_thr)

    def construct(self, scores, boxes, proposal_valid):
        num_classes = scores.shape[1]
        fg_scores = scores[:, 1:]                                                     # (P, C-1)
        usable = ops.logical_and(fg_scores > self.score_thr, proposal_valid[:, None])
        if self.min_box_size > 0:                                                     # torchvision drops tiny boxes
            fg_boxes = boxes[:, 1:]                                                   # (P, C-1, 4)
            large = ops.logical_and(fg_boxes[..., 2] - fg_boxes[..., 0] >= self.min_box_size,
                                    fg_boxes[..., 3] - fg_boxes[..., 1] >= self.min_box_size)
            usable = ops.logical_and(usable, large)
        fg_scores = ops.where(usable, fg_scores, ops.full_like(fg_scores, DISCARDED)).reshape(-1)
        top_scores, pair_index = ops.topk(fg_scores, self.num_ranked)                 # sorted, (k,)
        box_index = pair_index // (num_classes - 1)
        # pair_index mod (C - 1), spelt with operators MindSpore's ONNX exporter converts (it has no Remainder)
        labels = pair_index - box_index * (num_classes - 1) + 1                       # (k,) in 1..C-1
        flat_boxes = boxes.reshape(-1, 4)
        top_boxes = ops.gather(flat_boxes, box_index * num_classes + labels, 0)       # (k, 4)
        offsets = ops.cast(labels, ms.float32)[:, None] * self.class_offset
        _, order, keep = self.nms(ops.concat((top_boxes + offsets, top_scores[:, None]), axis=1))
        kept_scores = ops.where(ops.logical_and(keep, ops.gather(top_scores, order, 0) >= 0.0),
                                ops.gather(top_scores, order, 0), ops.full_like(top_scores, DISCARDED))
        final_scores, final_rank = ops.topk(kept_scores, self.num_kept)               # (K,)
        final_index = ops.gather(order, final_rank, 0)
        valid = final_scores >= 0.0
        return (ops.gather(top_boxes, final_index, 0), ops.maximum(final_scores, 0.0),
                ops.gather(labels, final_index, 0), valid)


class MaskRcnnResnet50(nn.Cell):
    """Mask R-CNN with a ResNet50-FPN backbone.

    Inputs follow docs/architecture.md: image (B, 3, H, W) float32, image_shape (B, 4) = (ori_h, ori_w,
    scale_h, scale_w), box (B, M, 4), label (B, M) int32, valid_num (B, M) bool, mask (B, M, H, W) uint8.
    Inference returns, with K = cfg.test.test_max_per_img:
      boxes (B, K, 4) float32 in input pixels, scores (B, K), labels (B, K) int32 in 1..C-1,
      valid (B, K) bool, masks (B, K, 28, 28) float32 probabilities of each detection's class.
    `sample_seed` counts training steps; the samplers draw from it, so a resumed run (which restores it
    from the checkpoint) samples exactly like an uninterrupted one.
    """

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.backbone = ResNet50(cfg)
        self.neck = FeatPyramidNeck(cfg)
        layout.hand_over(self.backbone, self.neck.lateral_convs)      # the only readers of C2..C5
        self.rpn = RPN(cfg)
        self.rcnn_cls = RcnnCls(cfg)
        self.rcnn_mask = RcnnMask(cfg)
        roi = cfg.roi
        self.box_roi_align = MultiLevelRoIAlign(cfg, roi.roi_out_size, roi.roi_align_featmap_strides,
                                                roi.roi_align_finest_scale, roi.roi_sample_ratio)
        self.mask_roi_align = MultiLevelRoIAlign(cfg, roi.mask_out_size, roi.roi_align_featmap_strides,
                                                 roi.roi_align_finest_scale, roi.roi_sample_ratio)
        level_anchors = generate_anchors(cfg)
        self.level_anchors = tuple(Tensor(a) for a in level_anchors)
        self.all_anchors = Tensor(np.concatenate(level_anchors, axis=0))              # (N, 4)
        self.rpn_targets = BboxAssignSample(cfg)
        self.rcnn_targets = BboxAssignSampleForRcnn(cfg)
        self.train_proposals = Proposal(cfg, training=True)
        self.test_proposals = Proposal(cfg, training=False)
        self.detections = DetectionSelector(cfg)
        self.num_pos_stage2 = cfg.num_pos_stage2
        self.mask_chunk_rows = MASK_CHUNK_ROWS
        self.mask_head_skips = self.rcnn_mask.skips_inactive
        self.num_gts = cfg.data.max_instance_count
        self.rcnn_means = box_ops.as_tensor(cfg.rcnn.rcnn_target_means)
        self.rcnn_stds = box_ops.as_tensor(cfg.rcnn.rcnn_target_stds)
        self.anchors_inside_only = cfg.rpn.anchors_inside_only
        self.sample_seed = Parameter(Tensor(0, ms.int32), name="sample_seed", requires_grad=False)

    def _features(self, image):
        """FPN levels P2..P6, each (B, 256, h_l, w_l)."""
        return self.neck(self.backbone(image))

    def construct(self, image, image_shape, box=None, label=None, valid_num=None, mask=None):
        feats = self._features(image)
        cls_scores, bbox_deltas = self.rpn(feats)
        if self.training:
            return self._losses(feats, cls_scores, bbox_deltas, image_shape, box, label, valid_num, mask)
        return self._detect(feats, cls_scores, bbox_deltas, image_shape)

    def anchor_valid(self, image_shape):
        """(N,) bool: the anchors the stage-1 sampler may pick in an image of `image_shape` (4,); all of them
        unless cfg.rpn.anchors_inside_only."""
        if self.anchors_inside_only:
            return box_ops.boxes_inside(self.all_anchors, image_shape)
        return ops.ones(self.all_anchors.shape[:1], ms.bool_)

    def _rpn_losses(self, cls_scores, bbox_deltas, image_shape, box, valid_num, seed):
        targets = ()
        for image in range(image_shape.shape[0]):
            targets += (self.rpn_targets(box[image], valid_num[image], self.all_anchors,
                                         self.anchor_valid(image_shape[image]),
                                         seed, image),)
        bbox_targets, bbox_weights, labels, label_weights = _stack_fields(targets)
        return self.rpn.loss(ops.concat(cls_scores, axis=1), ops.concat(bbox_deltas, axis=1),
                             labels, label_weights, bbox_targets, bbox_weights)

    def _losses(self, feats, cls_scores, bbox_deltas, image_shape, box, label, valid_num, mask):
        seed = self.sample_seed * 1
        rpn_loss, rpn_cls_loss, rpn_reg_loss = self._rpn_losses(cls_scores, bbox_deltas, image_shape, box,
                                                                valid_num, seed)
        proposals, proposal_valid = self.train_proposals(cls_scores, bbox_deltas, self.level_anchors,
                                                         image_shape)
        samples = ()
        for image in range(image_shape.shape[0]):
            samples += (self.rcnn_targets(box[image], label[image], valid_num[image], proposals[image],
                                          proposal_valid[image], seed, image),)
        rois, labels, label_weights, bbox_targets, bbox_weights, pos_gt_index, pos_valid = _stack_fields(
            samples)                                                                  # (B, S, ...)
        batch = rois.shape[0]
        pyramid = self.box_roi_align.prepare(feats)                                  # shared by both pools
        roi_feats = self.box_roi_align.pool(_with_batch_index(rois), pyramid)
        cls_logits, deltas = self.rcnn_cls(roi_feats)                                 # (B * rows, C), (.., C, 4)
        rcnn_cls_loss, rcnn_reg_loss = self.rcnn_cls.loss(
            cls_logits, deltas, labels.reshape(-1), label_weights.reshape(-1), bbox_targets.reshape(-1, 4),
            bbox_weights.reshape(-1))

        pos_rois, pos_labels = rois[:, :self.num_pos_stage2], labels[:, :self.num_pos_stage2]   # (B, Pn, ...)
        gt_rows = pos_gt_index + ops.arange(batch, dtype=ms.int32)[:, None] * self.num_gts    # into (B*M) masks
        rcnn_mask_loss = self._mask_loss(pyramid, mask, pos_rois, pos_labels, gt_rows, pos_valid)
        rcnn_loss = rcnn_cls_loss + rcnn_reg_loss + rcnn_mask_loss
        total_loss = rpn_loss + rcnn_loss
        total_loss = ops.depend(total_loss, ops.assign_add(self.sample_seed, ops.ones((), ms.int32)))
        return (rpn_loss, rcnn_loss, rpn_cls_loss, rpn_reg_loss, rcnn_cls_loss, rcnn_reg_loss, rcnn_mask_loss,
                total_loss)

    def _mask_loss(self, pyramid, mask, pos_rois, pos_labels, gt_rows, pos_valid):
        """rcnn_mask_loss of the positive slots, run chunk by chunk over the batch's slots, used ones first.

        pos_rois (B, Pn, 4), pos_labels (B, Pn) int32, gt_rows (B, Pn) int32 row of each slot's GT in the
        (B*M) masks, pos_valid (B, Pn) bool. An unused slot has weight 0, so a chunk without a used slot adds
        exactly 0 to the loss and to every gradient: it is skipped at run time. Where the mask head's layers can
        (`RcnnMask.skips_inactive`: our kernels), the chunk's layers are told to skip it; elsewhere a graph-mode
        branch does. A branch makes MindSpore split the training graph into one graph per branch and per side
        of it, and keep far more of the step's tensors alive (bench/results.md). Packing the used slots of all
        images to the front makes the chunks that run hold as few unused slots as can be.
        """
        rows = pos_valid.size
        weights = ops.cast(pos_valid, ms.float32).reshape(-1)
        # used slots first, each group in slot order: keys used * rows + (rows - 1 - slot), largest first
        _, order = ops.topk(weights * rows + ops.arange(rows - 1, -1, -1, dtype=ms.float32), rows)
        rois = ops.gather(_with_batch_index(pos_rois), order, 0)                     # (B * Pn, 5)
        labels = ops.gather(pos_labels.reshape(-1), order, 0)
        gt_rows = ops.gather(gt_rows.reshape(-1), order, 0)
        weights = ops.gather(weights, order, 0)
        # The pooling and the targets of all slots are computed here, outside the chunks: a tensor a graph-mode
        # branch reads is copied into the branch (the (B, M, H, W) GT masks: 240 MB at the recipe size), and a
        # branch's gradient to the pyramid would be one of the whole pyramid per chunk; pooled features give
        # slices of (chunk, C, 14, 14), and an unused row costs only its zero gradient.
        mask_feats = self.mask_roi_align.pool(rois, pyramid)                          # (B * Pn, C, 14, 14)
        targets = self.rcnn_mask.mask_targets(mask, rois[:, 1:], gt_rows)             # (B * Pn, 28, 28)
        loss_sum = ops.zeros((), ms.float32)
        for start in range(0, rows, self.mask_chunk_rows):
            stop = min(start + self.mask_chunk_rows, rows)
            chunk = (mask_feats[start:stop], labels[start:stop], targets[start:stop], weights[start:stop])
            if self.mask_head_skips:
                active = ops.cast(weights[start] > 0, ms.int32)                       # used slots come first
                loss_sum = loss_sum + self._mask_chunk_loss(*chunk, active)
            elif weights[start] > 0:
                loss_sum = loss_sum + self._mask_chunk_loss(*chunk)
        return self.rcnn_mask.normalise(loss_sum, weights)

    def _mask_chunk_loss(self, mask_feats, labels, targets, weights, active=None):
        mask_logits = self.rcnn_mask(mask_feats, active)                              # (chunk, C, 28, 28)
        return self.rcnn_mask.loss_sum(mask_logits, labels, targets, weights)

    def _detect(self, feats, cls_scores, bbox_deltas, image_shape):
        proposals, proposal_valid = self.test_proposals(cls_scores, bbox_deltas, self.level_anchors, image_shape)
        batch, num_proposals = proposals.shape[0], proposals.shape[1]
        pyramid = self.box_roi_align.prepare(feats)                                  # shared by both pools
        roi_feats = self.box_roi_align.pool(_with_batch_index(proposals), pyramid)
        cls_logits, deltas = self.rcnn_cls(roi_feats)                                 # (B * P, C), (B * P, C, 4)
        num_classes = cls_logits.shape[1]
        scores = ops.softmax(cls_logits, axis=-1).reshape(batch, num_proposals, num_classes)
        reference = ops.broadcast_to(proposals[:, :, None, :], (batch, num_proposals, num_classes, 4))
        boxes = box_ops.decode(reference, deltas.reshape(batch, num_proposals, num_classes, 4),
                               self.rcnn_means, self.rcnn_stds)
        height, width = box_ops.valid_region(image_shape)                             # (B,), (B,)
        boxes = box_ops.clip_boxes(boxes, height[:, None, None], width[:, None, None])

        detections = ()
        for image in range(batch):
            detections += (self.detections(scores[image], boxes[image], proposal_valid[image]),)
        det_boxes, det_scores, det_labels, det_valid = _stack_fields(detections)     # (B, K, ...)

        mask_feats = self.mask_roi_align.pool(_with_batch_index(det_boxes), pyramid)
        mask_logits = self.rcnn_mask(mask_feats)                                      # (B * K, C, 28, 28)
        masks = ops.sigmoid(select_class(mask_logits, det_labels.reshape(-1)))
        masks = masks.reshape(det_boxes.shape[0], det_boxes.shape[1], masks.shape[1], masks.shape[2])
        return det_boxes, det_scores, det_labels, det_valid, masks


def model_summary(net: nn.Cell, cfg) -> str:
    """One line: parameters, trainable parameters and input size (printed by train/eval)."""
    total = sum(int(np.prod(p.shape)) for p in net.get_parameters())
    trainable = sum(int(np.prod(p.shape)) for p in net.trainable_params())
    return (f"MaskRcnnResnet50: {total / 1e6:.2f}M parameters, {trainable / 1e6:.2f}M trainable, "
            f"input {cfg.data.img_height}x{cfg.data.img_width}, {cfg.num_classes} classes")
