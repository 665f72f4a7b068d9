"""One typed configuration for data, model, training and evaluation.

The dataclass defaults are the ModelZoo Mask R-CNN recipe (COCO 2017, 1280x768, batch 2, 12 epochs).
YAML presets in ``configs/`` override a subset of keys; command-line ``--key value`` pairs override
those. Every value is checked once, here, so that a bad value fails before any data is touched.
The ModelZoo seed's key names are accepted too, mapped onto ours (SEED_KEYS and the tables after it).
Relative data paths become absolute when read: config-file values against ROOT, command-line ones against
the current directory.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
import typing
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join(ROOT, "configs")
# Relative values of these keys are made absolute once, when read: values from a config file (and the
# defaults) against ROOT, values from the command line against the current directory of the command.
PATH_KEYS = ("data.coco_root", "data.mindrecord_dir", "data.image_dir", "data.anno_path")

COCO_CLASSES = (
    "background", "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse",
    "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie",
    "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove",
    "skateboard", "surfboard", "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon",
    "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut",
    "cake", "chair", "couch", "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse",
    "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book",
    "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)
# MindSpore's mixed-precision levels (src/amp.py says what each computes in); `auto` picks one per device.
AMP_LEVELS = ("O0", "O1", "O2", "O3")
INIT_SCHEMES = ("recipe", "torchvision")


class ConfigError(ValueError):
    """A configuration key or value is wrong; the message names the key and what is allowed."""


@dataclass
class DataConfig:
    dataset: str = "coco"                       # coco | other
    coco_root: str = "data/coco"
    train_data_type: str = "train2017"
    val_data_type: str = "val2017"
    instance_set: str = "annotations/instances_{}.json"
    image_dir: str = ""                         # "other" format: images are image_dir/<path in TXT>
    anno_path: str = ""                         # "other" format: TXT annotation file
    mindrecord_dir: str = "data/mindrecord"
    mindrecord_shards: int = 8
    classes: List[str] = field(default_factory=lambda: list(COCO_CLASSES))   # index 0 is background
    img_width: int = 1280
    img_height: int = 768
    keep_ratio: bool = True
    flip_ratio: float = 0.5
    photo_ratio: float = 0.5
    expand_ratio: float = 1.0
    max_instance_count: int = 128
    img_mean: List[float] = field(default_factory=lambda: [123.675, 116.28, 103.53])   # RGB
    img_std: List[float] = field(default_factory=lambda: [58.395, 57.12, 57.375])
    num_parallel_workers: int = 2
    convert_workers: int = 2
    # Eval input geometry (docs/torchvision_differences.md 2-5); the defaults are the recipe's, the torchvision
    # preset sets the others.
    resize_mode: str = "fit"                    # fit: keep-ratio into img_height x img_width | short_long
    min_size: int = 800                         # short_long: short side (read by short_long only)
    max_size: int = 1333                        # short_long: long side at most
    resize_kernel: str = "warp"                 # warp (cv2.warpAffine, zero border) | torch (edge-clamped bilinear)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


@dataclass
class BackboneConfig:
    resnet_block: List[int] = field(default_factory=lambda: [3, 4, 6, 3])
    resnet_in_channels: List[int] = field(default_factory=lambda: [64, 256, 512, 1024])
    resnet_out_channels: List[int] = field(default_factory=lambda: [256, 512, 1024, 2048])
    frozen_stages: int = 1                      # stem + stage 1 frozen, as in the recipe
    freeze_bn: bool = True                      # BatchNorm statistics and affine frozen
    norm: str = "batch"                         # batch (recipe) | group (GroupNorm: from scratch, small batch)


@dataclass
class FpnConfig:
    fpn_in_channels: List[int] = field(default_factory=lambda: [256, 512, 1024, 2048])
    fpn_out_channels: int = 256
    fpn_num_outs: int = 5


@dataclass
class AnchorConfig:
    anchor_scales: List[float] = field(default_factory=lambda: [8.0])
    anchor_ratios: List[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])
    anchor_strides: List[int] = field(default_factory=lambda: [4, 8, 16, 32, 64])
    anchor_offset: float = 0.5                  # anchor centre = (cell index + offset) * stride; torchvision 0.0
    round_base_anchors: bool = False            # round the cell anchors' corners to integers (torchvision)


@dataclass
class RpnConfig:
    rpn_in_channels: int = 256
    rpn_feat_channels: int = 256
    rpn_loss_cls_weight: float = 1.0
    rpn_loss_reg_weight: float = 1.0
    rpn_target_means: List[float] = field(default_factory=lambda: [0.0, 0.0, 0.0, 0.0])
    rpn_target_stds: List[float] = field(default_factory=lambda: [1.0, 1.0, 1.0, 1.0])
    neg_iou_thr: float = 0.3
    pos_iou_thr: float = 0.7
    min_pos_iou: float = 0.3
    num_expected_total: int = 256               # sampled anchors per image
    pos_fraction: float = 0.5
    anchors_inside_only: bool = True            # border-crossing anchors are never sampled (torchvision: false)


@dataclass
class ProposalConfig:
    """Proposal generation for one phase (train or test)."""
    nms_pre: int = 2000                         # top-k per level before NMS
    nms_post: int = 2000
    max_num: int = 2000                         # proposals kept per image
    nms_thr: float = 0.7
    min_bbox_size: float = 0.0


@dataclass
class RoiConfig:
    roi_out_size: int = 7
    mask_out_size: int = 14
    roi_sample_ratio: int = 2                   # bilinear samples per bin side
    roi_align_out_channels: int = 256
    roi_align_featmap_strides: List[int] = field(default_factory=lambda: [4, 8, 16, 32])
    roi_align_finest_scale: int = 56
    roi_aligned: bool = True                    # false: torchvision's RoIAlign(aligned=False), no half-cell shift


@dataclass
class RcnnConfig:
    neg_iou_thr_stage2: float = 0.5
    pos_iou_thr_stage2: float = 0.5
    min_pos_iou_stage2: float = 0.5
    num_expected_total_stage2: int = 512        # sampled RoIs per image
    pos_fraction_stage2: float = 0.25
    rcnn_in_channels: int = 256
    rcnn_fc_out_channels: int = 1024
    rcnn_mask_out_channels: int = 256
    rcnn_loss_cls_weight: float = 1.0
    rcnn_loss_reg_weight: float = 1.0
    rcnn_loss_mask_weight: float = 1.0
    rcnn_target_means: List[float] = field(default_factory=lambda: [0.0, 0.0, 0.0, 0.0])
    rcnn_target_stds: List[float] = field(default_factory=lambda: [0.1, 0.1, 0.2, 0.2])
    rcnn_smooth_l1_beta: float = 1.0            # box-head regression loss (torchvision: 1/9)
    mask_shape: int = 28
    mask_target_binary: bool = True             # mask targets thresholded at 0.5 (torchvision: soft, false)


@dataclass
class TestConfig:
    test_score_thr: float = 0.05
    test_iou_thr: float = 0.5
    test_max_per_img: int = 100
    test_nms_pre: int = 1000                    # (box, class) candidates ranked before per-class NMS
    test_batch_size: int = 2
    mask_thr_binary: float = 0.5
    test_min_box_size: float = 0.0              # (box, class) pairs narrower or lower than this are dropped
    mask_paste: str = "centres"                 # centres | torchvision (src/mask_paste.py)
    amp_level: str = "auto"                     # inference (eval.py, predict.py) precision, as train.amp_level


@dataclass
class TrainConfig:
    device_target: str = "auto"                 # auto (Ascend, then GPU, then CPU) | CPU | GPU | Ascend
    base_lr: float = 0.02
    base_step: int = 58633                      # steps of one epoch in the recipe's schedule
    total_epoch: int = 13
    warmup_step: int = 500
    warmup_mode: str = "linear"
    warmup_ratio: float = 1.0 / 3.0
    # [at_step, total_steps, warmup_step] per re-plan of a running schedule (src/lr_schedule.py); [] = none
    lr_replans: List[List[int]] = field(default_factory=list)
    batch_size: int = 2
    # Mixed precision (src/amp.py): O0 float32 | O1 / O2 / O3: on CPU the convolutions on bfloat16 inputs
    # (float32 accumulation), on Ascend / GPU float16 (O2, O3) | auto: O2 on a CPU with AVX512-BF16 / AMX, else
    # O0 on CPU; O2 on Ascend and GPU.
    # Weights, optimizer state, losses and box math stay float32 at every level.
    amp_level: str = "auto"
    loss_scale: float = 1.0                     # the recipe's fixed scale; the start value when dynamic
    loss_scale_mode: str = "fixed"              # fixed | dynamic (halved on overflow, doubled after 2000 good steps)
    momentum: float = 0.91
    weight_decay: float = 1e-4
    optimizer: str = "momentum"                 # momentum (the recipe's SGD) | adam | adamw (from scratch)
    grad_clip_norm: float = 0.0                 # clip gradients to this global L2 norm; 0 = off (recipe)
    pretrain_epoch_size: int = 0
    epoch_size: int = 12
    save_checkpoint: bool = True
    save_checkpoint_epochs: int = 1
    save_checkpoint_steps: int = 0              # 0: only at epoch ends
    keep_checkpoint_max: int = 12
    save_checkpoint_path: str = "./checkpoint"
    log_interval: int = 1
    seed: int = 1
    # Initial weights for training from scratch (src/maskrcnn/init_scheme.py): recipe (residual branches start
    # at zero, Xavier FPN and box head, small predictors) | torchvision (torchvision 0.29's initialisers)
    init: str = "recipe"


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    fpn: FpnConfig = field(default_factory=FpnConfig)
    anchor: AnchorConfig = field(default_factory=AnchorConfig)
    rpn: RpnConfig = field(default_factory=RpnConfig)
    proposal_train: ProposalConfig = field(default_factory=ProposalConfig)
    proposal_test: ProposalConfig = field(
        default_factory=lambda: ProposalConfig(nms_pre=1000, nms_post=1000, max_num=1000))
    roi: RoiConfig = field(default_factory=RoiConfig)
    rcnn: RcnnConfig = field(default_factory=RcnnConfig)
    test: TestConfig = field(default_factory=TestConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    @property
    def num_classes(self) -> int:
        return self.data.num_classes

    @property
    def num_anchors(self) -> int:
        """Anchors per feature-map cell."""
        return len(self.anchor.anchor_scales) * len(self.anchor.anchor_ratios)

    @property
    def feature_shapes(self) -> List[Tuple[int, int]]:
        """(h, w) of P2..P6 for the padded input size."""
        return [(-(-self.data.img_height // s), -(-self.data.img_width // s)) for s in self.anchor.anchor_strides]

    @property
    def num_pos_stage2(self) -> int:
        """Positive RoI slots per image in stage 2 (the mask head trains on these)."""
        return int(round(self.rcnn.num_expected_total_stage2 * self.rcnn.pos_fraction_stage2))

    @property
    def roi_sample_num(self) -> int:
        """RoI rows per image in stage 2 (recipe: 512): positives from the front, then negatives. The ModelZoo
        runs 128 positive + 512 negative rows (640), of which only 512 hold samples."""
        return self.rcnn.num_expected_total_stage2

    @property
    def num_bboxes(self) -> int:
        """Total anchors over all levels of one image."""
        return sum(h * w for h, w in self.feature_shapes) * self.num_anchors

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------- validation

def _check(cond: bool, key: str, message: str) -> None:
    if not cond:
        raise ConfigError(f"config key '{key}': {message}")


def _in_unit(value: float, key: str, low_open: bool = True) -> None:
    ok = (0.0 < value <= 1.0) if low_open else (0.0 <= value <= 1.0)
    _check(ok, key, f"must be in {'(0' if low_open else '[0'}, 1], got {value}")


def _positive(value, key: str) -> None:
    _check(value > 0, key, f"must be > 0, got {value}")


def _check_amp_level(value: str, key: str) -> None:
    _check(value == "auto" or value in AMP_LEVELS, key, f"must be auto, {', '.join(AMP_LEVELS)}, got '{value}'")


def validate(cfg: Config) -> Config:
    """Raise ConfigError naming the first impossible value; return cfg unchanged otherwise."""
    d = cfg.data
    _check(d.dataset in ("coco", "other"), "data.dataset", f"must be 'coco' or 'other', got '{d.dataset}'")
    for key in ("img_width", "img_height"):
        value = getattr(d, key)
        _check(value > 0 and value % 32 == 0, f"data.{key}", f"must be a positive multiple of 32, got {value}")
    for key in ("flip_ratio", "photo_ratio", "expand_ratio"):
        _in_unit(getattr(d, key), f"data.{key}", low_open=False)
    _positive(d.max_instance_count, "data.max_instance_count")
    _check(len(d.classes) >= 2, "data.classes", "needs 'background' plus at least one class")
    _check(len(set(d.classes)) == len(d.classes), "data.classes", "class names must be unique")
    _check(len(d.img_mean) == 3 and len(d.img_std) == 3, "data.img_mean/img_std", "need 3 values each")
    _check(all(s > 0 for s in d.img_std), "data.img_std", "values must be > 0")
    _positive(d.num_parallel_workers, "data.num_parallel_workers")
    _positive(d.convert_workers, "data.convert_workers")
    _positive(d.mindrecord_shards, "data.mindrecord_shards")
    _check(d.resize_mode in ("fit", "short_long"), "data.resize_mode",
           f"must be 'fit' or 'short_long', got '{d.resize_mode}'")
    _check(d.resize_kernel in ("warp", "torch"), "data.resize_kernel",
           f"must be 'warp' or 'torch', got '{d.resize_kernel}'")
    if d.resize_mode == "short_long":
        _check(0 < d.min_size <= d.max_size, "data.min_size", f"must be in 1..data.max_size, got {d.min_size}")

    b = cfg.backbone
    _check(len(b.resnet_block) == 4, "backbone.resnet_block", "needs 4 stage depths")
    _check(0 <= b.frozen_stages <= 4, "backbone.frozen_stages", f"must be in [0, 4], got {b.frozen_stages}")
    _check(b.norm in ("batch", "group"), "backbone.norm", f"must be 'batch' or 'group', got '{b.norm}'")
    _check(list(cfg.fpn.fpn_in_channels) == list(b.resnet_out_channels), "fpn.fpn_in_channels",
           "must equal backbone.resnet_out_channels")
    _check(cfg.fpn.fpn_num_outs == len(cfg.anchor.anchor_strides), "fpn.fpn_num_outs",
           "must equal the number of anchor.anchor_strides")

    a = cfg.anchor
    _check(all(s > 0 for s in a.anchor_scales), "anchor.anchor_scales", "values must be > 0")
    _check(all(r > 0 for r in a.anchor_ratios), "anchor.anchor_ratios", "values must be > 0")
    _check(0.0 <= a.anchor_offset < 1.0, "anchor.anchor_offset", f"must be in [0, 1), got {a.anchor_offset}")
    _check(all(s > 0 and d.img_height % s == 0 and d.img_width % s == 0 for s in a.anchor_strides[:-1]),
           "anchor.anchor_strides", "strides except the last must divide the image size")

    r = cfg.rpn
    for key in ("neg_iou_thr", "pos_iou_thr", "min_pos_iou", "pos_fraction"):
        _in_unit(getattr(r, key), f"rpn.{key}", low_open=key != "neg_iou_thr")
    _check(r.neg_iou_thr <= r.pos_iou_thr, "rpn.neg_iou_thr", "must be <= rpn.pos_iou_thr")
    _positive(r.num_expected_total, "rpn.num_expected_total")
    _check(len(r.rpn_target_stds) == 4 and all(s > 0 for s in r.rpn_target_stds), "rpn.rpn_target_stds",
           "needs 4 values > 0")

    for phase in ("proposal_train", "proposal_test"):
        p = getattr(cfg, phase)
        for key in ("nms_pre", "nms_post", "max_num"):
            _positive(getattr(p, key), f"{phase}.{key}")
        _check(p.max_num <= p.nms_post, f"{phase}.max_num", "must be <= nms_post")
        _in_unit(p.nms_thr, f"{phase}.nms_thr")
        _check(p.min_bbox_size >= 0, f"{phase}.min_bbox_size", "must be >= 0")

    roi = cfg.roi
    for key in ("roi_out_size", "mask_out_size", "roi_sample_ratio", "roi_align_finest_scale"):
        _positive(getattr(roi, key), f"roi.{key}")
    _check(roi.roi_align_out_channels == cfg.fpn.fpn_out_channels, "roi.roi_align_out_channels",
           "must equal fpn.fpn_out_channels")

    c = cfg.rcnn
    for key in ("neg_iou_thr_stage2", "pos_iou_thr_stage2", "min_pos_iou_stage2", "pos_fraction_stage2"):
        _in_unit(getattr(c, key), f"rcnn.{key}")
    _positive(c.num_expected_total_stage2, "rcnn.num_expected_total_stage2")
    _check(c.num_expected_total_stage2 > cfg.data.max_instance_count, "rcnn.num_expected_total_stage2",
           "must exceed data.max_instance_count (GT boxes are added to the stage-2 proposals)")
    _check(len(c.rcnn_target_stds) == 4 and all(s > 0 for s in c.rcnn_target_stds), "rcnn.rcnn_target_stds",
           "needs 4 values > 0")
    _positive(c.rcnn_smooth_l1_beta, "rcnn.rcnn_smooth_l1_beta")
    _check(c.mask_shape == 2 * roi.mask_out_size, "rcnn.mask_shape",
           "must be twice roi.mask_out_size (the mask head upsamples by 2)")

    t = cfg.test
    _in_unit(t.test_score_thr, "test.test_score_thr", low_open=False)
    _in_unit(t.test_iou_thr, "test.test_iou_thr")
    _in_unit(t.mask_thr_binary, "test.mask_thr_binary")
    _positive(t.test_max_per_img, "test.test_max_per_img")
    _check(t.test_nms_pre >= t.test_max_per_img, "test.test_nms_pre", "must be >= test.test_max_per_img")
    _positive(t.test_batch_size, "test.test_batch_size")
    _check(t.test_min_box_size >= 0, "test.test_min_box_size", f"must be >= 0, got {t.test_min_box_size}")
    _check(t.mask_paste in ("centres", "torchvision"), "test.mask_paste",
           f"must be 'centres' or 'torchvision', got '{t.mask_paste}'")
    _check_amp_level(t.amp_level, "test.amp_level")

    tr = cfg.train
    _check(tr.device_target in ("auto", "CPU", "GPU", "Ascend"), "train.device_target",
           f"must be auto, CPU, GPU or Ascend, got '{tr.device_target}'")
    _positive(tr.base_lr, "train.base_lr")
    _positive(tr.base_step, "train.base_step")
    _positive(tr.total_epoch, "train.total_epoch")
    _check(tr.warmup_step >= 0, "train.warmup_step", f"must be >= 0, got {tr.warmup_step}")
    _check(tr.warmup_mode in ("linear", "constant"), "train.warmup_mode", "must be 'linear' or 'constant'")
    _in_unit(tr.warmup_ratio, "train.warmup_ratio")
    previous = -1
    for entry in tr.lr_replans:
        _check(len(entry) == 3, "train.lr_replans", f"entries are [at_step, total_steps, warmup_step], got {entry}")
        at, total, warmup = entry
        _check(at > previous, "train.lr_replans", f"at_step values must increase and be >= 0, got {entry}")
        _check(total > at and warmup >= 0, "train.lr_replans",
               f"need total_steps > at_step and warmup_step >= 0, got {entry}")
        previous = at
    _positive(tr.batch_size, "train.batch_size")
    _positive(tr.loss_scale, "train.loss_scale")
    _check_amp_level(tr.amp_level, "train.amp_level")
    _check(tr.loss_scale_mode in ("fixed", "dynamic"), "train.loss_scale_mode",
           f"must be 'fixed' or 'dynamic', got '{tr.loss_scale_mode}'")
    _check(0.0 <= tr.momentum < 1.0, "train.momentum", f"must be in [0, 1), got {tr.momentum}")
    _check(tr.weight_decay >= 0, "train.weight_decay", f"must be >= 0, got {tr.weight_decay}")
    _check(tr.optimizer in ("momentum", "adam", "adamw"), "train.optimizer",
           f"must be 'momentum', 'adam' or 'adamw', got '{tr.optimizer}'")
    _check(tr.init in INIT_SCHEMES, "train.init", f"must be one of {', '.join(INIT_SCHEMES)}, got '{tr.init}'")
    _check(tr.grad_clip_norm >= 0, "train.grad_clip_norm", f"must be >= 0 (0 = off), got {tr.grad_clip_norm}")
    _positive(tr.epoch_size, "train.epoch_size")
    _check(tr.pretrain_epoch_size >= 0, "train.pretrain_epoch_size", "must be >= 0")
    _positive(tr.save_checkpoint_epochs, "train.save_checkpoint_epochs")
    _check(tr.save_checkpoint_steps >= 0, "train.save_checkpoint_steps", "must be >= 0")
    _positive(tr.keep_checkpoint_max, "train.keep_checkpoint_max")
    _positive(tr.log_interval, "train.log_interval")
    return cfg


# ---------------------------------------------------------------- loading and overriding

def _section_fields(cls) -> dict:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _leaf_index() -> dict:
    """Leaf key -> list of sections holding it, for flat `--key value` overrides."""
    index: dict = {}
    for section, section_type in _section_fields(Config).items():
        for leaf in _section_fields(section_type):
            index.setdefault(leaf, []).append(section)
    return index


def _coerce(value, type_hint, key: str):
    """Convert a YAML or command-line value to the declared type, or raise ConfigError."""
    origin = typing.get_origin(type_hint)
    if origin in (list, List, tuple, Tuple, Sequence):
        (item_type,) = typing.get_args(type_hint)[:1] or (str,)
        if isinstance(value, str):
            parsed = yaml.safe_load(value) if value.strip().startswith("[") else value.split(",")
            value = parsed
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}': expected a list, got {value!r}")
        return [_coerce(v, item_type, key) for v in value]
    if origin is typing.Union:
        inner = [t for t in typing.get_args(type_hint) if t is not type(None)]
        return None if value is None else _coerce(value, inner[0], key)
    if type_hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"config key '{key}': expected true/false, got {value!r}")
    if type_hint in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"config key '{key}': expected {type_hint.__name__}, got {value!r}")
        try:
            number = float(value)
            if type_hint is int:
                if not number.is_integer():
                    raise ValueError
                return int(number)
            return number
        except (TypeError, ValueError):
            raise ConfigError(f"config key '{key}': expected {type_hint.__name__}, got {value!r}") from None
    if type_hint is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"config key '{key}': expected a string, got {value!r}")
        return str(value)
    return value


def _resolve(key: str) -> Tuple[str, str]:
    """'train.base_lr' or a unique leaf 'base_lr' -> ('train', 'base_lr')."""
    sections = _section_fields(Config)
    if "." in key:
        section, leaf = key.split(".", 1)
        if section not in sections:
            raise ConfigError(f"unknown config section '{section}' in '{key}'; sections: {', '.join(sections)}")
        if leaf not in _section_fields(sections[section]):
            raise ConfigError(f"unknown config key '{key}'; keys of '{section}': "
                              f"{', '.join(_section_fields(sections[section]))}")
        return section, leaf
    owners = _leaf_index().get(key)
    if not owners:
        raise ConfigError(f"unknown config key '{key}'")
    if len(owners) > 1:
        raise ConfigError(f"config key '{key}' is ambiguous; use one of "
                          f"{', '.join(s + '.' + key for s in owners)}")
    return owners[0], key


# ---------------------------------------------------------------- the ModelZoo seed's key names

# Seed name -> our key, same meaning and unit (names the seed shares with us need no entry).
SEED_KEYS = {
    "COCO_ROOT": "data.coco_root", "IMAGE_DIR": "data.image_dir", "ANNO_PATH": "data.anno_path",
    "coco_classes": "data.classes", "num_gts": "data.max_instance_count",
    "num_expected_neg": "rpn.num_expected_total",
    "num_expected_neg_stage2": "rcnn.num_expected_total_stage2",
    "rcnn_loss_mask_fb_weight": "rcnn.rcnn_loss_mask_weight",
    "rpn_proposal_nms_pre": "proposal_train.nms_pre", "rpn_proposal_nms_post": "proposal_train.nms_post",
    "rpn_proposal_max_num": "proposal_train.max_num", "rpn_proposal_nms_thr": "proposal_train.nms_thr",
    "rpn_proposal_min_bbox_size": "proposal_train.min_bbox_size",
    "rpn_nms_pre": "proposal_test.nms_pre", "rpn_nms_post": "proposal_test.nms_post",
    "rpn_max_num": "proposal_test.max_num", "rpn_nms_thr": "proposal_test.nms_thr",
    "rpn_min_bbox_min_size": "proposal_test.min_bbox_size",
}
# Seed count of positives -> our positive fraction of the sampled total (applied after the source's other keys).
SEED_FRACTIONS = {
    "num_expected_pos": ("rpn.pos_fraction", "rpn", "num_expected_total"),
    "num_expected_pos_stage2": ("rcnn.pos_fraction_stage2", "rcnn", "num_expected_total_stage2"),
}
# roi_layer: dict(type='RoIAlign', out_size=7, mask_out_size=14, sample_num=2) -> three roi keys.
ROI_LAYER_KEYS = {"out_size": "roi.roi_out_size", "mask_out_size": "roi.mask_out_size",
                  "sample_num": "roi.roi_sample_ratio"}
# Seed switches this implementation has one setting of: that setting is accepted, any other refused.
SEED_FIXED = {
    "rpn_cls_out_channels": (1, "the RPN classifies with one sigmoid output per anchor"),
    "use_sigmoid_cls": (True, "the RPN classifies with a sigmoid"),
    "rpn_head_use_sigmoid": (True, "the RPN classifies with a sigmoid"),
    "activate_num_classes": (2, "the RPN separates object from background"),
    "rpn_head_loss_type": ("CrossEntropyLoss", "the RPN uses sigmoid cross entropy"),
    "rpn_head_weight": (1.0, "the RPN losses are weighted by rpn.rpn_loss_cls_weight / rpn_loss_reg_weight"),
    "rcnn_num_layers": (2, "the box head has two shared fully connected layers"),
    "rpn_proposal_nms_across_levels": (False, "proposals are suppressed per FPN level"),
    "rpn_nms_across_levels": (False, "proposals are suppressed per FPN level"),
}
# Seed values computed from others here: setting one is an error that says how it is derived.
SEED_DERIVED = {
    "feature_shapes": "(ceil(img_height / s), ceil(img_width / s)) for each s of anchor.anchor_strides",
    "num_anchors": "len(anchor.anchor_scales) * len(anchor.anchor_ratios)",
    "num_bboxes": "the anchors of one image: sum of h * w over feature_shapes, times num_anchors",
    "num_bboxes_stage2": "proposal_train.max_num (the seed's rpn_proposal_max_num)",
    "roi_sample_num": "rcnn.num_expected_total_stage2 RoI rows per image (the seed's 640 held 128 positive "
                      "+ 512 negative slots, of which 512 were filled)",
    "num_classes": "len(data.classes) (the seed's coco_classes), background included",
}


def _seed_notice(name: str, target: str) -> None:
    print(f"config: ModelZoo key '{name}' -> {target}", file=sys.stderr)


def _parse_seed_value(value):
    """A command-line seed value in the seed's Python notation: '(28, 28)', "dict(type='RoIAlign', ...)"."""
    text = value.strip() if isinstance(value, str) else ""
    if text.startswith("dict(") and text.endswith(")"):
        text = "{" + re.sub(r"(\w+)\s*=", r"\1: ", text[5:-1]) + "}"
    elif text.startswith("(") and text.endswith(")"):
        text = "[" + text[1:-1] + "]"
    else:
        return value
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return value


