"""oneDNN's blocked tensors: an internal contract between our convolutions (src/ops/conv.py) and the backbone
that chains them.

A tensor held blocked keeps its (N, C, H, W) shape but its values are in oneDNN's nChw16c order (C a multiple of
constants.BLOCK_CHANNELS), so a chain of our convolutions skips the reorders to and from NCHW between them. Only
elementwise operators (add, ReLU) may touch such a tensor besides our convolutions; this module is where that is
checked: a convolution is told at build time which layout it reads and writes (`Conv2d.hold`, which refuses
what it cannot do), and `hand_over` lets a producer of blocked maps pass them only to convolutions.
"""
import enum

from mindspore import nn

from src.ops import constants, custom


class Layout(enum.Enum):
    PLAIN = "NCHW"
    BLOCKED = "nChw16c"


def blockable(channels: int) -> bool:
    """Whether a tensor of this many channels can be held blocked."""
    return channels % constants.BLOCK_CHANNELS == 0


class _Relayout(nn.Cell):
    """One layout conversion kernel, with the opposite one as its gradient."""
    FORWARD = BACKWARD = ""

    def __init__(self):
        super().__init__()
        self.convert = custom.relayout_pair(self.FORWARD, self.BACKWARD)

    def construct(self, x):
        return self.convert(x)


class ToPlain(_Relayout):
    """(N, C, H, W) held blocked -> the same tensor as NCHW, with its gradient (kernels only)."""
    FORWARD, BACKWARD = "BlockedToPlain", "PlainToBlocked"


class ToBlocked(_Relayout):
    """(N, C, H, W) NCHW -> the same tensor held blocked, with its gradient (kernels only)."""
    FORWARD, BACKWARD = "PlainToBlocked", "BlockedToPlain"


def hand_over(producer, readers) -> Layout:
    """Let `producer` give its outputs to `readers` blocked when it makes them blocked and every reader can read
    them so; returns the layout chosen.

    producer: a cell with `native_output_layout` and `set_output_layout(layout)` (the backbone);
    readers: the only cells that read its outputs, each an op-layer Conv2d (nothing else may read a blocked map).
    """
    from src.ops.conv import Conv2d

    for reader in readers:
        if not isinstance(reader, Conv2d):
            raise TypeError(f"{type(reader).__name__} cannot read blocked maps: only src.ops.conv.Conv2d can")
    blocked = producer.native_output_layout is Layout.BLOCKED and all(reader.can_hold(Layout.BLOCKED, None)
                                                                     for reader in readers)
    layout = Layout.BLOCKED if blocked else Layout.PLAIN
    producer.set_output_layout(layout)
    for reader in readers:
        reader.hold(input_layout=layout)
    return layout
