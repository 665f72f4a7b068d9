"""MindSpore Hub entry point.

    net = create_network("maskrcnn", config="coco", is_training=False)

`config` is a preset name (configs/*.yaml), a YAML path or a src.config.Config (default: the recipe);
`is_training` selects the training construct (returns the recipe losses) or inference (detections).
"""
from src.config import Config, load_config

NETWORK_NAMES = ("maskrcnn", "maskrcnn_resnet50")


def create_network(name, *args, **kwargs):
    """MaskRcnnResnet50 for `name`, in training or inference mode; weights are left at initialisation."""
    if name not in NETWORK_NAMES:
        raise ValueError(f"unknown network '{name}'; this hub entry provides {', '.join(NETWORK_NAMES)}")
    if args:
        raise TypeError(f"create_network takes keyword options only (config, is_training), got {args!r}")
    unknown = sorted(set(kwargs) - {"config", "is_training"})
    if unknown:
        raise TypeError(f"unknown option(s) {unknown}; create_network accepts config and is_training")
    config = kwargs.get("config")
    cfg = config if isinstance(config, Config) else load_config(config)
    from src.maskrcnn.mask_rcnn_r50 import MaskRcnnResnet50

    net = MaskRcnnResnet50(cfg)
    net.set_train(bool(kwargs.get("is_training", False)))
    return net
