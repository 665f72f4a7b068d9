"""src/inference.py: the inference network holds exactly the checkpoint's weights, although it is built
without initialising them."""
import numpy as np

from src.inference import build_inference_net

pytest_plugins = ["inference_fixtures"]


def test_inference_net_holds_the_checkpoint_weights(narrow_model):
    import mindspore as ms

    stored = {name: value.asnumpy() for name, value in ms.load_checkpoint(narrow_model.checkpoint).items()}
    net = build_inference_net(narrow_model.cfg, narrow_model.checkpoint)
    params = list(net.get_parameters())
    assert params and {p.name for p in params} <= set(stored)
    for param in params:
        np.testing.assert_array_equal(param.asnumpy(), stored[param.name], err_msg=param.name)