def _seed_assignments(cfg: Config, name: str, value) -> Optional[List[Tuple[str, object]]]:
    """The (our key, value) pairs a seed name sets, None for a name that is not the seed's; ConfigError
    for a derived name or a value this implementation cannot take."""
    if name in SEED_KEYS:
        _seed_notice(name, SEED_KEYS[name])
        return [(SEED_KEYS[name], _parse_seed_value(value))]
    if name in SEED_DERIVED:
        raise ConfigError(f"config key '{name}' (ModelZoo) is derived, not set: it is {SEED_DERIVED[name]}")
    if name in SEED_FIXED:
        fixed, why = SEED_FIXED[name]
        parsed = yaml.safe_load(value) if isinstance(value, str) else value
        if not (parsed == fixed and (isinstance(fixed, float) or type(parsed) is type(fixed))):
            raise ConfigError(f"config key '{name}' (ModelZoo) can only be {fixed!r} here ({why}), got {value!r}")
        print(f"config: ModelZoo key '{name}' = {fixed!r} is this implementation's only setting ({why})",
              file=sys.stderr)
        return []
    if name in SEED_FRACTIONS:
        target, section, total_key = SEED_FRACTIONS[name]
        total = getattr(getattr(cfg, section), total_key)
        count = _coerce(value, int, name)
        _check(0 < count <= total, name, f"must be in 1..{section}.{total_key} ({total}), got {count}")
        _seed_notice(name, f"{target} = {name} / {section}.{total_key} = {count}/{total}")
        return [(target, count / total)]
    if name == "roi_layer":
        layer = _parse_seed_value(value)
        if not isinstance(layer, dict) or layer.get("type", "RoIAlign") != "RoIAlign" \
                or not set(layer) - {"type"} <= set(ROI_LAYER_KEYS):
            raise ConfigError(f"config key 'roi_layer' (ModelZoo): expected dict(type='RoIAlign', out_size=..., "
                              f"mask_out_size=..., sample_num=...), got {value!r}")
        pairs = [(ROI_LAYER_KEYS[k], v) for k, v in layer.items() if k != "type"]
        _seed_notice(name, ", ".join(f"{k} -> {ROI_LAYER_KEYS[k]}" for k in layer if k != "type"))
        return pairs
    if name == "mask_shape":
        shape = _parse_seed_value(value)
        if isinstance(shape, (list, tuple)):                  # the seed's (28, 28): masks are square here
            _check(len(shape) == 2 and shape[0] == shape[1], "rcnn.mask_shape",
                   f"masks are square: expected (n, n), got {value!r}")
            _seed_notice(name, "rcnn.mask_shape (one side of the square)")
            return [("rcnn.mask_shape", shape[0])]
    return None


