"""FPN neck: static output shapes, the top-down wiring against NumPy, init and parameter count."""
import numpy as np
import pytest
from mindspore import Tensor, nn

from src.config import load_config
from src.maskrcnn.fpn_neck import FeatPyramidNeck
from src.ops.layout import Layout, ToBlocked
from references import analytic_fpn_count


def numpy_neck(feats, lateral_w, lateral_b):
    """The neck with identity 3x3 convs: lateral 1x1, nearest 2x top-down sum, P6 = P5[::2, ::2]."""
    laterals = [np.einsum("oc,bchw->bohw", w, f) + b[None, :, None, None]
                for f, w, b in zip(feats, lateral_w, lateral_b)]
    merged = [laterals[-1]]
    for lateral in reversed(laterals[:-1]):
        merged.insert(0, lateral + merged[0].repeat(2, axis=2).repeat(2, axis=3))
    return merged + [merged[-1][:, :, ::2, ::2]]


@pytest.fixture(scope="module")
def narrow():
    """The tiny preset with a 16-channel pyramid, for the graph-mode runs (3x3 convs are slow on this CPU)."""
    return load_config("tiny", {"fpn.fpn_out_channels": 16, "roi.roi_align_out_channels": 16})


@pytest.fixture(scope="module")
def neck_run(narrow):
    """Runs the neck once with random laterals and identity 3x3 convs; returns (feats, laterals, outputs, neck)."""
    rng = np.random.RandomState(0)
    neck = FeatPyramidNeck(narrow)
    lateral_w, lateral_b = [], []
    for conv in neck.lateral_convs:
        out_c, in_c = conv.weight.shape[:2]
        w = rng.randn(out_c, in_c).astype(np.float32) / np.sqrt(in_c)
        b = rng.randn(out_c).astype(np.float32)
        conv.weight.set_data(Tensor(w[:, :, None, None]))
        conv.bias.set_data(Tensor(b))
        lateral_w.append(w)
        lateral_b.append(b)
    for conv in neck.fpn_convs:
        identity = np.zeros(conv.weight.shape, np.float32)
        identity[np.arange(identity.shape[0]), np.arange(identity.shape[0]), 1, 1] = 1.0
        conv.weight.set_data(Tensor(identity))
    feats = [rng.randn(2, c, h, w).astype(np.float32)
             for c, (h, w) in zip(narrow.fpn.fpn_in_channels, narrow.feature_shapes)]
    outs = neck(tuple(Tensor(f) for f in feats))
    return feats, (lateral_w, lateral_b), [o.asnumpy() for o in outs], neck


def test_outputs_have_the_static_feature_shapes(narrow, neck_run):
    _, _, outs, _ = neck_run
    assert [o.shape for o in outs] == [(2, narrow.fpn.fpn_out_channels, h, w) for h, w in narrow.feature_shapes]


def test_top_down_pathway_matches_numpy(neck_run):
    feats, (lateral_w, lateral_b), outs, _ = neck_run
    for level, (got, want) in enumerate(zip(outs, numpy_neck(feats, lateral_w, lateral_b))):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4, err_msg=f"P{level + 2}")


def test_p6_covers_an_odd_sized_p5():
    cfg = load_config("tiny", {"data.img_height": 96,            # P5 has 3 rows, P6 ceil(3 / 2) = 2
                               "fpn.fpn_out_channels": 16, "roi.roi_align_out_channels": 16})
    assert cfg.feature_shapes[3][0] == 3 and cfg.feature_shapes[4][0] == 2
    neck = FeatPyramidNeck(cfg)
    feats = tuple(Tensor(np.ones((1, c, h, w), np.float32))
                  for c, (h, w) in zip(cfg.fpn.fpn_in_channels, cfg.feature_shapes))
    assert neck(feats)[4].shape == (1, cfg.fpn.fpn_out_channels) + tuple(cfg.feature_shapes[4])


def test_xavier_uniform_weights_and_zero_bias(tiny):
    neck = FeatPyramidNeck(tiny)
    for conv in list(neck.lateral_convs) + list(neck.fpn_convs):
        w = conv.weight.asnumpy()
        fan_in, fan_out = w.shape[1] * w.shape[2] * w.shape[3], w.shape[0] * w.shape[2] * w.shape[3]
        bound = np.float32(np.sqrt(6.0 / (fan_in + fan_out)))     # weights are drawn and held in float32
        assert np.abs(w).max() <= bound * (1 + 1e-6) and np.abs(w).max() > 0.9 * bound
        np.testing.assert_allclose(w.std(), bound / np.sqrt(3.0), rtol=0.05)
        assert not np.any(conv.bias.asnumpy())


def test_parameter_names_and_count(tiny):
    neck = FeatPyramidNeck(tiny)
    params = list(neck.get_parameters())
    levels = range(len(tiny.fpn.fpn_in_channels))
    assert {p.name for p in params} == {f"{kind}.{i}.{leaf}" for kind in ("lateral_convs", "fpn_convs")
                                        for i in levels for leaf in ("weight", "bias")}
    assert sum(int(np.prod(p.shape)) for p in params) == analytic_fpn_count(tiny) == 3_344_384


class _BlockedInputs(nn.Cell):
    """The neck fed the c's held blocked, as the backbone hands them over on our CPU kernels."""

    def __init__(self, neck):
        super().__init__()
        self.neck = neck
        self.to_blocked = ToBlocked()

    def construct(self, feats):
        return self.neck((self.to_blocked(feats[0]), self.to_blocked(feats[1]), self.to_blocked(feats[2]),
                          self.to_blocked(feats[3])))


def test_blocked_inputs_give_the_same_pyramid(narrow, neck_run):
    feats, _, outs, plain_neck = neck_run
    neck = FeatPyramidNeck(narrow)
    for mine, theirs in zip(neck.get_parameters(), plain_neck.get_parameters()):
        mine.set_data(Tensor(theirs.asnumpy()))
    for conv in neck.lateral_convs:
        conv.hold(input_layout=Layout.BLOCKED)
    blocked_outs = _BlockedInputs(neck)(tuple(Tensor(f) for f in feats))
    for mine, theirs in zip(blocked_outs, outs):
        np.testing.assert_allclose(mine.asnumpy(), theirs, rtol=1e-5, atol=1e-5)
