"""ResNet50 backbone: image -> C2..C5 feature maps for the FPN.

Parameter names follow torchvision so checkpoints convert by renaming only the BatchNorm leaves:

    conv1.weight                        <-> conv1.weight
    bn1.gamma / beta                    <-> bn1.weight / bias
    bn1.moving_mean / moving_variance   <-> bn1.running_mean / running_var
    layer{k}.{i}.conv{1,2,3}.weight     <-> same name
    layer{k}.{i}.bn{1,2,3}.<leaf>       <-> same name, leaves mapped as for bn1
    layer{k}.0.downsample.0.weight      <-> same name (1x1 projection conv)
    layer{k}.0.downsample.1.<leaf>      <-> same name, leaves mapped as for bn1

(inside MaskRcnnResnet50 every name carries the prefix of the attribute holding the backbone). There is
no fc layer. Convolutions have no bias and use explicit padding, so output sizes match torchvision.

Freezing (the recipe fine-tunes from ImageNet weights): ``frozen_stages = k >= 1`` freezes the stem and
stages 1..k (``requires_grad=False``, BatchNorm included) and stops the gradient at their output, so no
backward pass is spent on them; 0 freezes nothing. A frozen BatchNorm always normalises with its moving
statistics, in training too, never updates them and has gamma/beta frozen; ``freeze_bn`` freezes every
BatchNorm of the backbone that way. ``norm: group`` puts GroupNorm in every BatchNorm's place (same names,
gamma/beta only; ``freeze_bn`` then freezes its gamma/beta): for training from scratch at small batches,
where batch statistics of 2 images are noisy and differ from the moving ones used at test time.

Initialisation for training from scratch (no pretrained weights here): convolutions are Kaiming normal
(fan_out), BatchNorm gamma 1 / beta 0, moving statistics 0 / 1. With frozen BatchNorm those statistics
never change, so every BatchNorm is a fixed identity and nothing normalises the 16 residual additions:
with Kaiming branches the activation variance grows at every block (rms of C2..C5 on an N(0, 1) image:
0.57, 1.9, 13, 30). Trainable residual branches therefore start at zero (unless `train.init: torchvision`,
src/maskrcnn/init_scheme.py), so each trainable block starts as the identity and the signal only passes the
stem and the four projection shortcuts (rms 0.68, 0.45, 0.31, 0.21 with the recipe's freezing; Goyal et al.
2017; Fixup, Zhang et al. 2019):
- trainable BatchNorm: the last gamma of the branch is zero (the usual trick);
- frozen BatchNorm: gamma is fixed forever, so a zero gamma would kill the branch for good; the last
  conv weight of the branch is zero instead. It still gets a gradient (its input and the gradient
  from above are non-zero), and the earlier convs of the branch get one as soon as it moves.
Frozen stages keep their Kaiming branches: they never learn, and a random branch is a richer fixed
feature than an identity.

Where the convolutions fuse it (src/ops/conv.py), a frozen BatchNorm and the ReLU after it run inside their
convolution, and when every block folds, the stages hand each other oneDNN's blocked tensors (src/ops/layout.py;
the outputs are converted back to NCHW unless `layout.hand_over` gives them to convolutions that read them so).
"""
import math

import mindspore as ms
from mindspore import nn, ops
from mindspore.common.initializer import HeNormal, initializer

from src.maskrcnn import init_scheme
from src.ops.conv import Conv2d
from src.ops.layout import Layout, ToPlain

IMAGE_CHANNELS = 3                  # RGB
BOTTLENECK_EXPANSION = 4            # a bottleneck's 3x3 conv has out_channels / 4 channels
STEM_KERNEL, STEM_STRIDE = 7, 2
STEM_POOL_KERNEL, STEM_POOL_STRIDE = 3, 2
STAGE_STRIDE = 2                    # stages 2..4 halve the resolution in their first block
GROUP_NORM_GROUPS = 32              # Wu and He 2018


def _zero_pad(x, pad: int):
    """(B, C, H, W) -> (B, C, H + 2 pad, W + 2 pad) with zero borders, by concatenation: on CPU ~5x faster than
    MindSpore's Pad / PadV3 kernels."""
    b, c, h, w = x.shape
    side = ops.zeros((b, c, h, pad), x.dtype)
    x = ops.concat((side, x, side), 3)
    top = ops.zeros((b, c, pad, w + 2 * pad), x.dtype)
    return ops.concat((top, x, top), 2)


