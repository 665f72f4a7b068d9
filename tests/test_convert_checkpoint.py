"""ResNet50 checkpoint conversion: torchvision .npz and ModelZoo .ckpt round trips into the real backbone."""
import importlib.util

import numpy as np
import pytest

from mindspore import Tensor, nn

from src.checkpoint import load_pretrained, read_checkpoint, write_checkpoint_atomic
from src.config import load_config
from src.convert_checkpoint import (BACKBONE_PREFIX, ConversionError, backbone_shapes, convert_checkpoint,
                                    main, read_source)
from src.maskrcnn.resnet50 import ResNet50

TORCH_LEAF = {"gamma": "weight", "beta": "bias", "moving_mean": "running_mean", "moving_variance": "running_var"}
CLASSIFIER_OUT = 1000


@pytest.fixture(scope="module")
def cfg():
    return load_config("tiny")


@pytest.fixture(scope="module")
def shapes(cfg):
    return backbone_shapes(cfg)


def _source_name(name, layout):
    """backbone.<our name> -> the name the source layout uses."""
    module, leaf = name[len(BACKBONE_PREFIX):].rsplit(".", 1)
    if layout == "torchvision":
        return f"{module}.{TORCH_LEAF.get(leaf, leaf)}"
    return f"{module.replace('downsample', 'down_sample_layer')}.{leaf}"


def fake_source(shapes, layout, seed=0):
    """Random weights under the source layout's names, plus the classifier and counters a real file has."""
    rng = np.random.default_rng(seed)
    source = {_source_name(name, layout): rng.normal(size=shape).astype(np.float32) for name, shape in shapes.items()}
    classifier = "fc" if layout == "torchvision" else "end_point"
    source[f"{classifier}.weight"] = rng.normal(size=(CLASSIFIER_OUT, 2048)).astype(np.float32)
    source[f"{classifier}.bias"] = np.zeros(CLASSIFIER_OUT, np.float32)
    if layout == "torchvision":
        source["bn1.num_batches_tracked"] = np.array(100, np.int64)
    else:
        source["moments.conv1.weight"] = np.zeros(shapes["backbone.conv1.weight"], np.float32)
        source["learning_rate"] = np.array(0.1, np.float32)
    return source


class BackboneHolder(nn.Cell):
    """Gives the backbone the model's `backbone.` prefix."""

    def __init__(self, cfg):
        super().__init__()
        self.backbone = ResNet50(cfg)


def assert_loaded_exactly(out_path, source, layout, cfg):
    holder = BackboneHolder(cfg)
    report = load_pretrained(out_path, holder)
    assert not report.skipped and not report.left_at_init
    for param in holder.get_parameters():
        np.testing.assert_array_equal(param.asnumpy(), source[_source_name(param.name, layout)], err_msg=param.name)


def test_torchvision_npz_round_trip(tmp_path, cfg, shapes):
    source = fake_source(shapes, "torchvision")
    assert "layer1.0.downsample.1.running_var" in source and "bn1.weight" in source
    src = str(tmp_path / "resnet50.npz")
    np.savez(src, **source)
    out = str(tmp_path / "backbone.ckpt")
    report = convert_checkpoint(src, out, cfg)
    assert sorted(report.converted) == sorted(shapes)
    assert sorted(report.dropped) == ["bn1.num_batches_tracked", "fc.bias", "fc.weight"]
    assert_loaded_exactly(out, source, "torchvision", cfg)


def test_modelzoo_ckpt_round_trip_through_the_cli(tmp_path, cfg, shapes, capsys):
    source = fake_source(shapes, "modelzoo", seed=1)
    assert "layer2.0.down_sample_layer.0.weight" in source and "bn1.gamma" in source
    src = str(tmp_path / "resnet50_modelzoo.ckpt")
    write_checkpoint_atomic(src, [{"name": name, "data": Tensor(value)} for name, value in source.items()])
    out = str(tmp_path / "backbone.ckpt")
    assert main(["--src", src, "--out", out, "--config", "tiny"]) == 0
    assert f"{len(shapes)} backbone tensors" in capsys.readouterr().out
    assert all(name.startswith(BACKBONE_PREFIX) for name in read_checkpoint(out))
    assert_loaded_exactly(out, source, "modelzoo", cfg)


def test_missing_and_mismatched_tensors_are_named_and_nothing_is_written(tmp_path, cfg, shapes):
    source = fake_source(shapes, "torchvision")
    del source["layer3.5.conv2.weight"]
    source["layer4.2.bn3.running_mean"] = np.zeros(7, np.float32)
    source["layer9.0.conv1.weight"] = np.zeros((1,), np.float32)
    src = str(tmp_path / "broken.npz")
    np.savez(src, **source)
    out = tmp_path / "backbone.ckpt"
    with pytest.raises(ConversionError) as info:
        convert_checkpoint(src, str(out), cfg)
    message = str(info.value)
    assert "missing 1: backbone.layer3.5.conv2.weight" in message
    assert "backbone.layer4.2.bn3.moving_mean (7,) in source vs (2048,) in backbone" in message
    assert "unexpected 1: layer9.0.conv1.weight" in message
    assert not out.exists()


def test_unreadable_sources_get_clear_errors(tmp_path, cfg):
    with pytest.raises(ConversionError, match="does not exist"):
        read_source(str(tmp_path / "nothing.npz"))
    bad = tmp_path / "weights.bin"
    bad.write_bytes(b"123")
    with pytest.raises(ConversionError, match=r"unknown checkpoint type '\.bin'"):
        read_source(str(bad))
    pth = tmp_path / "resnet50.pth"
    pth.write_bytes(b"not really torch")
    if importlib.util.find_spec("torch") is None:
        with pytest.raises(ConversionError, match="needs PyTorch.*npz"):
            read_source(str(pth))


def test_cli_reports_errors_with_exit_code(tmp_path, capsys):
    assert main(["--src", str(tmp_path / "absent.ckpt"), "--out", str(tmp_path / "o.ckpt"), "--config", "tiny"]) == 1
    assert "absent.ckpt' does not exist" in capsys.readouterr().err

