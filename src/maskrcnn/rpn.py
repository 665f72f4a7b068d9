"""Region proposal network head and its loss.

One head is shared by all pyramid levels: a 3x3 conv + ReLU, then 1x1 convs to A objectness logits and
4A box deltas per cell (A = cfg.num_anchors). Outputs are flattened cell-major (row, then column),
anchor-minor, the order of the anchors from anchor_generator.py: flat index n = (y * w + x) * A + a.
Delta channel 4a + k is coordinate k of anchor a.
"""
import mindspore as ms
from mindspore import nn, ops
from mindspore.common.initializer import Normal

from src.ops.conv import Conv2d

HEAD_INIT_STD = 0.01
SMOOTH_L1_BETA = 1.0 / 9.0          # the recipe's RPN regression loss
BOX_DIMS = 4


def _normal_conv(in_channels, out_channels, kernel_size):
    """Conv with bias, 'same' size output, N(0, 0.01) weight, zero bias."""
    return Conv2d(in_channels, out_channels, kernel_size, pad_mode="pad", padding=kernel_size // 2,
                  has_bias=True, weight_init=Normal(HEAD_INIT_STD), bias_init="zeros")


class RPN(nn.Cell):
    """construct(feats: tuple of L maps (B, rpn_in_channels, h_l, w_l)) ->
    (cls_scores: L tensors (B, h_l * w_l * A), bbox_deltas: L tensors (B, h_l * w_l * A, 4)), logits and
    encoded deltas in anchor order."""

    def __init__(self, cfg):
        super().__init__()
        r = cfg.rpn
        self.num_anchors = cfg.num_anchors
        self.rpn_conv = _normal_conv(r.rpn_in_channels, r.rpn_feat_channels, 3)
        self.rpn_cls = _normal_conv(r.rpn_feat_channels, self.num_anchors, 1)
        self.rpn_reg = _normal_conv(r.rpn_feat_channels, self.num_anchors * BOX_DIMS, 1)
        self.cls_weight = r.rpn_loss_cls_weight
        self.reg_weight = r.rpn_loss_reg_weight
        self.sigmoid_ce = ops.SigmoidCrossEntropyWithLogits()
        self.smooth_l1 = ops.SmoothL1Loss(beta=SMOOTH_L1_BETA, reduction="none")

    def _single_level(self, feat):
        x = self.rpn_conv.relu(feat)
        batch, _, height, width = x.shape
        cls = self.rpn_cls(x).transpose(0, 2, 3, 1)                                  # (B, h, w, A)
        cls = cls.reshape(batch, height * width * self.num_anchors)
        deltas = self.rpn_reg(x).reshape(batch, self.num_anchors, BOX_DIMS, height, width)
        deltas = deltas.transpose(0, 3, 4, 1, 2)                                     # (B, h, w, A, 4)
        return cls, deltas.reshape(batch, height * width * self.num_anchors, BOX_DIMS)

    def construct(self, feats):
        cls_scores = ()
        bbox_deltas = ()
        for feat in feats:
            cls, deltas = self._single_level(feat)
            cls_scores += (cls,)
            bbox_deltas += (deltas,)
        return cls_scores, bbox_deltas

    def loss(self, cls_logits, deltas, labels, label_weights, bbox_targets, bbox_weights):
        """RPN losses over all levels concatenated (N anchors per image).

        cls_logits (B, N), deltas (B, N, 4), labels (B, N) int32 (> 0: object), label_weights (B, N) f32
        (1 on sampled anchors), bbox_targets (B, N, 4), bbox_weights (B, N) f32 (1 on sampled positives)
        -> (rpn_loss, rpn_cls_loss, rpn_reg_loss) float32 scalars, the two terms already multiplied by their
        loss weights. Both are sums over the batch divided by the number of sampled anchors (at least 1);
        the regression term sums the 4 coordinates.
        """
        num_samples = ops.maximum(label_weights.sum(), 1.0)
        targets = ops.cast(labels > 0, ms.float32)
        cls_loss = (self.sigmoid_ce(cls_logits, targets) * label_weights).sum() / num_samples
        reg_per_anchor = self.smooth_l1(deltas, bbox_targets).sum(-1)                 # (B, N)
        reg_loss = (reg_per_anchor * bbox_weights).sum() / num_samples
        cls_loss = cls_loss * self.cls_weight
        reg_loss = reg_loss * self.reg_weight
        return cls_loss + reg_loss, cls_loss, reg_loss
