"""R-CNN mask head: RoI features -> per-class 28x28 mask logits, its targets and its loss.

Four 3x3 convs + ReLU, a 2x2 stride-2 deconv + ReLU that doubles the resolution, and a 1x1 conv to one
logit map per class (torchvision's names: mask_fcn1..4, conv5_mask, mask_fcn_logits). Init (`train.init`,
src/maskrcnn/init_scheme.py): Kaiming normal (fan_out) for the convs and the deconv; the recipe's N(0, 0.001)
logits start every mask at p ~ 0.5.

Mask targets use the coordinate convention of box_ops (continuous input pixels, pixel (i, j) covers
[j, j+1) x [i, i+1), no "+1" on widths), the one mask_paste.paste_masks inverts at evaluation: target cell
(u, v) of a RoI (x1, y1, x2, y2) averages 2x2 bilinear samples of its (w/28 x h/28) bin, i.e. the
aligned RoIAlign of the GT mask at stride 1, thresholded at 0.5 (the op src/ops/mask_targets.py).
"""
import mindspore as ms
from mindspore import nn, ops
from mindspore.common.initializer import HeNormal

from src.maskrcnn import init_scheme
from src.maskrcnn.rcnn_cls import select_class
from src.ops.conv import Conv2d, Conv2dTranspose
from src.ops.mask_targets import MaskTargets

MASK_STRIDE = 1             # GT masks are at input resolution


def _kaiming_conv(in_channels, out_channels, kernel_size):
    return Conv2d(in_channels, out_channels, kernel_size, pad_mode="pad", padding=kernel_size // 2,
                  has_bias=True, weight_init=HeNormal(mode="fan_out", nonlinearity="relu"), bias_init="zeros")


class RcnnMask(nn.Cell):
    """construct(mask_feats (R, rcnn_in_channels, mask_out_size, mask_out_size)) ->
    mask_logits (R, C, mask_shape, mask_shape), C = cfg.num_classes, mask_shape = 2 * mask_out_size."""

    def __init__(self, cfg):
        super().__init__()
        c = cfg.rcnn
        channels = c.rcnn_mask_out_channels
        self.mask_fcn1 = _kaiming_conv(c.rcnn_in_channels, channels, 3)
        self.mask_fcn2 = _kaiming_conv(channels, channels, 3)
        self.mask_fcn3 = _kaiming_conv(channels, channels, 3)
        self.mask_fcn4 = _kaiming_conv(channels, channels, 3)
        upsample = c.mask_shape // cfg.roi.mask_out_size
        self.conv5_mask = Conv2dTranspose(channels, channels, upsample, stride=upsample, pad_mode="valid",
                                          has_bias=True, weight_init=HeNormal(mode="fan_out", nonlinearity="relu"),
                                          bias_init=init_scheme.mask_upsample_bias(cfg, channels * upsample ** 2))
        logits_weight, logits_bias = init_scheme.mask_logits(cfg, channels)
        self.mask_fcn_logits = Conv2d(channels, cfg.num_classes, 1, has_bias=True, weight_init=logits_weight,
                                      bias_init=logits_bias)
        self.mask_weight = c.rcnn_loss_mask_weight
        self.targets = MaskTargets(c.mask_shape, cfg.roi.roi_sample_ratio, MASK_STRIDE,
                                   cfg.data.img_width // MASK_STRIDE, c.mask_target_binary)
        self.sigmoid_ce = ops.SigmoidCrossEntropyWithLogits()

    def _layers(self):
        return (self.mask_fcn1, self.mask_fcn2, self.mask_fcn3, self.mask_fcn4, self.conv5_mask, self.mask_fcn_logits)

    @property
    def skips_inactive(self) -> bool:
        """Whether a call with active 0 skips the head's work: its logits and gradients are then zeros."""
        return all(layer.skips_inactive for layer in self._layers())

    def construct(self, mask_feats, active=None):
        """active: None, or an int32 scalar; 0 lets the layers skip their work (src/ops/conv.py)."""
        x = self.mask_fcn1.relu(mask_feats, active)
        x = self.mask_fcn2.relu(x, active)
        x = self.mask_fcn3.relu(x, active)
        x = self.mask_fcn4.relu(x, active)                                           # (R, 256, 14, 14)
        x = self.conv5_mask.relu(x, active)                                          # (R, 256, 28, 28)
        return self.mask_fcn_logits(x, active)                                       # (R, C, 28, 28)

    def mask_targets(self, gt_masks, rois, gt_index):
        """Binary training targets of the RoIs' matched GT masks.

        gt_masks (B, M, H, W) uint8 0/1 at input resolution or its bits (src/data/mask_bits.py), rois (R, 4)
        x1, y1, x2, y2 in input pixels, gt_index (R,) int32 = b * M + m of each RoI's GT -> (R, mask_shape,
        mask_shape) float32 0/1: the RoIAlign of the GT mask over the RoI, thresholded at 0.5 (unless
        cfg.rcnn.mask_target_binary is false: then the RoIAlign itself). No gradient flows.
        """
        boxes = ops.concat((ops.cast(gt_index, ms.float32)[:, None], rois), axis=1)   # (R, 5)
        return self.targets(gt_masks, boxes)

    def loss_sum(self, mask_logits, labels, mask_targets, weights):
        """Sum over rows of weight * (mean pixel binary cross-entropy on the row's own class map).

        Additive over rows, so the rows may come in chunks; `normalise` turns the total into the loss.
        """
        own_logits = select_class(mask_logits, labels)                               # (R, S, S)
        per_row = self.sigmoid_ce(own_logits, mask_targets).mean(axis=(1, 2))        # (R,)
        return (per_row * weights).sum()

    def normalise(self, loss_sum, weights):
        """Total `loss_sum` of all rows, weights (..) of all rows -> rcnn_mask_loss: divided by the weight sum
        (at least 1), times rcnn_loss_mask_weight."""
        return loss_sum / ops.maximum(weights.sum(), 1.0) * self.mask_weight

    def loss(self, mask_logits, labels, mask_targets, weights):
        """Per-pixel binary cross-entropy on the logit map of each row's GT class.

        mask_logits (R, C, S, S), labels (R,) int32, mask_targets (R, S, S) 0/1, weights (R,) f32 (1 on rows
        that are real positives) -> rcnn_mask_loss float32 scalar: the mean over pixels of each row,
        summed with the row weights, divided by their sum (at least 1), times rcnn_loss_mask_weight.
        """
        return self.normalise(self.loss_sum(mask_logits, labels, mask_targets, weights), weights)
