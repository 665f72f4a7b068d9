"""src/ops/conv.py: the oneDNN convolutions give MindSpore's results and gradients, and the model runs them
(the RoIAlign, assigner and mask-target kernels are tested against their MindSpore versions in test_roi_align.py,
test_bbox_assign_sample.py and test_rcnn_heads.py)."""
import ctypes

import numpy as np
import mindspore as ms
import pytest
from mindspore import nn, ops

from src import amp
from src.config import load_config
from src.maskrcnn.mask_rcnn_r50 import MaskRcnnResnet50
from src.ops import backend, conv

LAYERS = [  # (class, args, kwargs, input shape)
    ("Conv2d", (8, 16, 3), dict(pad_mode="pad", padding=1, has_bias=True), (2, 8, 10, 12)),
    ("Conv2d", (8, 16, 3), dict(stride=2, pad_mode="pad", padding=1), (2, 8, 11, 12)),
    ("Conv2d", (3, 16, 7), dict(stride=2, pad_mode="pad", padding=3), (2, 3, 20, 18)),
    ("Conv2d", (8, 5, 1), dict(has_bias=True), (2, 8, 6, 7)),                       # pad_mode "same"
    ("Conv2d", (8, 16, 1), dict(stride=2, pad_mode="pad", padding=0), (2, 8, 9, 12)),
    ("Conv2dTranspose", (8, 16, 2), dict(stride=2, pad_mode="valid", has_bias=True), (3, 8, 7, 7)),
]


class _Gradients(nn.Cell):
    """run(x) and the gradients of sum(run(x) * weights) with respect to x and to every parameter of `layer`: run is
    `call` of the layer: "plain" layer(x, active), "relu" layer.relu(x, active), "affine" layer.affine(x, scale,
    shift, True); `oracle` computes the same with MindSpore's operators, written out (not the layer's fallback
    path)."""

    def __init__(self, layer, call, oracle):
        super().__init__()
        self.layer, self.call, self.oracle = layer, call, oracle
        self.grad = ops.GradOperation(get_all=True, get_by_list=True)
        self.params = ms.ParameterTuple(layer.trainable_params())

    def run(self, x, scale, shift, active):
        if self.oracle:
            out = self.layer(x) if self.call != "affine" else (
                self.layer.conv2d(x, self.layer.weight) * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1))
            return out if self.call == "plain" else ops.relu(out)
        if self.call == "relu":
            return self.layer.relu(x, active)
        if self.call == "affine":
            return self.layer.affine(x, scale, shift, True)
        return self.layer(x, active)

    def construct(self, x, scale, shift, out_weights, active=None):
        return self.run(x, scale, shift, active), self.grad(
            lambda a: (self.run(a, scale, shift, active) * out_weights).sum(), self.params)(x)


CASES = [(layer, call) for layer in LAYERS for call in ("plain", "relu", "affine")
         if not (call == "affine" and layer[0] == "Conv2dTranspose")]


@pytest.mark.parametrize("layer, call", CASES)
def test_matches_mindspore_kernels_forward_and_backward(layer, call):
    """Bias and ReLU fused into the oneDNN call, a frozen per-channel affine folded into the weights: the same
    outputs and gradients (input, weights, bias) as MindSpore's operators."""
    cls, args, kwargs, shape = layer
    ms.set_seed(0)
    fast = getattr(conv, cls)(*args, **kwargs)
    with backend.use_mindspore_kernels():
        reference = getattr(conv, cls)(*args, **kwargs)
    assert fast.onednn is not None and reference.onednn is None
    for mine, theirs in zip(fast.get_parameters(), reference.get_parameters()):
        theirs.set_data(ms.Tensor(mine.asnumpy()))
    rng = np.random.default_rng(0)
    x = ms.Tensor(rng.standard_normal(shape).astype(np.float32))
    channels = fast.out_channels
    scale = ms.Tensor(rng.uniform(0.5, 2.0, channels).astype(np.float32))
    shift = ms.Tensor(rng.standard_normal(channels).astype(np.float32))
    out_weights = ms.Tensor(rng.standard_normal(fast(x).shape).astype(np.float32))
    out_fast, ((dx_fast,), dparams_fast) = _Gradients(fast, call, False)(x, scale, shift, out_weights)
    out_ref, ((dx_ref,), dparams_ref) = _Gradients(reference, call, True)(x, scale, shift, out_weights)
    assert call == "plain" or (out_ref.asnumpy() == 0).mean() > 0.2         # the ReLU does cut
    np.testing.assert_allclose(out_fast.asnumpy(), out_ref.asnumpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dx_fast.asnumpy(), dx_ref.asnumpy(), rtol=1e-4, atol=1e-4)
    assert len(dparams_fast) == len(dparams_ref) == (2 if kwargs.get("has_bias") else 1)
    for mine, theirs in zip(dparams_fast, dparams_ref):
        np.testing.assert_allclose(mine.asnumpy(), theirs.asnumpy(), rtol=1e-4, atol=1e-3)
    assert np.abs(dparams_fast[0].asnumpy()).max() > 0


