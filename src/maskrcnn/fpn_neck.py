"""Feature pyramid neck: backbone C2..C5 -> P2..P6, all with fpn_out_channels channels.

Lateral 1x1 convs bring every level to the same width; the top-down path adds each coarser merged map,
upsampled by nearest neighbour to the static size of the finer level (cfg.feature_shapes: graph mode
sees fixed shapes); a 3x3 conv then smooths each merged map. P6, used only for anchors and proposals, is
P5 subsampled by a stride-2 max-pool of kernel 1. Parameter names: ``lateral_convs.{i}.*`` and
``fpn_convs.{i}.*`` for C(i+2) / P(i+2).
"""
import mindspore as ms
from mindspore import nn
from mindspore.common.initializer import initializer

from src.maskrcnn import init_scheme
from src.ops.conv import Conv2d
from src.ops.upsample_add import UpsampleAdd

P6_STRIDE = 2


def _fpn_conv(cfg, in_channels, out_channels, kernel_size):
    """Conv with bias, 'same' size output (explicit kernel // 2 padding), zero bias, weight by `train.init`."""
    weight = initializer(init_scheme.fpn_weight(cfg), (out_channels, in_channels, kernel_size, kernel_size),
                         ms.float32)
    return Conv2d(in_channels, out_channels, kernel_size, pad_mode="pad", padding=kernel_size // 2,
                  has_bias=True, weight_init=weight, bias_init="zeros")


class FeatPyramidNeck(nn.Cell):
    """(c2, c3, c4, c5) -> (p2, p3, p4, p5, p6).

    c(i+2): (B, fpn_in_channels[i], h_i, w_i); p(i+2): (B, fpn_out_channels, h_i, w_i), (h_i, w_i) = feature_shapes[i].
    """

    def __init__(self, cfg):
        super().__init__()
        out_channels = cfg.fpn.fpn_out_channels
        in_channels = cfg.fpn.fpn_in_channels
        self.lateral_convs = nn.CellList([_fpn_conv(cfg, c, out_channels, 1) for c in in_channels])
        self.fpn_convs = nn.CellList([_fpn_conv(cfg, out_channels, out_channels, 3) for _ in in_channels])
        self.num_inputs = len(in_channels)
        self.p6_pool = nn.MaxPool2d(kernel_size=1, stride=P6_STRIDE)
        self.upsample_add = UpsampleAdd()            # lateral + nearest upsampling of the coarser map to its size

    def construct(self, feats):
        laterals = [self.lateral_convs[i](feats[i]) for i in range(self.num_inputs)]
        merged = [laterals[self.num_inputs - 1]]                 # coarsest first while going down
        for i in range(self.num_inputs - 2, -1, -1):
            merged.append(self.upsample_add(merged[-1], laterals[i]))                    # (B, out, h_i, w_i)
        outs = [self.fpn_convs[i](merged[self.num_inputs - 1 - i]) for i in range(self.num_inputs)]
        p6 = self.p6_pool(outs[-1])                              # (B, out, ceil(h5 / 2), ceil(w5 / 2))
        return tuple(outs) + (p6,)