def _seed_last(items):
    """Fractions after the totals they divide, so the order of keys in a source does not matter."""
    return sorted(items, key=lambda item: item[0] in SEED_FRACTIONS)


# ---------------------------------------------------------------- setting values

def _absolute(path: str, base: str) -> str:
    if not path:
        return path
    path = os.path.expanduser(path)
    return path if os.path.isabs(path) else os.path.normpath(os.path.join(base, path))


def _set_one(cfg: Config, key: str, value, base: str) -> None:
    section, leaf = _resolve(key)
    section_obj = getattr(cfg, section)
    hint = _section_fields(type(section_obj))[leaf]
    value = _coerce(value, hint, f"{section}.{leaf}")
    if f"{section}.{leaf}" in PATH_KEYS:
        value = _absolute(value, base)
    setattr(section_obj, leaf, value)


def set_value(cfg: Config, key: str, value, base: Optional[str] = None) -> None:
    """Set one key (ours, 'section.key', or a ModelZoo seed name). A relative path value is made absolute
    against `base`: the current directory unless given (command-line values)."""
    base = base or os.getcwd()
    assignments = None if "." in key else _seed_assignments(cfg, key, value)
    for target, target_value in assignments if assignments is not None else [(key, value)]:
        _set_one(cfg, target, target_value, base)


