"""The inference network of the after-training scripts: graph mode on a device, weights from a checkpoint."""
from __future__ import annotations

import contextlib
import os
from typing import Optional


def setup_context(device_target: str, device_id: Optional[int] = None) -> str:
    """Graph mode on the chosen device (`auto`: the best available): the inference graph has static shapes
    and compiles once. Returns the device used."""
    from src.device import set_device

    return set_device(device_target, device_id)


def build_inference_net(cfg, checkpoint_path: str):
    """MaskRcnnResnet50 in inference mode with all weights from the checkpoint (strict names and shapes), at the
    precision of test.amp_level."""
    import mindspore as ms

    from src.amp import set_precision
    from src.checkpoint import load_model_weights
    from src.maskrcnn.mask_rcnn_r50 import MaskRcnnResnet50

    if not os.path.isfile(checkpoint_path):    # before the seconds spent building the network
        raise FileNotFoundError(f"checkpoint '{checkpoint_path}' does not exist")
    with _skip_initialisation():
        net = MaskRcnnResnet50(cfg)
    net.set_train(False)
    load_model_weights(checkpoint_path, net)
    return set_precision(net, cfg.test.amp_level, ms.get_context("device_target"))


def _skip_initialisation():
    """Parameters without their random initialisation (most of the seconds spent building the network): the
    strict load assigns every one of them or fails. MindSpore releases without the switch initialise."""
    try:
        from mindspore.nn.utils import no_init_parameters
    except ImportError:
        return contextlib.nullcontext()
    return no_init_parameters()
