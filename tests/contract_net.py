"""A small network honouring MaskRcnnResnet50's training contract, for the training-step and loop tests.

The same construct signature, the eight-loss tuple, a frozen parameter and an int32 step counter used as a
"sampling seed"; it can be told to produce a NaN loss or NaN gradients at a chosen step.
"""
import re

import numpy as np

import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops

from src.config import load_config
from src.maskrcnn.mask_rcnn_r50 import LOSS_NAMES

CLASSES = len(load_config("tiny").data.classes)        # labels of the tiny synthetic set are 1..CLASSES-1
RECIPE_LINE = re.compile(r"^epoch:(\d+) step:(\d+) ," + ", ".join(rf"{n}:(-?\d+\.\d{{5}})" for n in LOSS_NAMES) + "$")


class ContractNet(nn.Cell):
    """A few real parameters behind the MaskRcnnResnet50 training contract.

    nan_at_step: the step counter value at which the total loss becomes NaN (-1: never).
    nan_grad_at_step: the step at which the loss stays finite but its gradients become NaN (-1: never).
    """

    def __init__(self, nan_at_step=-1, nan_grad_at_step=-1):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, has_bias=True, weight_init="normal")
        self.cls = nn.Dense(4, CLASSES, weight_init="normal")
        self.reg = nn.Dense(4, 4, weight_init="normal")
        self.frozen_scale = Parameter(Tensor(np.full((4,), 0.5, np.float32)), name="frozen_scale",
                                      requires_grad=False)
        self.step_counter = Parameter(Tensor(0, ms.int32), name="step_counter", requires_grad=False)
        self.nan_at_step = nan_at_step
        self.nan_grad_at_step = nan_grad_at_step
        self.ce = nn.SoftmaxCrossEntropyWithLogits(sparse=True, reduction="mean")

    def construct(self, image, image_shape, box, label, valid_num, mask):
        seed = self.step_counter.astype(ms.float32)
        feat = self.conv(image).mean(axis=(2, 3)) * self.frozen_scale            # (B, 4)
        rpn_cls = ops.sigmoid(feat).mean()
        rpn_reg = (feat * feat).mean() * ops.cos(seed)                           # depends on the "seed"
        rcnn_cls = self.ce(self.cls(feat), label[:, 0])
        valid = valid_num.astype(ms.float32)
        rcnn_reg = ((self.reg(feat)[:, None, :] - box / image_shape[:, None, :2].mean()) ** 2).mean(-1)
        rcnn_reg = (rcnn_reg * valid).sum() / valid.sum()
        rcnn_mask = ops.abs(feat.mean() - mask.astype(ms.float32).mean())
        rpn_loss = rpn_cls + rpn_reg
        rcnn_loss = rcnn_cls + rcnn_reg + rcnn_mask
        total = rpn_loss + rcnn_loss
        poison = ops.select(self.step_counter == self.nan_at_step, Tensor(np.nan, ms.float32),
                            Tensor(1.0, ms.float32))
        total = total * poison
        offset = (self.step_counter != self.nan_grad_at_step).astype(ms.float32)   # 0 at that step, else 1
        total = total + 0.0 * ops.sqrt(feat.sum() - feat.sum() + offset)  # at sqrt(0): gradient 0 * inf = NaN
        ops.assign_add(self.step_counter, Tensor(1, ms.int32))
        return rpn_loss, rcnn_loss, rpn_cls, rpn_reg, rcnn_cls, rcnn_reg, rcnn_mask, total