def apply_mapping(cfg: Config, mapping: dict, source: str = "") -> None:
    """Apply a YAML mapping: {section: {key: value}} and/or flat {key: value} (the seed's layout).
    Relative paths resolve against ROOT."""
    where = f" (in {source})" if source else ""
    if not isinstance(mapping, dict):
        raise ConfigError(f"config file must hold a mapping of sections{where}")
    sections = _section_fields(Config)
    flat = []
    for section, values in mapping.items():
        if section not in sections:
            flat.append((section, values))
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"config section '{section}' must be a mapping{where}")
        for leaf, value in values.items():
            flat.append((f"{section}.{leaf}", value))
    for key, value in _seed_last(flat):
        try:
            set_value(cfg, key, value, base=ROOT)
        except ConfigError as err:
            raise ConfigError(f"{err}{where}") from None


def resolved_paths(cfg: Config) -> str:
    """The data paths a run uses, absolute, for the first lines of its log."""
    d = cfg.data
    keys = ("coco_root", "mindrecord_dir") if d.dataset == "coco" else ("image_dir", "anno_path", "mindrecord_dir")
    return "paths: " + ", ".join(f"data.{key}={getattr(d, key)}" for key in keys)


def preset_path(name_or_path: str) -> str:
    """'tiny' -> configs/tiny.yaml; a path is returned as is."""
    if os.path.exists(name_or_path):
        return name_or_path
    candidate = os.path.join(CONFIG_DIR, f"{name_or_path}.yaml")
    if os.path.exists(candidate):
        return candidate
    raise ConfigError(f"config file '{name_or_path}' not found (presets: "
                      f"{', '.join(sorted(f[:-5] for f in os.listdir(CONFIG_DIR) if f.endswith('.yaml')))})")


