"""train.init: the recipe's first weights, and torchvision 0.29's (src/maskrcnn/init_scheme.py)."""
import math

import mindspore as ms
import numpy as np
import pytest

from src.config import ConfigError, load_config
from src.maskrcnn.fpn_neck import FeatPyramidNeck
from src.maskrcnn.rcnn_cls import RcnnCls
from src.maskrcnn.rcnn_mask import RcnnMask
from src.maskrcnn.resnet50 import ResNet50

GROUP_NORM = {"backbone.norm": "group", "backbone.frozen_stages": 0, "backbone.freeze_bn": False}


def _cells(init):
    ms.set_seed(0)
    cfg = load_config("tiny", {**GROUP_NORM, "train.init": init})
    return cfg, ResNet50(cfg), FeatPyramidNeck(cfg), RcnnCls(cfg), RcnnMask(cfg)


@pytest.fixture(scope="module")
def recipe():
    return _cells("recipe")


@pytest.fixture(scope="module")
def torchvision():
    return _cells("torchvision")


def _np(parameter):
    return parameter.asnumpy().astype(np.float64)


def _last_branch_gammas(resnet):
    return [_np(block.bn3.gamma) for stage in (resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4)
            for block in stage]


def _inside(values, bound):
    """|values| <= bound, up to float32 rounding of the bound."""
    return np.abs(values).max() <= bound * (1 + 1e-6)


def _uniform_bound_kept(values, bound):
    """Drawn from U(-bound, bound): inside it, and its standard deviation bound / sqrt(3) within 3 %."""
    return _inside(values, bound) and abs(values.std() / (bound / math.sqrt(3)) - 1) < 0.03


def test_recipe_starts_residual_branches_at_zero_and_the_predictors_small(recipe):
    cfg, resnet, fpn, box, mask = recipe
    assert all(not gamma.any() for gamma in _last_branch_gammas(resnet))
    lateral = _np(fpn.lateral_convs[3].weight)                        # 2048 -> C, 1x1: Xavier uniform
    out_channels, in_channels = lateral.shape[:2]
    assert _uniform_bound_kept(lateral, math.sqrt(6.0 / (in_channels + out_channels)))
    assert abs(_np(box.cls_score.weight).std() / 0.01 - 1) < 0.1
    assert abs(_np(mask.mask_fcn_logits.weight).std() / 0.001 - 1) < 0.1
    for layer in (box.fc6, box.fc7, box.cls_score, box.bbox_pred, mask.conv5_mask, mask.mask_fcn_logits):
        assert not _np(layer.bias).any()


def test_torchvision_init_follows_torchvision_s_initialisers(torchvision):
    cfg, resnet, fpn, box, mask = torchvision
    assert all((gamma == 1).all() for gamma in _last_branch_gammas(resnet))
    for conv in list(fpn.lateral_convs) + list(fpn.fpn_convs):       # kaiming_uniform_(a=1), bias 0
        weight = _np(conv.weight)
        fan_in = weight[0].size
        assert _uniform_bound_kept(weight, math.sqrt(3.0 / fan_in)) and not _np(conv.bias).any()
    for layer in (box.fc6, box.fc7, box.cls_score, box.bbox_pred):   # nn.Linear: U(+-1/sqrt(fan_in)) for both
        weight = _np(layer.weight)
        bound = 1.0 / math.sqrt(weight.shape[1])
        assert _uniform_bound_kept(weight, bound)
        assert _inside(_np(layer.bias), bound) and _np(layer.bias).any()
    logits = _np(mask.mask_fcn_logits.weight)                         # kaiming_normal_(fan_out): sqrt(2 / C)
    assert abs(logits.std() / math.sqrt(2.0 / cfg.num_classes) - 1) < 0.1
    bias = _np(mask.mask_fcn_logits.bias)
    assert bias.any() and _inside(bias, 1.0 / math.sqrt(logits.shape[1]))
    upsample_bias = _np(mask.conv5_mask.bias)                         # ConvTranspose2d's fan_in: out x k x k
    assert upsample_bias.any() and _inside(upsample_bias, 1.0 / math.sqrt(mask.conv5_mask.weight.shape[1] * 4))


def test_the_schemes_differ_only_where_the_table_says(recipe, torchvision):
    """Under one seed every backbone convolution gets the same weights in both schemes (they are built before
    any layer the schemes draw differently); the mask head's convs, built after the box head's extra bias draws,
    come from the same distribution."""
    convs = [(mine, theirs) for mine, theirs in zip(recipe[1].get_parameters(), torchvision[1].get_parameters())
             if mine.name.endswith("weight") and mine.ndim == 4]
    assert len(convs) == 53                                         # stem + 16 blocks x 3 + 4 projections
    for mine, theirs in convs:
        assert mine.name == theirs.name and np.array_equal(mine.asnumpy(), theirs.asnumpy()), mine.name
    for index in range(1, 5):
        mine, theirs = (_np(getattr(cells[4], f"mask_fcn{index}").weight) for cells in (recipe, torchvision))
        assert abs(mine.std() / theirs.std() - 1) < 0.05


def test_an_unknown_scheme_is_refused_naming_the_key():
    with pytest.raises(ConfigError, match="train.init.*recipe, torchvision.*'kaiming'"):
        load_config("tiny", {"train.init": "kaiming"})


def test_only_the_torchvision_preset_takes_torchvision_s_first_weights():
    assert [load_config(preset).train.init for preset in ("coco", "tiny", "demo", "torchvision")] == [
        "recipe", "recipe", "recipe", "torchvision"]
