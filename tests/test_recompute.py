"""train.recompute: the parts it names recompute their activations in the backward pass, and that changes no
gradient; unknown parts are refused naming the key. (Memory at the recipe size: bench/results.md.)"""
import numpy as np
import mindspore as ms
import pytest
from mindspore import Tensor, nn, ops

from src.config import ConfigError, load_config
from src.maskrcnn.mask_rcnn_r50 import MaskRcnnResnet50
from src.maskrcnn.rcnn_mask import RcnnMask
from src.maskrcnn.resnet50 import Bottleneck


class _WeightedSum(nn.Cell):
    """sum(cell(x) * weights): a scalar whose gradient reaches every input and parameter of `cell`."""

    def __init__(self, cell, weights):
        super().__init__()
        self.cell, self.weights = cell, weights

    def construct(self, x):
        return (self.cell(x) * self.weights).sum()


def _gradients(make_cell, input_shape, output_shape, recompute):
    ms.set_seed(0)
    cell = make_cell()
    if recompute:
        cell.recompute()
    rng = np.random.default_rng(0)
    x = Tensor(rng.standard_normal(input_shape).astype(np.float32))
    net = _WeightedSum(cell, Tensor(rng.standard_normal(output_shape).astype(np.float32)))
    params = net.trainable_params()
    input_grad, param_grads = ms.grad(net, grad_position=0, weights=params)(x)
    return [input_grad.asnumpy()] + [g.asnumpy() for g in param_grads]


@pytest.mark.parametrize("part", ["backbone block", "mask head"])
def test_recomputed_cells_give_the_same_gradients(tiny, part):
    if part == "backbone block":       # strided, with a downsample branch and GroupNorm: every path of a block
        make = lambda: Bottleneck(64, 128, 2, "group", False, False)  # noqa: E731
        shapes = (2, 64, 16, 24), (2, 128, 8, 12)
    else:
        make = lambda: RcnnMask(tiny)  # noqa: E731
        shapes = (6, 256, 14, 14), (6, tiny.num_classes, 28, 28)
    kept, recomputed = _gradients(make, *shapes, False), _gradients(make, *shapes, True)
    assert len(kept) == len(recomputed) > 4
    for a, b in zip(kept, recomputed):
        np.testing.assert_array_equal(a, b)
        assert np.abs(a).max() > 0


def test_the_config_names_which_cells_recompute(tiny_cfg, monkeypatch):
    marked = []
    monkeypatch.setattr(nn.Cell, "recompute", lambda self, **kwargs: marked.append(self))
    MaskRcnnResnet50(tiny_cfg)
    assert marked == []
    tiny_cfg.train.recompute = ["backbone"]
    net = MaskRcnnResnet50(tiny_cfg)
    assert len(marked) == 16 and all(isinstance(cell, Bottleneck) for cell in marked)
    assert {id(cell) for cell in marked} == {id(cell) for _, cell in net.backbone.cells_and_names()
                                             if isinstance(cell, Bottleneck)}
    marked.clear()
    tiny_cfg.train.recompute = ["mask_head"]
    net = MaskRcnnResnet50(tiny_cfg)
    assert marked == [net.rcnn_mask]


def test_unknown_parts_are_refused_naming_the_key():
    assert load_config("tiny", {"train.recompute": "backbone,mask_head"}).train.recompute == ["backbone", "mask_head"]
    with pytest.raises(ConfigError, match=r"train\.recompute.*backbone, mask_head.*'neck'"):
        load_config("tiny", {"train.recompute": "backbone,neck"})