@pytest.mark.parametrize("layer", [LAYERS[0], LAYERS[5]])
def test_an_inactive_call_skips_every_pass_and_an_active_one_is_the_plain_call(layer):
    """active 0: the output and every gradient are zeros (the kernels skip the passes); active 1: bit for bit the
    call without `active`. On MindSpore's operators `active` is ignored: both compute."""
    cls, args, kwargs, shape = layer
    ms.set_seed(0)
    fast = getattr(conv, cls)(*args, **kwargs)
    with backend.use_mindspore_kernels():
        reference = getattr(conv, cls)(*args, **kwargs)
    assert fast.skips_inactive and not reference.skips_inactive
    rng = np.random.default_rng(2)
    x = ms.Tensor(rng.standard_normal(shape).astype(np.float32))
    out_weights = ms.Tensor(rng.standard_normal(fast(x).shape).astype(np.float32))
    plain_out = fast.relu(x).asnumpy()
    plain_grads = _Gradients(fast, "relu", False)(x, None, None, out_weights)[1]
    results = {}
    for active in (0, 1):
        out, ((dx,), dparams) = _Gradients(fast, "relu", False)(x, None, None, out_weights, ms.Tensor(active, ms.int32))
        results[active] = [out.asnumpy(), dx.asnumpy()] + [d.asnumpy() for d in dparams]
    assert np.abs(plain_out).max() > 0 and all(np.abs(g.asnumpy()).max() > 0 for g in plain_grads[1])
    assert all((value == 0).all() for value in results[0])
    expected = [plain_out, plain_grads[0][0].asnumpy()] + [d.asnumpy() for d in plain_grads[1]]
    assert len(results[1]) == len(expected) == 3 + bool(kwargs.get("has_bias"))    # y, dx, dw[, db]
    for mine, plain in zip(results[1], expected):
        np.testing.assert_array_equal(mine, plain)
    ignored = _Gradients(reference, "relu", False)(x, None, None, out_weights, ms.Tensor(0, ms.int32))[0].asnumpy()
    np.testing.assert_array_equal(ignored, reference.relu(x).asnumpy())


@pytest.mark.parametrize("kwargs", [dict(stride=3, pad_mode="pad", padding=1),
                                    dict(pad_mode="pad", padding=(1, 1, 0, 0)),
                                    dict(dilation=2, pad_mode="pad", padding=2), dict(pad_mode="pad", padding=4)])
def test_geometries_without_kernels_use_mindspore(kwargs):
    layer = conv.Conv2d(4, 4, 3, **kwargs)
    assert layer.onednn is None
    assert layer(ms.Tensor(np.ones((1, 4, 9, 9), np.float32))).shape[:2] == (1, 4)


def test_switched_off_by_environment(monkeypatch):
    monkeypatch.setenv(backend.ENV_SWITCH, "mindspore")
    assert backend.library() is None and not backend.enabled()
    assert conv.Conv2d(4, 4, 3, pad_mode="pad", padding=1).onednn is None


def test_every_convolution_and_roi_pool_of_the_model_runs_on_the_kernels():
    """With the ISA uncapped, a MindSpore Conv2D left in the model would run as oneDNN's reference loop."""
    net = MaskRcnnResnet50(load_config("tiny"))
    assert net.box_roi_align.align.uses_kernel and net.mask_roi_align.align.uses_kernel
    convolutions = [cell for _, cell in net.cells_and_names() if isinstance(cell, (nn.Conv2d, nn.Conv2dTranspose))]
    assert len(convolutions) > 50
    assert all(isinstance(cell, (conv.Conv2d, conv.Conv2dTranspose)) and cell.onednn is not None
               for cell in convolutions)


