"""The FPN's top-down merge: lateral + nearest upsampling of the coarser map, in one pass on the CPU kernel
(kernels/upsample_add.cpp), else ops.interpolate and an add. For ONNX export the upsampling is
ResizeNearestNeighbor, which the ONNX exporter converts (it has no conversion for interpolate's
ResizeNearestNeighborV2); both pick source cell floor(i * in / out)."""
from mindspore import nn, ops

from src.ops import backend
from src.ops.custom import kernel


def _kernel():
    backward = kernel("UpsampleAddGrad", lambda dmerged, coarse: coarse)

    def bprop(coarse, lateral, out, dout):
        return backward(dout, coarse), dout
    return kernel("UpsampleAdd", lambda coarse, lateral: lateral, bprop=bprop)


class UpsampleAdd(nn.Cell):
    """construct(coarse (N, C, h, w), lateral (N, C, H, W)) -> lateral + ops.interpolate(coarse, (H, W),
    mode="nearest"), with its gradient."""

    def __init__(self):
        super().__init__()
        self.uses_kernel = backend.enabled()
        self.kernel = _kernel() if self.uses_kernel else None
        self.onnx_export = backend.onnx_export()

    def construct(self, coarse, lateral):
        if self.uses_kernel:
            return self.kernel(coarse, lateral)
        if self.onnx_export:
            return lateral + ops.ResizeNearestNeighbor(lateral.shape[2:])(coarse)
        return lateral + ops.interpolate(coarse, size=lateral.shape[2:], mode="nearest")