def load_config(path: Optional[str] = None, overrides: Optional[dict] = None) -> Config:
    """Recipe defaults, then the YAML file (if any), then overrides {key: value}; validated. Relative paths of
    the defaults and the file resolve against ROOT, those of the overrides against the current directory."""
    cfg = Config()
    for key in PATH_KEYS:
        section, leaf = key.split(".")
        setattr(getattr(cfg, section), leaf, _absolute(getattr(getattr(cfg, section), leaf), ROOT))
    if path:
        resolved = preset_path(path)
        with open(resolved, "r", encoding="utf-8") as handle:
            try:
                mapping = yaml.safe_load(handle) or {}
            except yaml.YAMLError as err:
                raise ConfigError(f"config file '{resolved}' is not valid YAML: {err}") from None
        apply_mapping(cfg, mapping, resolved)
    for key, value in _seed_last((overrides or {}).items()):
        set_value(cfg, key, value)
    return validate(cfg)


def parse_overrides(tokens: Sequence[str]) -> dict:
    """['--train.base_lr', '0.01', '--flip_ratio=0'] -> {'train.base_lr': '0.01', 'flip_ratio': '0'}."""
    overrides, i = {}, 0
    tokens = list(tokens)
    while i < len(tokens):
        token = tokens[i]
        if not token.startswith("--"):
            raise ConfigError(f"unexpected argument '{token}'; config overrides look like --key value")
        key = token[2:]
        if "=" in key:
            key, value = key.split("=", 1)
            i += 1
        elif i + 1 < len(tokens) and not tokens[i + 1].startswith("--"):
            value = tokens[i + 1]
            i += 2
        else:
            raise ConfigError(f"config override '--{key}' needs a value")
        overrides[key] = value
    return overrides