@pytest.mark.parametrize("kwargs", [dict(has_bias=True), dict(has_bias=False)])
def test_transposed_conv_for_onnx_export_is_the_same_layer_as_a_matmul(kwargs):
    """The ONNX-export variant (kernel == stride: one output patch per input cell, as a matmul) gives MindSpore's
    Conv2dTranspose; outside an ONNX export the layer is unchanged."""
    ms.set_seed(0)
    with backend.use_mindspore_kernels():
        reference = conv.Conv2dTranspose(8, 16, 2, stride=2, pad_mode="valid", bias_init="normal", **kwargs)
    with backend.use_mindspore_kernels(onnx=True):
        exported = conv.Conv2dTranspose(8, 16, 2, stride=2, pad_mode="valid", **kwargs)
        padded = conv.Conv2dTranspose(8, 16, 3, stride=2, pad_mode="pad", padding=1)
    ms.load_param_into_net(exported, {p.name: p for p in reference.get_parameters()})
    assert exported.as_matmul and not reference.as_matmul and not padded.as_matmul
    x = ms.Tensor(np.random.default_rng(3).standard_normal((3, 8, 5, 7)).astype(np.float32))
    np.testing.assert_allclose(exported(x).asnumpy(), reference(x).asnumpy(), rtol=1e-5, atol=1e-5)


BF16_LAYERS = [LAYERS[0], LAYERS[2], LAYERS[5]]


@pytest.mark.parametrize("layer", BF16_LAYERS)
def test_bf16_math_stays_within_bfloat16_rounding_in_every_pass(layer):
    """With bf16 math the forward and both backward passes differ from float32 by bfloat16's input rounding only:
    8 mantissa bits (relative step 2^-8 = 0.4 %) on each product's inputs, accumulated in float32, so the error
    relative to the output's scale is well under 2 %. On a CPU with bf16 units they do differ (the mode is on)."""
    cls, args, kwargs, shape = layer
    ms.set_seed(0)
    layer_fp32 = getattr(conv, cls)(*args, **kwargs)
    layer_bf16 = getattr(conv, cls)(*args, **kwargs)
    for mine, theirs in zip(layer_fp32.get_parameters(), layer_bf16.get_parameters()):
        theirs.set_data(ms.Tensor(mine.asnumpy()))
    assert conv.set_bf16_math(layer_bf16, True) == 1
    rng = np.random.default_rng(1)
    x = ms.Tensor(rng.standard_normal(shape).astype(np.float32))
    out_weights = ms.Tensor(rng.standard_normal(layer_fp32(x).shape).astype(np.float32))
    scale = shift = ms.Tensor(np.ones(layer_fp32.out_channels, np.float32))
    results = [_Gradients(net, "plain", False)(x, scale, shift, out_weights) for net in (layer_fp32, layer_bf16)]
    (out32, ((dx32,), dp32)), (out16, ((dx16,), dp16)) = [
        (out.asnumpy(), ((dx.asnumpy(),), [p.asnumpy() for p in dp])) for out, ((dx,), dp) in results]
    differs = False
    for name, full, reduced in [("y", out32, out16), ("dx", dx32, dx16)] + [
            (f"dparam{i}", a, b) for i, (a, b) in enumerate(zip(dp32, dp16))]:
        error = np.abs(reduced - full).max() / np.abs(full).max()
        assert error < 2e-2, (name, error)
        differs |= error > 0
    assert differs == amp.cpu_has_bf16()


@pytest.mark.parametrize("bf16", [False, True])
def test_reordered_copies_live_in_mindspores_workspaces(bf16):
    """Each pass's reordered copies of its tensors and its scratchpad go to the workspaces MindSpore lends the call
    from its memory pool (kernels/conv.cpp's Init asks for them), not to buffers the library keeps for the whole
    run: after forward and backward passes that need reorders (plain NCHW tensors, oneDNN's blocked layouts
    inside), the library's kept buffers are still empty."""
    library = ctypes.CDLL(backend.library())
    library.ConvKeptBufferBytes.restype = ctypes.c_int64
    ms.set_seed(0)
    layer = conv.Conv2d(16, 32, 3, pad_mode="pad", padding=1, has_bias=True)
    assert conv.set_bf16_math(layer, bf16) == 1
    x = ms.Tensor(np.random.default_rng(2).standard_normal((2, 16, 24, 20)).astype(np.float32))
    out_weights = ms.Tensor(np.ones((2, 32, 24, 20), np.float32))
    scale = shift = ms.Tensor(np.ones(32, np.float32))
    out, ((dx,), (dw, db)) = _Gradients(layer, "plain", False)(x, scale, shift, out_weights)
    assert np.abs(dx.asnumpy()).max() > 0 and np.abs(dw.asnumpy()).max() > 0
    assert [library.ConvKeptBufferBytes(slot) for slot in range(4)] == [0, 0, 0, 0]
