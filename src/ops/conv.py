"""Convolutions: nn.Conv2d / nn.Conv2dTranspose on oneDNN's AVX-512 kernels (kernels/conv.cpp), MindSpore's own
operators otherwise.

MindSpore's CPU Conv2D passes oneDNN plain OIHW weights, which leaves it AVX2 at best (backend.py); ours let oneDNN
pick its layouts (bench/bench_conv.py measures the difference), run bias, ReLU and a folded frozen BatchNorm inside
the call, and can hand oneDNN's blocked tensors from one convolution to the next (layout.py). The layers keep
nn.Conv2d's parameters, so checkpoints do not change.

Mixed precision (`set_bf16_math`, chosen by src/amp.py): the layers keep float32 tensors and weights, and their
products may round the inputs to bfloat16 with float32 accumulation (oneDNN's fpmath mode bf16: AMX / AVX512-BF16
kernels where the CPU has them). It applies to every pass, forward and both backward ones.
"""
import mindspore as ms
import numpy as np
from mindspore import nn, ops
from mindspore.ops.operations._grad_ops import ReluGrad

from src.ops import backend, constants
from src.ops.custom import kernel
from src.ops.layout import Layout, blockable


def _geometry(layer):
    """(stride, padding) of an nn.Conv2d / nn.Conv2dTranspose if the library has kernels for it, else None."""
    if not backend.enabled() or layer.group != 1 or layer.data_format != "NCHW" or set(layer.dilation) != {1}:
        return None
    if layer.pad_mode == "valid":
        pads = {0}
    elif layer.pad_mode == "same":             # with stride 1 and an odd kernel: (k - 1) / 2 on every side
        if set(layer.stride) != {1} or not all(k % 2 for k in layer.kernel_size):
            return None
        pads = {(k - 1) // 2 for k in layer.kernel_size}
    else:
        pads = {layer.padding} if isinstance(layer.padding, int) else set(layer.padding)
    strides = set(layer.stride)
    if (len(strides) != 1 or len(pads) != 1 or not strides <= set(constants.CONV_STRIDES)
            or not pads <= set(constants.CONV_PADDINGS)):
        return None
    return strides.pop(), pads.pop()


def _backward_weights_kernel(stride, pad):
    """(x, dy, w, s, flags) -> (dw, db): the weight and bias gradients of conv(x, w * s) + b (w gives dw's
    shape; flags: see _flags)."""
    return kernel(f"ConvBackwardWeightsS{stride}P{pad}", lambda x, dy, w, s, flags: [w, [w[0]]],
                   lambda x, dy, w, s, flags: [w, w])


_relu_gradient = ReluGrad()


def _conv_forward(stride, pad, relu):
    """Convolution with filters scaled per output channel, + bias (+ ReLU): (x, w, b, s, flags) ->
    conv(x, w * s) + b, with its gradient (none to s); flags: see _flags."""
    geometry = f"S{stride}P{pad}"
    backward_data = kernel("ConvBackwardData" + geometry, lambda dy, w, x, s, flags: x)
    backward_weights = _backward_weights_kernel(stride, pad)

    def shape(x, w, b, s, flags):
        return [x[0], w[0], (x[2] + 2 * pad - w[2]) // stride + 1, (x[3] + 2 * pad - w[3]) // stride + 1]

    def bprop(x, w, b, s, flags, out, dout):
        if relu:
            dout = _relu_gradient(dout, out)   # from the ReLU's output (the same layout: elementwise)
        dw, db = backward_weights(x, dout, w, s, flags)
        return backward_data(dout, w, x, s, flags), dw, db, ops.zeros_like(s), ops.zeros_like(flags)
    return kernel(("ConvReluForward" if relu else "ConvForward") + geometry, shape, bprop=bprop)


def _deconv_forward(stride, pad, relu):
    """Transposed convolution + bias (+ ReLU) (x, w, b, flags) -> y (NCHW; flags: see _flags, layouts plain), i.e.
    a convolution's backward-data pass: dx is a convolution of dy, and dw is a convolution's weight gradient with
    dy as its source."""
    conv_forward = _conv_forward(stride, pad, relu=False)
    backward_weights = _backward_weights_kernel(stride, pad)
    bias_gradient = kernel("BiasGrad", lambda dy: [dy[1]])        # dy (N, C, H, W) summed per channel

    def shape(x, w, b, flags):
        return [x[0], w[1], (x[2] - 1) * stride - 2 * pad + w[2], (x[3] - 1) * stride - 2 * pad + w[3]]

    def bprop(x, w, b, flags, out, dout):
        if relu:
            dout = _relu_gradient(dout, out)   # from the ReLU's output
        as_conv = ops.ones((w.shape[0],), ms.float32)               # w as a convolution's filters: w[0] outputs
        dw, _ = backward_weights(dout, x, w, as_conv, flags)
        return (conv_forward(dout, w, ops.zeros_like(as_conv), as_conv, flags), dw, bias_gradient(dout),
                ops.zeros_like(flags))
    return kernel(f"{'DeconvReluForward' if relu else 'DeconvForward'}S{stride}P{pad}", shape, bprop=bprop)


def _flags(input_layout=Layout.PLAIN, output_layout=Layout.PLAIN, bf16_math=False):
    """A call's flags (kernels/conv.cpp) as the shape of an int32 tensor, each dimension 2 for yes and 1 for no:
    input held blocked, output held blocked, bf16 math. A shape because the kernels' Init, which sizes the call's
    workspaces at graph compile time, sees the inputs' shapes but not their values."""
    shape = [2 if flag else 1 for flag in (input_layout is Layout.BLOCKED, output_layout is Layout.BLOCKED, bf16_math)]
    return ms.Tensor(np.zeros(shape, np.int32))


def _call_flags(flags, active):
    """A call's flags: the layer's (zeros: run), or with `active` (int32 scalar) given, 1 - active in every entry
    (nonzero: the kernels skip the call)."""
    return flags if active is None else flags + (1 - ops.cast(active, ms.int32))


def _layers(network: nn.Cell):
    return [cell for _, cell in network.cells_and_names() if isinstance(cell, (Conv2d, Conv2dTranspose))]


def set_bf16_math(network: nn.Cell, enabled: bool) -> int:
    """Let (or forbid) every convolution of `network` on the kernels compute its products in bfloat16 (see the
    module docstring); takes effect when the network's graph is next compiled. Returns how many layers run on
    the kernels (the others are MindSpore's float32 operators)."""
    for layer in _layers(network):
        layer.set_bf16_math(enabled)
    return kernel_convolutions(network)


def kernel_convolutions(network: nn.Cell) -> int:
    """How many convolutions of `network` run on our kernels."""
    return sum(layer.onednn is not None for layer in _layers(network))


class Conv2d(nn.Conv2d):
    """nn.Conv2d (same arguments, parameters and checkpoints) on the oneDNN kernels when `backend.enabled()`.

    Beyond nn.Conv2d: `relu(x)` = ReLU(self(x)) and `affine(x, scale, shift, relu)` = [ReLU](conv(x) * scale +
    shift) with per-output-channel scale and shift (a frozen BatchNorm folded in, the layer's bias ignored),
    each one oneDNN call with the bias and the ReLU fused into it when `fuses_affine`. On the kernels a layer
    may also read and write tensors held blocked (src/ops/layout.py), as set by `hold`, and compute in bf16
    (`set_bf16_math`).

    `self(x, active)` and `relu(x, active)` with an int32 scalar `active`: on the kernels (`skips_inactive`) a call
    with active 0 computes nothing, its output and gradients are zeros; elsewhere `active` is ignored.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        geometry = _geometry(self)
        self.onednn = None if geometry is None else _conv_forward(*geometry, relu=False)
        self.onednn_relu = None if geometry is None else _conv_forward(*geometry, relu=True)
        self.no_bias = ms.Tensor(np.zeros((self.out_channels,), np.float32))
        self.unit_scale = ms.Tensor(np.ones((self.out_channels,), np.float32))
        self.input_layout = self.output_layout = Layout.PLAIN
        self.bf16_math = False
        self.flags = _flags()

    @property
    def fuses_affine(self) -> bool:
        """Whether `affine` runs as one call with the scale, shift and ReLU inside (else it is written out)."""
        return self.onednn is not None

    @property
    def skips_inactive(self) -> bool:
        """Whether a call with active 0 skips its work (see the class docstring)."""
        return self.onednn is not None

    def can_hold(self, input_layout=None, output_layout=None) -> bool:
        """Whether this layer can read `input_layout` and write `output_layout` (None: either, unchanged)."""
        for layout, channels in ((input_layout, self.in_channels), (output_layout, self.out_channels)):
            if layout is Layout.BLOCKED and (self.onednn is None or not blockable(channels)):
                return False
        return True

    def hold(self, input_layout=None, output_layout=None):
        """Read the input / write the output in these layouts from now on (None: unchanged); a layer that cannot
        (not on the kernels, or channels not a multiple of the block) raises."""
        if not self.can_hold(input_layout, output_layout):
            raise ValueError(f"Conv2d({self.in_channels}, {self.out_channels}) cannot read {input_layout} / write "
                             f"{output_layout}: blocked tensors need our kernels and channels in blocks of "
                             f"{constants.BLOCK_CHANNELS}")
        self.input_layout = input_layout or self.input_layout
        self.output_layout = output_layout or self.output_layout
        self.flags = _flags(self.input_layout, self.output_layout, self.bf16_math)

    def set_bf16_math(self, enabled: bool):
        """Whether the products may round their inputs to bfloat16 (on the kernels only; float32 otherwise)."""
        self.bf16_math = bool(enabled)
        self.flags = _flags(self.input_layout, self.output_layout, self.bf16_math)

    def _run(self, x, bias, scale, relu, active=None):
        if self.onednn is None:
            weight = self.weight if scale is None else self.weight * scale.reshape(-1, 1, 1, 1)
            output = self.conv2d(x, weight)
            if bias is not None:
                output = self.bias_add(output, bias)
            return ops.relu(output) if relu else output
        bias = self.no_bias if bias is None else bias
        scale = self.unit_scale if scale is None else scale
        flags = _call_flags(self.flags, active)
        if relu:
            return self.onednn_relu(x, self.weight, bias, scale, flags)
        return self.onednn(x, self.weight, bias, scale, flags)

    def construct(self, x, active=None):
        return self._run(x, self.bias if self.has_bias else None, None, False, active)

    def relu(self, x, active=None):
        return self._run(x, self.bias if self.has_bias else None, None, True, active)

    def affine(self, x, scale, shift, relu):
        """[ReLU](conv(x) * scale + shift), scale and shift (out_channels,): the scale is folded into the weights
        (conv(x, w * scale) + shift; on the kernels while they are reordered), so it reaches the weight gradient
        (dw * scale) but gets none itself."""
        return self._run(x, shift, ops.stop_gradient(scale), relu)


class Conv2dTranspose(nn.Conv2dTranspose):
    """nn.Conv2dTranspose (same arguments, parameters and checkpoints) on the oneDNN kernels when `backend.enabled()`;
    `relu(x)` = ReLU(self(x)), fused; `active` as in Conv2d."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        geometry = _geometry(self) if self.pad_mode != "same" and self.output_padding == 0 else None
        self.onednn = None if geometry is None else _deconv_forward(*geometry, relu=False)
        self.onednn_relu = None if geometry is None else _deconv_forward(*geometry, relu=True)
        self.no_bias = ms.Tensor(np.zeros((self.out_channels,), np.float32))
        self.flags = _flags()
        # MindSpore's ONNX exporter writes ConvTranspose with a 4-d output_shape, which ONNX refuses
        self.as_matmul = backend.onnx_export() and self._is_patch_expansion()

    def _is_patch_expansion(self) -> bool:
        """Kernel == stride, no padding or dilation, one group: each input cell writes its own output patch."""
        return (tuple(self.kernel_size) == tuple(self.stride) and self.pad_mode == "valid" and self.group == 1
                and set(self.dilation) == {1} and self.output_padding == 0)

    def _patch_expansion(self, x):
        """The transposed convolution as one matmul: (N, C, H, W) -> (N, O, H * kh, W * kw)."""
        n, c, h, w = x.shape
        kh, kw = self.kernel_size
        out = self.out_channels
        patches = ops.matmul(x.transpose(0, 2, 3, 1).reshape(n * h * w, c), self.weight.reshape(c, out * kh * kw))
        output = patches.reshape(n, h, w, out, kh, kw).transpose(0, 3, 1, 4, 2, 5).reshape(n, out, h * kh, w * kw)
        return output + self.bias.reshape(1, out, 1, 1) if self.has_bias else output

    @property
    def skips_inactive(self) -> bool:
        """As Conv2d.skips_inactive."""
        return self.onednn is not None and not self.as_matmul

    def set_bf16_math(self, enabled: bool):
        """As Conv2d.set_bf16_math."""
        self.flags = _flags(bf16_math=enabled)

    def _run(self, x, relu, active=None):
        if self.as_matmul:
            output = self._patch_expansion(x)
            return ops.relu(output) if relu else output
        if self.onednn is None:
            output = super().construct(x)
            return ops.relu(output) if relu else output
        bias = self.bias if self.has_bias else self.no_bias
        onednn = self.onednn_relu if relu else self.onednn
        return onednn(x, self.weight, bias, _call_flags(self.flags, active))

    def construct(self, x, active=None):
        return self._run(x, False, active)

    def relu(self, x, active=None):
        return self._run(x, True, active)
