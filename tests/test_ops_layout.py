"""src/ops/layout.py: blocked tensors reach only convolutions that can read them; the conversions round-trip."""
import mindspore as ms
import numpy as np
import pytest
from mindspore import nn

from src.config import load_config
from src.maskrcnn.mask_rcnn_r50 import MaskRcnnResnet50
from src.maskrcnn.resnet50 import ResNet50
from src.ops import backend
from src.ops.conv import Conv2d
from src.ops.layout import Layout, ToBlocked, ToPlain, hand_over


def test_a_layer_on_mindspore_operators_refuses_blocked_tensors():
    with backend.use_mindspore_kernels():
        layer = Conv2d(16, 16, 3, pad_mode="pad", padding=1)
    with pytest.raises(ValueError, match="cannot read Layout.BLOCKED"):
        layer.hold(input_layout=Layout.BLOCKED)
    assert layer.input_layout is Layout.PLAIN


def test_channels_outside_whole_blocks_refuse_blocked_tensors():
    layer = Conv2d(8, 16, 1)
    with pytest.raises(ValueError, match="channels in blocks of 16"):
        layer.hold(input_layout=Layout.BLOCKED)
    layer.hold(output_layout=Layout.BLOCKED)                 # 16 output channels: one whole block
    assert layer.output_layout is Layout.BLOCKED and layer.input_layout is Layout.PLAIN


def test_conversions_round_trip_and_reorder():
    x = ms.Tensor(np.random.default_rng(0).standard_normal((2, 32, 3, 5)).astype(np.float32))
    blocked = ToBlocked()(x)
    assert not np.array_equal(blocked.asnumpy(), x.asnumpy())           # the values are in nChw16c order
    np.testing.assert_array_equal(ToPlain()(blocked).asnumpy(), x.asnumpy())


@pytest.fixture(scope="module")
def backbone():
    net = ResNet50(load_config("tiny"))
    assert net.native_output_layout is Layout.BLOCKED                   # frozen BatchNorms fold on the kernels
    return net


def test_hand_over_refuses_readers_that_are_not_our_convolutions(backbone):
    with pytest.raises(TypeError, match="Dense cannot read blocked maps"):
        hand_over(backbone, [nn.Dense(256, 16)])


def test_hand_over_gives_blocked_maps_only_when_every_reader_can_read_them(backbone):
    readers = [Conv2d(c, 16, 1) for c in (256, 512, 1024, 2048)]
    assert hand_over(backbone, readers) is Layout.BLOCKED
    assert all(r.input_layout is Layout.BLOCKED for r in readers) and not backbone.convert_outputs
    narrow = readers[:3] + [Conv2d(2048, 16, 1), Conv2d(8, 16, 1)]      # one reader cannot: all get NCHW maps
    assert hand_over(backbone, narrow) is Layout.PLAIN
    assert all(r.input_layout is Layout.PLAIN for r in narrow[3:]) and backbone.convert_outputs


def test_the_model_hands_the_fpn_blocked_maps():
    net = MaskRcnnResnet50(load_config("tiny"))
    assert net.backbone.output_layout is Layout.BLOCKED
    assert all(conv.input_layout is Layout.BLOCKED for conv in net.neck.lateral_convs)
    assert all(conv.input_layout is Layout.PLAIN for conv in net.neck.fpn_convs)
