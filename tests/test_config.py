"""The typed config: recipe defaults, YAML presets, command-line overrides and validation."""
import argparse
import os
import re

import pytest
import yaml

from src.config import (CONFIG_DIR, ROOT, SEED_DERIVED, Config, ConfigError, config_from_args, load_config,
                        parse_overrides, resolved_paths)


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
    assert load_config("coco") == load_config()
    assert load_config("coco").data.coco_root == os.path.join(ROOT, "data", "coco")


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
    ({"train.device_target": "TPU"}, "auto, CPU, GPU or Ascend"),
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
    assert cfg == load_config()


# ---------------------------------------------------------------- device default

def test_device_defaults_to_auto_and_can_be_forced():
    assert load_config("coco").train.device_target == "auto"
    assert load_config("coco", {"device_target": "Ascend"}).train.device_target == "Ascend"


# ---------------------------------------------------------------- relative paths: one base per source

def test_config_file_paths_resolve_against_the_repository_root(tmp_path, monkeypatch):
    own = tmp_path / "elsewhere" / "own.yaml"
    own.parent.mkdir()
    own.write_text(yaml.safe_dump({"data": {"coco_root": "my/coco", "anno_path": "~/a.txt", "image_dir": "/abs"}}))
    monkeypatch.chdir(tmp_path)
    cfg = load_config(str(own))
    assert cfg.data.coco_root == os.path.join(ROOT, "my", "coco")
    assert cfg.data.anno_path == os.path.join(os.path.expanduser("~"), "a.txt") and cfg.data.image_dir == "/abs"
    assert cfg.data.mindrecord_dir == os.path.join(ROOT, "data", "mindrecord")        # the default
    assert load_config("tiny").data.coco_root == os.path.join(ROOT, "data", "synthetic_coco")


def test_command_line_paths_resolve_against_the_current_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config("tiny", {"coco_root": "c", "data.mindrecord_dir": "../m", "COCO_ROOT": "c"})
    assert cfg.data.coco_root == str(tmp_path / "c")
    assert cfg.data.mindrecord_dir == os.path.join(os.path.dirname(tmp_path), "m")
    assert resolved_paths(cfg) == f"paths: data.coco_root={tmp_path / 'c'}, data.mindrecord_dir={cfg.data.mindrecord_dir}"


# ---------------------------------------------------------------- the ModelZoo seed's key names

# The seed's config table (the reference README) with the recipe's values, flat as the seed writes it.
SEED_TABLE = """
img_width: 1280
img_height: 768
keep_ratio: True
flip_ratio: 0.5
photo_ratio: 0.5
expand_ratio: 1.0
max_instance_count: 128
mask_shape: (28, 28)
anchor_scales: [8]
anchor_ratios: [0.5, 1.0, 2.0]
anchor_strides: [4, 8, 16, 32, 64]
resnet_block: [3, 4, 6, 3]
resnet_in_channels: [64, 256, 512, 1024]
resnet_out_channels: [256, 512, 1024, 2048]
fpn_in_channels: [256, 512, 1024, 2048]
fpn_out_channels: 256
fpn_num_outs: 5
rpn_in_channels: 256
rpn_feat_channels: 256
rpn_loss_cls_weight: 1.0
rpn_loss_reg_weight: 1.0
rpn_cls_out_channels: 1
rpn_target_means: [0., 0., 0., 0.]
rpn_target_stds: [1.0, 1.0, 1.0, 1.0]
neg_iou_thr: 0.3
pos_iou_thr: 0.7
min_pos_iou: 0.3
num_gts: 128
num_expected_neg: 256
num_expected_pos: 128
activate_num_classes: 2
use_sigmoid_cls: True
roi_layer: {type: RoIAlign, out_size: 7, mask_out_size: 14, sample_num: 2}
roi_align_out_channels: 256
roi_align_featmap_strides: [4, 8, 16, 32]
roi_align_finest_scale: 56
neg_iou_thr_stage2: 0.5
pos_iou_thr_stage2: 0.5
min_pos_iou_stage2: 0.5
num_expected_pos_stage2: 128
num_expected_neg_stage2: 512
num_expected_total_stage2: 512
rcnn_num_layers: 2
rcnn_in_channels: 256
rcnn_fc_out_channels: 1024
rcnn_mask_out_channels: 256
rcnn_loss_cls_weight: 1
rcnn_loss_reg_weight: 1
rcnn_loss_mask_fb_weight: 1
rcnn_target_means: [0., 0., 0., 0.]
rcnn_target_stds: [0.1, 0.1, 0.2, 0.2]
rpn_proposal_nms_across_levels: False
rpn_proposal_nms_pre: 2000
rpn_proposal_nms_post: 2000
rpn_proposal_max_num: 2000
rpn_proposal_nms_thr: 0.7
rpn_proposal_min_bbox_size: 0
rpn_nms_across_levels: False
rpn_nms_pre: 1000
rpn_nms_post: 1000
rpn_max_num: 1000
rpn_nms_thr: 0.7
rpn_min_bbox_min_size: 0
test_score_thr: 0.05
test_iou_thr: 0.5
test_max_per_img: 100
test_batch_size: 2
rpn_head_loss_type: CrossEntropyLoss
rpn_head_use_sigmoid: True
rpn_head_weight: 1.0
mask_thr_binary: 0.5
base_lr: 0.02
base_step: 58633
total_epoch: 13
warmup_step: 500
warmup_mode: linear
warmup_ratio: 0.3333333333333333
batch_size: 2
loss_scale: 1
momentum: 0.91
weight_decay: 0.0001
pretrain_epoch_size: 0
epoch_size: 12
save_checkpoint: True
save_checkpoint_epochs: 1
keep_checkpoint_max: 12
save_checkpoint_path: ./checkpoint
mindrecord_dir: data/mindrecord
coco_root: data/coco
train_data_type: train2017
val_data_type: val2017
instance_set: annotations/instances_{}.json
"""