def config_from_args(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]] = None,
                     default_config: Optional[str] = None):
    """Parse a script's own options plus `--config FILE` and any `--key value` config overrides.

    Returns (args, cfg). Options the script declares win over config keys of the same name.
    """
    parser.add_argument("--config", default=default_config, help="YAML preset name or path (configs/*.yaml)")
    args, rest = parser.parse_known_args(argv)
    try:
        cfg = load_config(args.config, parse_overrides(rest))
    except ConfigError as err:
        parser.error(str(err))
    return args, cfg


def recipe_yaml() -> str:
    """The defaults as YAML (sections in block style, lists inline): `python -m src.config > configs/coco.yaml`."""

    class _Dumper(yaml.SafeDumper):
        pass

    _Dumper.add_representer(list, lambda dumper, data: dumper.represent_sequence(
        "tag:yaml.org,2002:seq", data, flow_style=True))
    header = ("# The ModelZoo Mask R-CNN recipe: COCO 2017, 1280x768 keep-ratio, batch 2, 12 epochs, SGD lr 0.02.\n"
              "# Every value equals the default of src/config.py (a test checks it); copy and edit for your runs.\n")
    return header + yaml.dump(Config().to_dict(), Dumper=_Dumper, sort_keys=False, width=110)


if __name__ == "__main__":
    argparse.ArgumentParser(description="Print the recipe defaults as YAML (configs/coco.yaml).").parse_args()
    print(recipe_yaml(), end="")
