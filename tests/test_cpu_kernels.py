"""src.cpu_kernels: the oneDNN convolutions give MindSpore's results and gradients, and the model runs them
(the RoIAlign kernel is tested against the table version in test_roi_align.py)."""
import numpy as np
import mindspore as ms
import pytest
from mindspore import nn, ops

from src import cpu_kernels
from src.config import load_config
from src.maskrcnn.mask_rcnn_r50 import MaskRcnnResnet50

LAYERS = [  # (class, args, kwargs, input shape)
    ("Conv2d", (8, 16, 3), dict(pad_mode="pad", padding=1, has_bias=True), (2, 8, 10, 12)),
    ("Conv2d", (8, 16, 3), dict(stride=2, pad_mode="pad", padding=1), (2, 8, 11, 12)),
    ("Conv2d", (3, 16, 7), dict(stride=2, pad_mode="pad", padding=3), (2, 3, 20, 18)),
    ("Conv2d", (8, 5, 1), dict(has_bias=True), (2, 8, 6, 7)),                       # pad_mode "same"
    ("Conv2d", (8, 16, 1), dict(stride=2, pad_mode="pad", padding=0), (2, 8, 9, 12)),
    ("Conv2dTranspose", (8, 16, 2), dict(stride=2, pad_mode="valid", has_bias=True), (3, 8, 7, 7)),
]


class _Gradients(nn.Cell):
    """Gradients of sum(layer(x) * weights) with respect to x and to every parameter."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer
        self.grad = ops.GradOperation(get_all=True, get_by_list=True)
        self.params = ms.ParameterTuple(layer.trainable_params())

    def construct(self, x, out_weights):
        return self.grad(lambda a, w: (self.layer(a) * w).sum(), self.params)(x, out_weights)


def test_the_library_builds_here():
    """Without it every CPU run silently falls back to the slower kernels."""
    assert cpu_kernels.library() is not None


@pytest.mark.parametrize("cls, args, kwargs, shape", LAYERS)
def test_matches_mindspore_kernels_forward_and_backward(cls, args, kwargs, shape):
    ms.set_seed(0)
    fast = getattr(cpu_kernels, cls)(*args, **kwargs)
    with cpu_kernels.mindspore_kernels():
        reference = getattr(cpu_kernels, cls)(*args, **kwargs)
    assert fast.onednn is not None and reference.onednn is None
    for mine, theirs in zip(fast.get_parameters(), reference.get_parameters()):
        theirs.set_data(ms.Tensor(mine.asnumpy()))
    rng = np.random.default_rng(0)
    x = ms.Tensor(rng.standard_normal(shape).astype(np.float32))
    expected = reference(x).asnumpy()
    out_weights = ms.Tensor(rng.standard_normal(expected.shape).astype(np.float32))
    np.testing.assert_allclose(fast(x).asnumpy(), expected, rtol=1e-4, atol=1e-5)
    (dx_fast, _), dparams_fast = _Gradients(fast)(x, out_weights)
    (dx_ref, _), dparams_ref = _Gradients(reference)(x, out_weights)
    np.testing.assert_allclose(dx_fast.asnumpy(), dx_ref.asnumpy(), rtol=1e-4, atol=1e-4)
    assert len(dparams_fast) == len(dparams_ref) == (2 if kwargs.get("has_bias") else 1)
    for mine, theirs in zip(dparams_fast, dparams_ref):
        np.testing.assert_allclose(mine.asnumpy(), theirs.asnumpy(), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("kwargs", [dict(stride=3, pad_mode="pad", padding=1),
                                    dict(pad_mode="pad", padding=(1, 1, 0, 0)),
                                    dict(dilation=2, pad_mode="pad", padding=2), dict(pad_mode="pad", padding=4)])
def test_geometries_without_kernels_use_mindspore(kwargs):
    layer = cpu_kernels.Conv2d(4, 4, 3, **kwargs)
    assert layer.onednn is None
    assert layer(ms.Tensor(np.ones((1, 4, 9, 9), np.float32))).shape[:2] == (1, 4)


def test_switched_off_by_environment(monkeypatch):
    monkeypatch.setenv(cpu_kernels.ENV_SWITCH, "mindspore")
    assert cpu_kernels.library() is None
    assert cpu_kernels.Conv2d(4, 4, 3, pad_mode="pad", padding=1).onednn is None


def test_every_convolution_and_roi_pool_of_the_model_runs_on_the_kernels():
    """With the ISA uncapped, a MindSpore Conv2D left in the model would run as oneDNN's reference loop."""
    net = MaskRcnnResnet50(load_config("tiny"))
    assert net.box_roi_align.kernel is not None and net.mask_roi_align.kernel is not None
    convolutions = [cell for _, cell in net.cells_and_names() if isinstance(cell, (nn.Conv2d, nn.Conv2dTranspose))]
    assert len(convolutions) > 50
    assert all(isinstance(cell, (cpu_kernels.Conv2d, cpu_kernels.Conv2dTranspose)) and cell.onednn is not None
               for cell in convolutions)
