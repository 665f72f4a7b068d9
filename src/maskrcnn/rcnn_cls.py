"""R-CNN box head: RoI features -> class logits and class-specific box deltas, and its loss.

Two shared fully connected layers (fc6, fc7, torchvision's names) feed a classifier over C classes
(background = 0) and a regressor with 4 deltas per class. Init (`train.init`, src/maskrcnn/init_scheme.py):
the recipe's Xavier-uniform shared layers and N(0, 0.01) / N(0, 0.001) classifier / regressor with zero
biases make the first predictions near uniform and near the proposal boxes.
"""
import mindspore as ms
from mindspore import nn, ops

from src.maskrcnn import init_scheme

BOX_DIMS = 4


def select_class(per_class, labels):
    """Row r of per_class (R, C, ...) at class labels[r] -> (R, ...)."""
    rows, num_classes = per_class.shape[0], per_class.shape[1]
    flat = per_class.reshape((rows * num_classes,) + per_class.shape[2:])
    index = ops.arange(rows, dtype=ms.int32) * num_classes + labels
    return ops.gather(flat, index, 0)


def _dense(in_features, out_features, weight_and_bias_init):
    weight_init, bias_init = weight_and_bias_init
    return nn.Dense(in_features, out_features, weight_init=weight_init, bias_init=bias_init)


class RcnnCls(nn.Cell):
    """construct(roi_feats (R, rcnn_in_channels, roi_out_size, roi_out_size)) ->
    (cls_logits (R, C), deltas (R, C, 4)) with C = cfg.num_classes."""

    def __init__(self, cfg):
        super().__init__()
        c = cfg.rcnn
        self.num_classes = cfg.num_classes
        in_features = c.rcnn_in_channels * cfg.roi.roi_out_size * cfg.roi.roi_out_size
        hidden = c.rcnn_fc_out_channels
        self.fc6 = _dense(in_features, hidden, init_scheme.box_hidden(cfg, in_features))
        self.fc7 = _dense(hidden, hidden, init_scheme.box_hidden(cfg, hidden))
        self.cls_score = _dense(hidden, self.num_classes, init_scheme.box_classifier(cfg, hidden))
        self.bbox_pred = _dense(hidden, self.num_classes * BOX_DIMS, init_scheme.box_regressor(cfg, hidden))
        self.relu = nn.ReLU()
        self.cls_weight = c.rcnn_loss_cls_weight
        self.reg_weight = c.rcnn_loss_reg_weight
        self.softmax_ce = nn.SoftmaxCrossEntropyWithLogits(sparse=True, reduction="none")
        self.smooth_l1 = ops.SmoothL1Loss(beta=float(c.rcnn_smooth_l1_beta), reduction="none")

    def construct(self, roi_feats):
        rows = roi_feats.shape[0]
        x = roi_feats.reshape(rows, -1)                                              # (R, 256 * 7 * 7)
        x = self.relu(self.fc6(x))
        x = self.relu(self.fc7(x))                                                   # (R, 1024)
        deltas = self.bbox_pred(x).reshape(rows, self.num_classes, BOX_DIMS)
        return self.cls_score(x), deltas

    def loss(self, cls_logits, deltas, labels, label_weights, bbox_targets, bbox_weights):
        """R-CNN losses over the sampled RoI rows of the whole batch.

        cls_logits (R, C), deltas (R, C, 4), labels (R,) int32 in 0..C-1, label_weights (R,) f32 (1 on real
        samples), bbox_targets (R, 4), bbox_weights (R,) f32 (1 on positives) -> (rcnn_cls_loss,
        rcnn_reg_loss) float32 scalars, already multiplied by their loss weights. Softmax cross-entropy and
        the smooth-L1 of the deltas of each row's own class (summed over the 4 coordinates) are both summed
        over rows and divided by the number of real samples (at least 1).
        """
        num_samples = ops.maximum(label_weights.sum(), 1.0)
        cls_loss = (self.softmax_ce(cls_logits, labels) * label_weights).sum() / num_samples
        own_deltas = select_class(deltas, labels)                                    # (R, 4)
        reg_per_row = self.smooth_l1(own_deltas, bbox_targets).sum(-1)
        reg_loss = (reg_per_row * bbox_weights).sum() / num_samples
        return cls_loss * self.cls_weight, reg_loss * self.reg_weight
