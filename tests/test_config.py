"""The typed config: recipe defaults, YAML presets, command-line overrides and validation."""
import argparse
import os

import pytest
import yaml

from src.config import (CONFIG_DIR, Config, ConfigError, config_from_args, load_config, parse_overrides)


def test_defaults_are_the_recipe():
    cfg = Config()
    assert (cfg.data.img_width, cfg.data.img_height) == (1280, 768)
    assert cfg.num_classes == 81 and cfg.data.max_instance_count == 128
    assert cfg.feature_shapes == [(192, 320), (96, 160), (48, 80), (24, 40), (12, 20)]
    assert cfg.num_bboxes == 245520                      # the recipe's num_bboxes
    assert cfg.roi_sample_num == 512                     # up to 128 positives first, then negatives
    assert cfg.proposal_train.max_num == 2000 and cfg.proposal_test.max_num == 1000
    assert cfg.train.base_lr == 0.02 and cfg.train.momentum == 0.91 and cfg.train.epoch_size == 12
    assert cfg.rcnn.rcnn_target_stds == [0.1, 0.1, 0.2, 0.2]


def test_coco_yaml_equals_defaults():
    assert load_config("coco") == Config()


@pytest.mark.parametrize("name", sorted(f[:-5] for f in os.listdir(CONFIG_DIR) if f.endswith(".yaml")))
def test_every_preset_loads_and_validates(name):
    cfg = load_config(name)
    assert cfg.data.img_height % 32 == 0


def test_tiny_preset_is_small():
    cfg = load_config("tiny")
    assert cfg.data.img_height * cfg.data.img_width <= 256 * 384
    assert cfg.proposal_train.max_num <= 128 and cfg.num_classes == 5


def test_nested_and_flat_overrides():
    cfg = load_config("tiny", {"train.base_lr": "0.5", "flip_ratio": "0", "anchor_ratios": "1,2",
                               "keep_ratio": "false", "proposal_test.max_num": "16"})
    assert cfg.train.base_lr == 0.5 and cfg.data.flip_ratio == 0.0
    assert cfg.anchor.anchor_ratios == [1.0, 2.0] and cfg.data.keep_ratio is False
    assert cfg.proposal_test.max_num == 16 and cfg.proposal_train.max_num == 64


@pytest.mark.parametrize("overrides, fragment", [
    ({"train.base_lr": "-1"}, "train.base_lr"),
    ({"data.img_width": "1000"}, "multiple of 32"),
    ({"data.flip_ratio": "1.5"}, "data.flip_ratio"),
    ({"rpn.pos_fraction": "0"}, "rpn.pos_fraction"),
    ({"train.device_target": "TPU"}, "CPU, GPU or Ascend"),
    ({"train.no_such_key": "1"}, "unknown config key 'train.no_such_key'"),
    ({"nosection.x": "1"}, "unknown config section"),
    ({"max_num": "5"}, "ambiguous"),
    ({"train.epoch_size": "two"}, "expected int"),
    ({"train.epoch_size": "1.5"}, "expected int"),
    ({"keep_ratio": "maybe"}, "expected true/false"),
    ({"rcnn.mask_shape": "20"}, "rcnn.mask_shape"),
])
def test_bad_values_name_the_key(overrides, fragment):
    with pytest.raises(ConfigError, match=fragment.replace(".", r"\.").replace("(", r"\(")):
        load_config("tiny", overrides)


def test_yaml_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"train": {"momentum": 2.0}}))
    with pytest.raises(ConfigError, match="train.momentum"):
        load_config(str(bad))
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text(yaml.safe_dump({"train": {"lr": 0.1}}))
    with pytest.raises(ConfigError, match=r"unknown\.yaml"):
        load_config(str(unknown))
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "missing.yaml"))


def test_parse_overrides_forms():
    assert parse_overrides(["--a.b", "1", "--c=2"]) == {"a.b": "1", "c": "2"}
    with pytest.raises(ConfigError, match="needs a value"):
        parse_overrides(["--a.b"])
    with pytest.raises(ConfigError, match="unexpected argument"):
        parse_overrides(["stray"])


def test_config_from_args_keeps_script_options():
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint_path", default="")
    args, cfg = config_from_args(parser, ["--checkpoint_path", "x.ckpt", "--config", "tiny", "--base_lr", "0.1"])
    assert args.checkpoint_path == "x.ckpt" and cfg.train.base_lr == 0.1
    with pytest.raises(SystemExit):
        config_from_args(argparse.ArgumentParser(), ["--config", "tiny", "--base_lr", "-3"])


def test_recipe_yaml_round_trips():
    from src.config import apply_mapping, recipe_yaml
    cfg = Config()
    cfg.train.base_lr = 1.0
    apply_mapping(cfg, yaml.safe_load(recipe_yaml()))
    assert cfg == Config()
