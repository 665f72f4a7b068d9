"""ResNet50 backbone: shapes, torchvision parameter names and count, freezing, and the from-scratch init."""
import re

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor, nn

from src.config import load_config
from src.maskrcnn.resnet50 import ResNet50, _norm
from src.ops import backend
from references import MOVING_STATS, analytic_resnet_count, learnable_count

RESNET50_PARAMS_WITHOUT_FC = 25_557_032 - (2048 * 1000 + 1000)     # torchvision resnet50 minus its fc
BN_LEAVES = {"gamma": "weight", "beta": "bias", "moving_mean": "running_mean", "moving_variance": "running_var"}


def torchvision_names(cfg):
    names = ["conv1.weight"] + [f"bn1.{leaf}" for leaf in BN_LEAVES.values()]
    for k, depth in enumerate(cfg.backbone.resnet_block, start=1):
        for i in range(depth):
            prefix = f"layer{k}.{i}"
            for j in (1, 2, 3):
                names += [f"{prefix}.conv{j}.weight"] + [f"{prefix}.bn{j}.{leaf}" for leaf in BN_LEAVES.values()]
            if i == 0:
                names += [f"{prefix}.downsample.0.weight"]
                names += [f"{prefix}.downsample.1.{leaf}" for leaf in BN_LEAVES.values()]
    return set(names)


def to_torchvision(name):
    head, leaf = name.rsplit(".", 1)
    return f"{head}.{BN_LEAVES.get(leaf, leaf)}"


class BackboneGrad(nn.Cell):
    """Loss = sum of the mean of each output; returns (loss, features, d loss / d image, d loss / d trainable)."""

    def __init__(self, net):
        super().__init__()
        self.net = net
        self.weights = net.trainable_params()
        self.grad_fn = ms.value_and_grad(self.forward, grad_position=0, weights=self.weights, has_aux=True)

    def forward(self, image):
        feats = self.net(image)
        return feats[0].mean() + feats[1].mean() + feats[2].mean() + feats[3].mean(), feats

    def construct(self, image):
        (loss, feats), (image_grad, weight_grads) = self.grad_fn(image)
        return loss, feats, image_grad, weight_grads


@pytest.fixture(scope="module")
def tiny():
    """The tiny preset at a quarter of its input area: the full ResNet50, but cheap on this CPU."""
    return load_config("tiny", {"data.img_height": 64, "data.img_width": 96})


@pytest.fixture(scope="module")
def backbone(tiny):
    """A backbone as built, never wrapped (a parent cell prefixes parameter names) nor trained."""
    return ResNet50(tiny)


@pytest.fixture(scope="module")
def image(tiny):
    rng = np.random.RandomState(0)
    return Tensor(rng.randn(2, 3, tiny.data.img_height, tiny.data.img_width).astype(np.float32))


@pytest.fixture(scope="module")
def grad_net(tiny):
    ms.set_seed(0)
    return BackboneGrad(ResNet50(tiny))


@pytest.fixture(scope="module")
def first_step(grad_net, image):
    return [out for out in grad_net(image)]


