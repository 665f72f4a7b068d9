"""Max-IoU assignment of candidate boxes to ground-truth boxes (mmdet v1), on the CPU kernel
(kernels/max_iou_assign.cpp) or MindSpore's operators."""
import mindspore as ms
import numpy as np
from mindspore import nn, ops

from src.ops import backend, constants
from src.ops.boxes import IOU_EPS, box_iou
from src.ops.custom import kernel

NOWHERE = -1.0e4            # corner of the zero-area box standing in for padded GTs / invalid candidates
UNREACHABLE_IOU = 2.0       # claim level of GTs that claim nothing (IoU <= 1)


def _kernel():
    """(gt (M, 4), gt_valid (M,) bool, boxes (N, 4), box_valid (N,) bool, settings (in the order of
    constants.MAX_IOU_ASSIGN_SETTINGS)) -> (assigned_gt (N,) int32, positive (N,) bool, negative (N,) bool);
    no gradient."""
    return kernel("MaxIoUAssign", lambda gt, gt_valid, boxes, box_valid, settings: [[boxes[0]]] * 3,
                  lambda *types: [ms.int32, ms.bool_, ms.bool_])


class MaxIoUAssigner(nn.Cell):
    """mmdet-v1 max-IoU assignment of candidate boxes to ground-truth boxes, for one image.

    A valid candidate is negative if its best IoU with the valid GTs is < neg_iou_thr, positive (for its
    best GT) if >= pos_iou_thr. Then every valid GT claims the valid candidates whose IoU equals that GT's
    best IoU, if that IoU >= min_pos_iou (the later GT wins a candidate claimed twice), so each GT gets at
    least one positive when it can. Invalid candidates are neither; padded GTs overlap nothing.

    Padded GTs and invalid candidates are swapped for a zero-area box far outside the image before the
    IoU, so masking costs (M,) and (N,) work instead of selects over the (M, N) matrix (slow on CPU). On CPU
    (backend.enabled()) the kernel (kernels/max_iou_assign.cpp) does the same arithmetic on the valid GTs only,
    without the matrix.
    """

    def __init__(self, pos_iou_thr: float, neg_iou_thr: float, min_pos_iou: float, num_gts: int):
        super().__init__()
        self.pos_iou_thr = pos_iou_thr
        self.neg_iou_thr = neg_iou_thr
        self.min_pos_iou = min_pos_iou
        self.gt_numbers = ms.Tensor(np.arange(1, num_gts + 1, dtype=np.float32)[:, None])   # (M, 1)
        self.nowhere = ms.Tensor(np.full((1, 4), NOWHERE, np.float32))
        self.kernel = _kernel() if backend.enabled() else None
        settings = dict(pos_iou=pos_iou_thr, neg_iou=neg_iou_thr, min_pos_iou=min_pos_iou, iou_eps=IOU_EPS,
                        nowhere=NOWHERE, unreachable_iou=UNREACHABLE_IOU)
        self.settings = ms.Tensor(np.array([settings[name] for name in constants.MAX_IOU_ASSIGN_SETTINGS],
                                           np.float32))

    def _or_nowhere(self, boxes, valid):
        return ops.where(ops.broadcast_to(valid[:, None], boxes.shape), boxes,
                         ops.broadcast_to(self.nowhere, boxes.shape))

    def construct(self, gt_bboxes, gt_valids, boxes, box_valids):
        """gt_bboxes (M, 4), gt_valids (M,) bool, boxes (N, 4), box_valids (N,) bool ->
        (assigned_gt (N,) int32 index into the M GTs, positive (N,) bool, negative (N,) bool)."""
        if self.kernel is not None:
            return self.kernel(ops.stop_gradient(gt_bboxes), gt_valids, ops.stop_gradient(boxes), box_valids,
                               self.settings)
        iou = box_iou(self._or_nowhere(gt_bboxes, gt_valids), self._or_nowhere(boxes, box_valids))  # (M, N)
        max_iou, best_gt = ops.max(iou, axis=0)                                      # (N,)
        positive = ops.logical_and(box_valids, max_iou >= self.pos_iou_thr)
        negative = ops.logical_and(box_valids, max_iou < self.neg_iou_thr)

        # A GT claims the candidates at its best IoU; GTs that may not claim get an unreachable level.
        gt_best_iou = ops.max(iou, axis=1)[0]                                        # (M,)
        may_claim = ops.logical_and(gt_valids, gt_best_iou >= self.min_pos_iou)
        claim_level = ops.where(may_claim, gt_best_iou, ops.full_like(gt_best_iou, UNREACHABLE_IOU))
        claims = ops.cast(iou - claim_level[:, None] >= 0.0, ms.float32)            # (M, N): iou == level
        claimed_by = ops.max(claims * self.gt_numbers, axis=0)[0]                    # (N,) last claiming GT + 1
        claimed = ops.logical_and(claimed_by > 0.0, box_valids)                      # min_pos_iou 0: not at IoU 0

        assigned_gt = ops.where(claimed, ops.cast(claimed_by, ms.int32) - 1, ops.cast(best_gt, ms.int32))
        positive = ops.logical_or(positive, claimed)
        negative = ops.logical_and(negative, ops.logical_not(positive))
        return assigned_gt, positive, negative