def _conv(in_channels, out_channels, kernel_size, stride=1, zero_init=False):
    """Bias-free conv with torchvision padding (kernel // 2 on every side), Kaiming normal fan_out."""
    weight = initializer("zeros" if zero_init else HeNormal(mode="fan_out", nonlinearity="relu"),
                         (out_channels, in_channels, kernel_size, kernel_size), ms.float32)
    return Conv2d(in_channels, out_channels, kernel_size, stride=stride, pad_mode="pad",
                  padding=kernel_size // 2, has_bias=False, weight_init=weight)


def _norm(channels, kind, frozen, zero_gamma=False):
    """BatchNorm, or GroupNorm (``kind == "group"``, up to GROUP_NORM_GROUPS groups).

    A frozen BatchNorm always normalises with its moving statistics and never updates them; a frozen norm
    of either kind keeps gamma and beta fixed. GroupNorm normalises each image on its own, so it trains and
    tests alike however small the batch: the choice for training from scratch at batch 2.
    """
    gamma_init = "zeros" if zero_gamma else "ones"
    if kind == "group":
        norm = nn.GroupNorm(math.gcd(GROUP_NORM_GROUPS, channels), channels, gamma_init=gamma_init)
    else:
        norm = nn.BatchNorm2d(channels, gamma_init=gamma_init, use_batch_statistics=False if frozen else None)
    if frozen:
        norm.gamma.requires_grad = False
        norm.beta.requires_grad = False
    return norm


def _frozen_norm_affine(norm):
    """(scale, shift) of a frozen BatchNorm, per channel: norm(x) = x * scale + shift."""
    scale = norm.gamma * ops.rsqrt(norm.moving_variance + norm.eps)
    return scale, norm.beta - norm.moving_mean * scale


def _conv_norm(conv, norm, x, relu, fold):
    """[ReLU](norm(conv(x))); fold: the norm is a frozen BatchNorm and the conv fuses it (and the ReLU)."""
    if fold:
        scale, shift = _frozen_norm_affine(norm)
        return conv.affine(x, scale, shift, relu)
    out = norm(conv(x))
    return ops.relu(out) if relu else out


def _can_fold(conv, kind, frozen):
    """Whether `_conv_norm` may fold: a frozen BatchNorm after a convolution that fuses it."""
    return frozen and kind != "group" and conv.fuses_affine


class Bottleneck(nn.Cell):
    """1x1 reduce, 3x3 (carries the stride), 1x1 expand, plus a shortcut; (B, in, h, w) -> (B, out, h/s, w/s).

    zero_branch: start the residual branch at zero (see the module docstring for why and how).
    """

    def __init__(self, in_channels, out_channels, stride, norm, freeze_norm, zero_branch):
        super().__init__()
        mid_channels = out_channels // BOTTLENECK_EXPANSION
        self.conv1 = _conv(in_channels, mid_channels, 1)
        self.bn1 = _norm(mid_channels, norm, freeze_norm)
        self.conv2 = _conv(mid_channels, mid_channels, 3, stride)
        self.bn2 = _norm(mid_channels, norm, freeze_norm)
        self.conv3 = _conv(mid_channels, out_channels, 1, zero_init=zero_branch and freeze_norm)
        self.bn3 = _norm(out_channels, norm, freeze_norm, zero_gamma=zero_branch and not freeze_norm)
        self.has_downsample = stride != 1 or in_channels != out_channels
        if self.has_downsample:
            self.downsample = nn.SequentialCell([_conv(in_channels, out_channels, 1, stride),
                                                 _norm(out_channels, norm, freeze_norm)])

        self.fold = _can_fold(self.conv1, norm, freeze_norm)

    def _input_convs(self):
        return [self.conv1] + ([self.downsample[0]] if self.has_downsample else [])

    def can_run_blocked(self, input_layout):
        """Whether the block can read x in input_layout and hold everything else blocked."""
        return self.fold and all(conv.can_hold(input_layout, Layout.BLOCKED) for conv in self._input_convs()) \
            and all(conv.can_hold(Layout.BLOCKED, Layout.BLOCKED) for conv in (self.conv2, self.conv3))

    def run_blocked(self, input_layout):
        """Read x in input_layout and hold every other tensor blocked: the add and ReLU between the convolutions
        are elementwise, the only other operators a blocked tensor may meet."""
        for conv in self._input_convs():
            conv.hold(input_layout, Layout.BLOCKED)
        for conv in (self.conv2, self.conv3):
            conv.hold(Layout.BLOCKED, Layout.BLOCKED)

    def construct(self, x):
        identity = x
        if self.has_downsample:
            identity = _conv_norm(self.downsample[0], self.downsample[1], x, False, self.fold)
        out = _conv_norm(self.conv1, self.bn1, x, True, self.fold)
        out = _conv_norm(self.conv2, self.bn2, out, True, self.fold)
        out = _conv_norm(self.conv3, self.bn3, out, False, self.fold)
        return ops.relu(out + identity)


class ResNet50(nn.Cell):
    """(B, 3, H, W) -> (c2, c3, c4, c5) at strides 4, 8, 16, 32 with cfg.backbone.resnet_out_channels."""

    def __init__(self, cfg):
        super().__init__()
        bb = cfg.backbone
        stem_channels = bb.resnet_in_channels[0]
        self.frozen_stages = bb.frozen_stages
        self.conv1 = _conv(IMAGE_CHANNELS, stem_channels, STEM_KERNEL, STEM_STRIDE)
        stem_frozen = bb.freeze_bn or self.frozen_stages >= 1
        self.bn1 = _norm(stem_channels, bb.norm, stem_frozen)
        self.fold_stem = _can_fold(self.conv1, bb.norm, stem_frozen)
        # Zero padding + an unpadded pool: the pool's input is a ReLU output (>= 0), so the maxima equal those of
        # a padded pool, which MindSpore runs as MaxPool3DWithArgmax (65 ms per 384x640 batch on CPU against
        # 24 ms, and the ONNX exporter has no conversion for it).
        self.stem_pool_padding = STEM_POOL_KERNEL // 2
        self.maxpool = nn.MaxPool2d(kernel_size=STEM_POOL_KERNEL, stride=STEM_POOL_STRIDE, pad_mode="valid")
        stages = []
        for index, (depth, in_channels, out_channels) in enumerate(
                zip(bb.resnet_block, bb.resnet_in_channels, bb.resnet_out_channels)):
            stride = 1 if index == 0 else STAGE_STRIDE  # stage 1 follows the stem max-pool
            trainable = index >= self.frozen_stages
            zero_branch = trainable and init_scheme.zero_residual_branches(cfg)
            blocks = [Bottleneck(in_channels if i == 0 else out_channels, out_channels, stride if i == 0 else 1,
                                 bb.norm, bb.freeze_bn or not trainable, zero_branch=zero_branch)
                      for i in range(depth)]
            stages.append(nn.SequentialCell(blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        # When every block can, the stages pass blocked tensors from the first block's convolutions on; the
        # outputs are converted to NCHW unless `set_output_layout` says their readers take them blocked.
        blocks = [block for stage in stages for block in stage]
        self.blocked = all(block.can_run_blocked(Layout.PLAIN if index == 0 else Layout.BLOCKED)
                           for index, block in enumerate(blocks))
        if self.blocked:
            for index, block in enumerate(blocks):
                block.run_blocked(Layout.PLAIN if index == 0 else Layout.BLOCKED)
        self.native_output_layout = Layout.BLOCKED if self.blocked else Layout.PLAIN
        self.output_layout = Layout.PLAIN
        self.to_plain = ToPlain() if self.blocked else None
        self.convert_outputs = self.blocked             # from blocked to plain (a bool: graph mode reads it)

        if self.frozen_stages >= 1:
            for cell in [self.conv1, self.bn1] + stages[:self.frozen_stages]:
                for param in cell.get_parameters():
                    param.requires_grad = False

    def set_output_layout(self, layout):
        """Give C2..C5 in `layout` (src/ops/layout.hand_over decides): PLAIN, or BLOCKED if the stages run so."""
        if layout is Layout.BLOCKED and not self.blocked:
            raise ValueError("the ResNet stages do not run blocked, so they cannot give blocked outputs")
        self.output_layout = layout
        self.convert_outputs = self.blocked and layout is Layout.PLAIN

    def _freeze_output(self, x, stage_number):
        """Cut the graph after the last frozen stage: nothing below it learns."""
        return ops.stop_gradient(x) if stage_number == self.frozen_stages else x

    def construct(self, x):
        x = _conv_norm(self.conv1, self.bn1, x, True, self.fold_stem)
        x = self.maxpool(_zero_pad(x, self.stem_pool_padding))  # (B, 64, H/4, W/4)
        c2 = self._freeze_output(self.layer1(x), 1)              # (B, 256, H/4, W/4)
        c3 = self._freeze_output(self.layer2(c2), 2)             # (B, 512, H/8, W/8)
        c4 = self._freeze_output(self.layer3(c3), 3)             # (B, 1024, H/16, W/16)
        c5 = self._freeze_output(self.layer4(c4), 4)             # (B, 2048, H/32, W/32)
        if self.convert_outputs:
            return self.to_plain(c2), self.to_plain(c3), self.to_plain(c4), self.to_plain(c5)
        return c2, c3, c4, c5