def test_output_shapes_follow_strides_and_channels(tiny, first_step):
    _, feats, _, _ = first_step
    h, w = tiny.data.img_height, tiny.data.img_width
    expected = [(2, c, h // s, w // s) for c, s in zip(tiny.backbone.resnet_out_channels, (4, 8, 16, 32))]
    assert [tuple(f.shape) for f in feats] == expected


def test_parameter_names_map_one_to_one_onto_torchvision(backbone, tiny):
    names = [p.name for p in backbone.get_parameters()]
    assert len(names) == len(set(names))
    assert {to_torchvision(n) for n in names} == torchvision_names(tiny)


def test_parameter_count_is_resnet50_without_fc():
    recipe = load_config()
    count = learnable_count(ResNet50(recipe).get_parameters())
    assert count == analytic_resnet_count(recipe) == RESNET50_PARAMS_WITHOUT_FC


def test_stem_and_stage1_frozen_and_bn_affine_frozen(backbone):
    frozen = re.compile(r"^(conv1|bn1|layer1)\.")
    for p in backbone.get_parameters():
        is_bn = p.name.rsplit(".", 1)[1] in BN_LEAVES
        assert p.requires_grad == (not frozen.match(p.name) and not is_bn), p.name
    trainable = {p.name for p in backbone.trainable_params()}
    assert trainable and all(n.startswith(("layer2", "layer3", "layer4")) and n.endswith("weight")
                             for n in trainable)


def test_no_gradient_reaches_frozen_layers_and_trainable_ones_get_it(grad_net, image, first_step):
    _, _, image_grad, weight_grads = first_step
    # stop_gradient after stage 1: nothing flows back into the stem, not even to the input.
    assert not np.any(image_grad.asnumpy())
    grads = {p.name.split(".", 1)[1]: g.asnumpy() for p, g in zip(grad_net.weights, weight_grads)}
    assert all(np.all(np.isfinite(g)) for g in grads.values())
    # The zero-initialised last conv of each trainable branch and every projection shortcut learn at once;
    # the earlier branch convs see no gradient yet because the branch output is still zero.
    for name, grad in grads.items():
        starts_learning = name.endswith(("conv3.weight", "downsample.0.weight"))
        assert np.any(grad) == starts_learning, name

    # One SGD step on the last convs wakes up the rest of each branch (same compiled graph, new values).
    for p in grad_net.weights:
        if p.name.endswith("conv3.weight"):
            p.set_data(Tensor(p.asnumpy() - 1.0 * grads[p.name.split(".", 1)[1]]))
    _, _, _, second_grads = grad_net(image)
    second = {p.name: g.asnumpy() for p, g in zip(grad_net.weights, second_grads)}
    assert all(np.any(g) for g in second.values())


def test_zero_initialised_branches_only_in_trainable_stages(backbone):
    params = {p.name: p.asnumpy() for p in backbone.get_parameters()}
    for name, value in params.items():
        if name.endswith("conv3.weight"):
            assert np.any(value) == name.startswith("layer1."), name
        if name.endswith("bn3.gamma"):
            assert np.all(value == 1.0), name


def test_trainable_batch_norm_zero_inits_last_gamma_instead():
    cfg = load_config("tiny", {"backbone.freeze_bn": False, "backbone.frozen_stages": 0})
    params = {p.name: p for p in ResNet50(cfg).get_parameters()}
    for name, p in params.items():
        if name.endswith("bn3.gamma"):
            assert not np.any(p.asnumpy()) and p.requires_grad, name
        if name.endswith("conv3.weight"):
            assert np.any(p.asnumpy()), name
    assert params["conv1.weight"].requires_grad and params["layer1.0.bn1.gamma"].requires_grad


def test_frozen_stages_keep_batch_norm_frozen_even_when_freeze_bn_is_off():
    cfg = load_config("tiny", {"backbone.freeze_bn": False, "backbone.frozen_stages": 1})
    net = ResNet50(cfg)
    frozen_bns = [net.bn1, net.layer1[0].bn3, net.layer1[0].downsample[1]]
    trainable_bns = [net.layer2[0].bn1, net.layer4[2].bn3]
    assert all(bn.use_batch_statistics is False and not bn.gamma.requires_grad for bn in frozen_bns)
    assert all(bn.use_batch_statistics is None and bn.gamma.requires_grad for bn in trainable_bns)


def test_activations_stay_bounded_through_50_layers(first_step):
    _, feats, _, _ = first_step
    rms = [float(np.sqrt(np.mean(f.asnumpy() ** 2))) for f in feats]
    # Kaiming branches behind identity BatchNorms grow the rms to ~30 by c5; zero branches keep it O(0.1..1).
    assert all(0.02 < r < 2.0 for r in rms), rms


@pytest.mark.parametrize("freeze_bn", [True, False])
def test_frozen_batch_norm_uses_moving_statistics_in_training(freeze_bn):
    bn = _norm(4, "batch", freeze_bn)
    bn.set_train(True)
    x = np.random.RandomState(1).normal(5.0, 3.0, (2, 4, 6, 6)).astype(np.float32)
    out = bn(Tensor(x)).asnumpy()
    moving_mean = bn.moving_mean.asnumpy()
    if freeze_bn:
        np.testing.assert_allclose(out, x / np.sqrt(1.0 + bn.eps), rtol=1e-5, atol=1e-5)
        assert not np.any(moving_mean)
    else:
        assert abs(out.mean()) < 1e-3 and np.any(moving_mean)


def test_group_norm_backbone_normalises_each_image_alike_in_training_and_test():
    cfg = load_config("tiny", {"backbone.norm": "group", "backbone.freeze_bn": False, "backbone.frozen_stages": 0})
    net = ResNet50(cfg)
    params = list(net.get_parameters())
    assert not any(p.name.endswith(MOVING_STATS) for p in params)
    assert learnable_count(params) == analytic_resnet_count(cfg)          # same names and sizes as BatchNorm
    assert all(not np.any(p.asnumpy()) for p in params if p.name.endswith("bn3.gamma"))
    rng = np.random.RandomState(2)
    image = rng.normal(size=(1, 3, 64, 64)).astype(np.float32)
    other = rng.normal(3.0, 5.0, size=(1, 3, 64, 64)).astype(np.float32)
    for param in params:                           # a trained-looking net: no zero branches
        if param.name.endswith("bn3.gamma"):
            param.set_data(Tensor(np.ones(param.shape, np.float32)))
    net.set_train(True)
    alone = net(Tensor(image))[3].asnumpy()
    paired = net(Tensor(np.concatenate([image, other])))[3].asnumpy()[:1]
    net.set_train(False)
    tested = net(Tensor(image))[3].asnumpy()
    np.testing.assert_allclose(paired, alone, rtol=1e-4, atol=1e-5)     # the batch does not matter
    np.testing.assert_allclose(tested, alone, rtol=1e-4, atol=1e-5)     # nor does train vs test mode
    assert np.abs(alone).max() > 0


def test_frozen_group_norm_keeps_its_affine_fixed():
    norm = _norm(64, "group", frozen=True)
    assert isinstance(norm, nn.GroupNorm) and norm.num_groups == 32
    assert not norm.gamma.requires_grad and not norm.beta.requires_grad
    assert _norm(8, "group", frozen=False).num_groups == 8                # narrow test widths: gcd(32, c)


def test_frozen_batch_norms_folded_into_the_kernels_give_the_same_features_and_gradients(tiny, image):
    """On our CPU kernels a frozen BatchNorm (and the ReLU after it) runs inside its convolution; MindSpore's
    BatchNorm and ReLU operators must give the same features and gradients."""
    ms.set_seed(0)             # the draws must not depend on which tests ran before in this process
    folded = ResNet50(tiny)
    with backend.use_mindspore_kernels():
        separate = ResNet50(tiny)
    assert folded.fold_stem and folded.layer2[0].fold and not separate.layer2[0].fold
    rng = np.random.default_rng(0)
    for mine, theirs in zip(folded.get_parameters(), separate.get_parameters()):
        value = mine.asnumpy()
        if mine.name.endswith(("gamma", "moving_variance")):
            value = rng.uniform(0.5, 1.5, value.shape)
        elif mine.name.endswith(("beta", "moving_mean")):
            value = rng.normal(0.0, 0.2, value.shape)
        elif not value.any():                                   # zero-start branches: make them count
            value = rng.normal(0.0, 0.02, value.shape)
        mine.set_data(Tensor(value.astype(np.float32)))
        theirs.set_data(Tensor(value.astype(np.float32)))
    _, feats, image_grad, weight_grads = BackboneGrad(folded)(image)
    _, feats_ref, image_grad_ref, weight_grads_ref = BackboneGrad(separate)(image)
    for mine, theirs in zip(feats, feats_ref):
        np.testing.assert_allclose(mine.asnumpy(), theirs.asnumpy(), rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(image_grad.asnumpy(), image_grad_ref.asnumpy(), rtol=1e-3, atol=1e-9)
    assert not image_grad.asnumpy().any()                        # the stem is frozen: no gradient reaches the image
    assert len(weight_grads) == len(weight_grads_ref) > 0
    # The two paths round differently, so a pre-activation within rounding of zero can pass one path's ReLU and
    # not the other's, which moves its channel's gradients: up to ~1e-3 of a gradient's largest value for some
    # weight draws (seed 3: 240 gradients of one output channel of layer2.1.conv1), ~1e-6 for most, seed 0 here
    # included. A folding error (a wrong scale or shift) moves whole channels by about that largest value.
    for mine, theirs in zip(weight_grads, weight_grads_ref):
        scale = np.abs(theirs.asnumpy()).max()
        assert scale > 0
        np.testing.assert_allclose(mine.asnumpy(), theirs.asnumpy(), rtol=1e-3, atol=1e-4 * scale)