def test_the_seeds_whole_table_gives_the_recipe(tmp_path, capsys):
    seed = tmp_path / "seed.yaml"
    seed.write_text(SEED_TABLE + "coco_classes: " + repr(list(load_config().data.classes)) + "\n")
    assert load_config(str(seed)) == load_config("coco")
    notices = capsys.readouterr().err
    assert "config: ModelZoo key 'rpn_proposal_nms_thr' -> proposal_train.nms_thr" in notices
    assert "config: ModelZoo key 'num_expected_pos_stage2' -> rcnn.pos_fraction_stage2" in notices


def test_seed_names_on_the_command_line_equal_our_keys():
    ours = load_config("tiny", {"proposal_train.nms_thr": "0.6", "rcnn.pos_fraction_stage2": "0.5",
                                "roi.roi_out_size": "5", "roi.roi_sample_ratio": "1", "data.classes": "background,a,b",
                                "rcnn.rcnn_loss_mask_weight": "2", "proposal_test.max_num": "16",
                                "rpn.num_expected_total": "32", "rpn.pos_fraction": "0.25"})
    seed = parse_overrides(["--num_expected_pos", "8", "--rpn_proposal_nms_thr", "0.6",
                            "--num_expected_pos_stage2", "16", "--coco_classes", "('background', 'a', 'b')",
                            "--roi_layer", "dict(type='RoIAlign', out_size=5, mask_out_size=14, sample_num=1)",
                            "--rcnn_loss_mask_fb_weight", "2", "--rpn_max_num=16", "--num_expected_neg", "32",
                            "--mask_shape", "(28, 28)", "--use_sigmoid_cls", "True"])
    assert load_config("tiny", seed) == ours


@pytest.mark.parametrize("name", sorted(SEED_DERIVED))
def test_derived_seed_names_say_how_they_are_derived(name):
    with pytest.raises(ConfigError, match=f"'{name}' \\(ModelZoo\\) is derived, not set: it is "):
        load_config("tiny", {name: "1"})


@pytest.mark.parametrize("overrides, fragment", [
    ({"use_sigmoid_cls": "False"}, "'use_sigmoid_cls' (ModelZoo) can only be True"),
    ({"rcnn_num_layers": "3"}, "'rcnn_num_layers' (ModelZoo) can only be 2"),
    ({"roi_layer": "dict(type='RoIPool', out_size=7)"}, "expected dict(type='RoIAlign'"),
    ({"mask_shape": "(28, 14)"}, "masks are square"),
    ({"num_expected_pos": "300"}, "must be in 1..rpn.num_expected_total (64)"),
])
def test_seed_values_this_implementation_cannot_take(overrides, fragment):
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        load_config("tiny", overrides)
