"""Initial weights for training from scratch: `train.init` recipe (ours) or torchvision (torchvision 0.29's).

| layers | recipe | torchvision |
|---|---|---|
| backbone convolutions, norms | Kaiming normal (fan_out); norm gamma 1, beta 0 | the same |
| last norm (or conv) of a trainable residual branch | zero: the block starts as the identity (resnet50.py) | gamma 1 |
| FPN lateral and output convs | Xavier uniform, bias 0 | Kaiming uniform (a=1): U(+-sqrt(3 / fan_in)), bias 0 |
| RPN head | N(0, 0.01), bias 0 | the same |
| box head fc6, fc7 | Xavier uniform, bias 0 | nn.Linear's: U(+-1 / sqrt(fan_in)) weight and bias |
| box classifier / regressor | N(0, 0.01) / N(0, 0.001), bias 0 | nn.Linear's |
| mask convs, conv5_mask weight | Kaiming normal (fan_out), bias 0 | the same; conv5_mask bias U(+-1/sqrt(fan_in)) |
| mask logits | N(0, 0.001), bias 0 | Kaiming normal (fan_out): std sqrt(2 / classes); bias U(+-1 / sqrt(fan_in)) |

Only the first weights differ; a converted or resumed checkpoint overwrites them all.
"""
import math

from mindspore.common.initializer import HeNormal, HeUniform, Normal, Uniform, XavierUniform

RECIPE, TORCHVISION = "recipe", "torchvision"
CLS_INIT_STD = 0.01
REG_INIT_STD = 0.001
MASK_LOGITS_INIT_STD = 0.001
TORCH_LINEAR_SLOPE = math.sqrt(5)       # nn.Linear / nn.Conv2d reset_parameters: kaiming_uniform_(a=sqrt(5))


def zero_residual_branches(cfg) -> bool:
    return cfg.train.init == RECIPE


def fpn_weight(cfg):
    if cfg.train.init == TORCHVISION:
        return HeUniform(negative_slope=1, mode="fan_in", nonlinearity="leaky_relu")
    return XavierUniform()


def _torch_default(fan_in):
    """(weight, bias) initialisers of torch's nn.Linear / nn.Conv2d for a layer of this fan-in."""
    return HeUniform(negative_slope=TORCH_LINEAR_SLOPE), Uniform(1.0 / math.sqrt(fan_in))


def box_hidden(cfg, fan_in):
    """(weight, bias) of fc6 / fc7."""
    return _torch_default(fan_in) if cfg.train.init == TORCHVISION else (XavierUniform(), "zeros")


def box_classifier(cfg, fan_in):
    return _torch_default(fan_in) if cfg.train.init == TORCHVISION else (Normal(CLS_INIT_STD), "zeros")


def box_regressor(cfg, fan_in):
    return _torch_default(fan_in) if cfg.train.init == TORCHVISION else (Normal(REG_INIT_STD), "zeros")


def mask_upsample_bias(cfg, fan_in):
    return Uniform(1.0 / math.sqrt(fan_in)) if cfg.train.init == TORCHVISION else "zeros"


def mask_logits(cfg, fan_in):
    """(weight, bias) of the 1x1 mask logits conv."""
    if cfg.train.init == TORCHVISION:
        return HeNormal(mode="fan_out", nonlinearity="relu"), Uniform(1.0 / math.sqrt(fan_in))
    return Normal(MASK_LOGITS_INIT_STD), "zeros"
