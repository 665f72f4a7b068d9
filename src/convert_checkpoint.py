"""Convert a torchvision checkpoint (or a ModelZoo ResNet50) into this model's parameter names.

Two kinds of source are detected from the names:
  - an ImageNet ResNet50, written as ``backbone.*`` for --pre_trained:
    * a MindSpore ModelZoo resnet50 .ckpt: ``conv1.weight``, ``bn1.gamma``, ``layer1.0.conv1.weight``,
      ``layer1.0.down_sample_layer.0.weight``, ``layer1.0.down_sample_layer.1.moving_mean``, ...,
      classifier ``end_point.*`` and optimizer entries (dropped);
    * a torchvision state dict saved as .npz (or .pth when PyTorch is importable): ``bn1.weight``,
      ``bn1.running_var``, ``layer1.0.downsample.0.weight``, ..., classifier ``fc.*`` and
      ``num_batches_tracked`` (dropped);
  - a whole torchvision Mask R-CNN R50-FPN (``backbone.body.*``, ``backbone.fpn.*``, ``rpn.head.*``,
    ``roi_heads.*``; current and pre-0.13 module names), written as a complete MaskRcnnResnet50 checkpoint
    that eval.py, predict.py, export.py and --pre_trained load. Its class-indexed layers (box classifier,
    box regressor, mask logits) either have one slot per class of the config, or are torchvision's COCO
    heads with 91 slots indexed by COCO category id (gaps included), mapped onto the 81 COCO classes of
    the config (background first) by category id.
Every tensor must be found with the right shape; otherwise nothing is written and the error names the
missing, mismatched and unexpected tensors.

    python -m src.convert_checkpoint --src resnet50.ckpt --out resnet50_backbone.ckpt
    python -m src.convert_checkpoint --src maskrcnn_resnet50_fpn_coco.pth --out maskrcnn_tv.ckpt
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

if not __package__:                 # run as a file: python src/convert_checkpoint.py
    import _file_run  # noqa: F401

from src.config import COCO_CLASSES, Config, config_from_args, load_config

BACKBONE_PREFIX = "backbone."
# torchvision BatchNorm leaf -> MindSpore BatchNorm leaf
TORCH_BN_LEAVES = {"weight": "gamma", "bias": "beta", "running_mean": "moving_mean", "running_var": "moving_variance"}
MODELZOO_DOWNSAMPLE = "down_sample_layer"
DOWNSAMPLE = "downsample"
CLASSIFIER_MODULES = ("fc", "end_point")
DROPPED_LEAVES = ("num_batches_tracked",)
OPTIMIZER_ENTRIES = ("learning_rate", "global_step", "momentum")
OPTIMIZER_PREFIXES = ("moments.", "accum.", "stat.")
# training scripts (torchvision's references, ours) wrap the weights in a dict under one of these keys
STATE_DICT_KEYS = ("state_dict", "model")

KIND_BACKBONE, KIND_DETECTOR = "ResNet50 backbone", "Mask R-CNN"
DETECTOR_PREFIXES = ("backbone.body.", "backbone.fpn.", "rpn.head.", "roi_heads.")
# torchvision module -> ours; `(?:\.0)?` etc. accept the module names torchvision used before 0.13, which
# its official COCO weights file still has (rpn.head.conv, fpn.inner_blocks.0, mask_head.mask_fcn1).
Renaming = Union[str, Callable[[re.Match], str]]
DETECTOR_MODULES: Tuple[Tuple[str, Renaming], ...] = (
    (r"backbone\.body\.(.+)", r"backbone.\1"),
    (r"backbone\.fpn\.inner_blocks\.(\d)(?:\.0)?", r"neck.lateral_convs.\1"),
    (r"backbone\.fpn\.layer_blocks\.(\d)(?:\.0)?", r"neck.fpn_convs.\1"),
    (r"rpn\.head\.conv(?:\.0\.0)?", "rpn.rpn_conv"),
    (r"rpn\.head\.cls_logits", "rpn.rpn_cls"),
    (r"rpn\.head\.bbox_pred", "rpn.rpn_reg"),
    (r"roi_heads\.box_head\.(fc6|fc7)", r"rcnn_cls.\1"),
    (r"roi_heads\.box_predictor\.(cls_score|bbox_pred)", r"rcnn_cls.\1"),
    (r"roi_heads\.mask_head\.mask_fcn([1-4])", r"rcnn_mask.mask_fcn\1"),
    (r"roi_heads\.mask_head\.([0-3])\.0", lambda match: f"rcnn_mask.mask_fcn{int(match.group(1)) + 1}"),
    (r"roi_heads\.mask_predictor\.(conv5_mask|mask_fcn_logits)", r"rcnn_mask.\1"),
)
# our class-indexed modules -> rows per class (4 box deltas per class in the regressor)
CLASS_ROWS = {"rcnn_cls.cls_score": 1, "rcnn_cls.bbox_pred": 4, "rcnn_mask.mask_fcn_logits": 1}
# COCO 2017 category id of each of COCO_CLASSES[1:]; torchvision's COCO heads have slot = category id
COCO_CATEGORY_IDS = (
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27, 28, 31, 32, 33, 34,
    35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59, 60, 61, 62, 63,
    64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84, 85, 86, 87, 88, 89, 90)
COCO_SLOTS = 91                     # background + the 90 category ids of the 2014 paper, 10 of them unused
# model state that is not a weight: a fresh checkpoint starts it here
FRESH_STATE = {"sample_seed": np.array(0, np.int32)}


def grouped_names(names: Sequence[str]) -> List[str]:
    """Every name, the leaves of one module folded together in first-seen order, so that an error can name
    each tensor and stay short: ['a.b.weight', 'a.b.bias', 'c'] -> ['a.b.{weight,bias}', 'c']."""
    leaves: Dict[str, List[str]] = {}
    for name in names:
        module, _, leaf = name.rpartition(".")
        leaves.setdefault(module, []).append(leaf)
    out = []
    for module, names_of_module in leaves.items():
        if not module:
            out.extend(names_of_module)
        elif len(names_of_module) == 1:
            out.append(f"{module}.{names_of_module[0]}")
        else:
            out.append(f"{module}.{{{','.join(names_of_module)}}}")
    return out


class ConversionError(ValueError):
    """The source does not hold the expected network; the message names the tensors."""


@dataclass
class ConversionReport:
    kind: str = KIND_BACKBONE
    converted: List[str] = field(default_factory=list)                   # target names written
    dropped: List[str] = field(default_factory=list)                     # classifier / optimizer / counters
    unexpected: List[str] = field(default_factory=list)                  # source names with no target
    missing: List[str] = field(default_factory=list)                     # target names with no source
    mismatched: List[Tuple[str, tuple, tuple]] = field(default_factory=list)   # (target, source, target shape)
    class_mapping: str = ""                                              # how class slots were mapped, if any
    fresh: List[str] = field(default_factory=list)                       # non-weight state written at its start

    @property
    def ok(self) -> bool:
        return not (self.unexpected or self.missing or self.mismatched)

    def problems(self) -> str:
        def listing(names):
            return ", ".join(names)
        where = "backbone" if self.kind == KIND_BACKBONE else "model"
        parts = []
        if self.missing:
            parts.append(f"missing {len(self.missing)}: {listing(grouped_names(self.missing))}")
        if self.mismatched:
            parts.append(f"shape mismatch {len(self.mismatched)}: " + listing(
                [f"{name} {src} in source vs {dst} in {where}" for name, src, dst in self.mismatched]))
        if self.unexpected:
            parts.append(f"unexpected {len(self.unexpected)}: {listing(grouped_names(self.unexpected))}")
        if any(name.rsplit(".", 1)[0] in CLASS_ROWS for name, _, _ in self.mismatched):
            parts.append(f"class layers need one slot per class of data.classes ({self.class_mapping}), or "
                         f"torchvision's {COCO_SLOTS} COCO slots with the COCO classes (configs/coco.yaml)")
        return "; ".join(parts)


# ---------------------------------------------------------------- reading sources

def _read_pth(path: str) -> Dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise ConversionError(
            f"reading '{path}' needs PyTorch, which is not installed here. Save the state dict as .npz where "
            f"PyTorch is available and convert that: python -c \"import numpy, torch; sd = torch.load('{path}', "
            f"map_location='cpu'); numpy.savez('weights.npz', **{{k: v.numpy() for k, v in sd.items()}})\"") from None
    state = torch.load(path, map_location="cpu")
    if isinstance(state, dict):
        for key in STATE_DICT_KEYS:
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    return {name: value.detach().cpu().numpy() for name, value in state.items() if hasattr(value, "detach")}


def read_source(path: str) -> Dict[str, np.ndarray]:
    """name -> array from a .ckpt (MindSpore), .npz or .pth file."""
    if not os.path.isfile(path):
        raise ConversionError(f"source checkpoint '{path}' does not exist")
    extension = os.path.splitext(path)[1].lower()
    if extension == ".ckpt":
        from src.checkpoint import CheckpointError, read_checkpoint
        try:
            return {name: param.asnumpy() for name, param in read_checkpoint(path).items()}
        except CheckpointError as err:
            raise ConversionError(str(err)) from None
    if extension == ".npz":
        try:
            with np.load(path, allow_pickle=False) as archive:
                return {name: archive[name] for name in archive.files}
        except (ValueError, OSError) as err:
            raise ConversionError(f"'{path}' is not a readable .npz archive: {err}") from None
    if extension in (".pth", ".pt"):
        return _read_pth(path)
    raise ConversionError(f"'{path}': unknown checkpoint type '{extension}' (expected .ckpt, .npz or .pth)")


def source_kind(source: Dict[str, np.ndarray]) -> str:
    """KIND_DETECTOR when any name is a torchvision detector's, else KIND_BACKBONE."""
    return KIND_DETECTOR if any(name.startswith(DETECTOR_PREFIXES) for name in source) else KIND_BACKBONE


# ---------------------------------------------------------------- renaming

def _is_dropped(name: str) -> bool:
    return (name in OPTIMIZER_ENTRIES or name.startswith(OPTIMIZER_PREFIXES)
            or name.split(".", 1)[0] in CLASSIFIER_MODULES or name.rsplit(".", 1)[-1] in DROPPED_LEAVES)


def _batch_norm_modules(source: Dict[str, np.ndarray]) -> set:
    """torchvision marks BatchNorm modules by their running statistics; their weight/bias are gamma/beta."""
    return {name.rsplit(".", 1)[0] for name in source if name.endswith(".running_mean")}


def target_name(name: str, batch_norm_modules: set) -> str:
    """ResNet50 source name -> backbone parameter name (ModelZoo and torchvision layouts)."""
    module, leaf = name.rsplit(".", 1)
    if module in batch_norm_modules:
        leaf = TORCH_BN_LEAVES.get(leaf, leaf)
    parts = [DOWNSAMPLE if part == MODELZOO_DOWNSAMPLE else part for part in module.split(".")]
    return BACKBONE_PREFIX + ".".join(parts + [leaf])


def detector_target_name(name: str, batch_norm_modules: set) -> Optional[str]:
    """torchvision Mask R-CNN name -> our parameter name, or None when it has no counterpart."""
    module, leaf = name.rsplit(".", 1)
    for pattern, renaming in DETECTOR_MODULES:
        match = re.fullmatch(pattern, module)
        if match:
            target = renaming(match) if callable(renaming) else match.expand(renaming)
            if module in batch_norm_modules:
                leaf = TORCH_BN_LEAVES.get(leaf, leaf)
            return f"{target}.{leaf}"
    return None


def class_slots(source_slots: int, classes: Sequence[str]) -> Tuple[Optional[np.ndarray], str]:
    """Source slot of each of our classes (None if the head cannot map) and how it was chosen."""
    if source_slots == len(classes):
        return np.arange(source_slots), f"{source_slots} slots, one per class"
    if source_slots == COCO_SLOTS and tuple(classes) == COCO_CLASSES:
        return np.array((0,) + COCO_CATEGORY_IDS), f"{COCO_SLOTS} COCO slots mapped by category id"
    return None, f"{source_slots} slots in source, {len(classes)} classes in data.classes"


def _select_classes(value: np.ndarray, slots: np.ndarray, rows_per_class: int) -> np.ndarray:
    """Rows of a class-indexed tensor (slot-major, rows_per_class rows per slot) for the given slots."""
    rows = (slots[:, None] * rows_per_class + np.arange(rows_per_class)[None, :]).reshape(-1)
    return value[rows]


def _as_target(value: np.ndarray) -> np.ndarray:
    return value.astype(np.float32) if np.issubdtype(value.dtype, np.floating) else value


def convert_resnet50_state(source: Dict[str, np.ndarray], target_shapes: Dict[str, tuple]
                           ) -> Tuple[Dict[str, np.ndarray], ConversionReport]:
    """Rename and check `source` against the backbone's {name: shape}; float tensors become float32."""
    report = ConversionReport(KIND_BACKBONE)
    batch_norm_modules = _batch_norm_modules(source)
    converted: Dict[str, np.ndarray] = {}
    for name, value in source.items():
        if _is_dropped(name):
            report.dropped.append(name)
            continue
        target = target_name(name, batch_norm_modules) if "." in name else BACKBONE_PREFIX + name
        _place(name, target, value, target_shapes, converted, report)
    _finish(report, target_shapes, converted)
    return converted, report


def convert_detector_state(source: Dict[str, np.ndarray], target_shapes: Dict[str, tuple],
                           classes: Sequence[str]) -> Tuple[Dict[str, np.ndarray], ConversionReport]:
    """Rename and check a torchvision Mask R-CNN state dict against the model's {name: shape}.

    Class-indexed tensors keep the source slots of our classes (`class_slots`); the model state of
    FRESH_STATE is written at its start. Float tensors become float32.
    """
    report = ConversionReport(KIND_DETECTOR)
    batch_norm_modules = _batch_norm_modules(source)
    converted: Dict[str, np.ndarray] = {}
    for name, value in source.items():
        if name.rsplit(".", 1)[-1] in DROPPED_LEAVES:
            report.dropped.append(name)
            continue
        target = detector_target_name(name, batch_norm_modules) if "." in name else None
        module = target.rsplit(".", 1)[0] if target else ""
        if module in CLASS_ROWS and target in target_shapes:
            rows_per_class = CLASS_ROWS[module]
            slots, report.class_mapping = class_slots(value.shape[0] // rows_per_class, classes)
            if slots is not None and value.shape[0] % rows_per_class == 0:
                value = _select_classes(value, slots, rows_per_class)
        _place(name, target, value, target_shapes, converted, report)
    for name, value in FRESH_STATE.items():
        if name in target_shapes and name not in converted:
            converted[name] = value
            report.fresh.append(name)
    _finish(report, target_shapes, converted)
    return converted, report


def _place(name, target, value, target_shapes, converted, report) -> None:
    """Put one renamed source tensor, or record why it cannot go anywhere."""
    if target is None or target not in target_shapes:
        report.unexpected.append(name)
    elif tuple(value.shape) != tuple(target_shapes[target]):
        report.mismatched.append((target, tuple(value.shape), tuple(target_shapes[target])))
    else:
        converted[target] = _as_target(value)
        report.converted.append(target)


def _finish(report, target_shapes, converted) -> None:
    mismatched = {m[0] for m in report.mismatched}
    report.missing = [name for name in target_shapes if name not in converted and name not in mismatched]


def backbone_shapes(cfg: Config) -> Dict[str, tuple]:
    """{backbone.<name>: shape} of the model's ResNet50 for this config."""
    from src.maskrcnn.resnet50 import ResNet50
    return {BACKBONE_PREFIX + p.name: tuple(p.shape) for p in ResNet50(cfg).get_parameters()}


def model_shapes(cfg: Config) -> Dict[str, tuple]:
    """{name: shape} of every MaskRcnnResnet50 parameter for this config."""
    from src.maskrcnn.mask_rcnn_r50 import MaskRcnnResnet50
    return {p.name: tuple(p.shape) for p in MaskRcnnResnet50(cfg).get_parameters()}


def convert_checkpoint(src: str, out: str, cfg: Optional[Config] = None) -> ConversionReport:
    """Convert `src` and write `out` atomically; raise ConversionError (writing nothing) on any problem."""
    from mindspore import Tensor
    from src.checkpoint import write_checkpoint_atomic

    cfg = cfg or load_config()
    source = read_source(src)
    if source_kind(source) == KIND_DETECTOR:
        converted, report = convert_detector_state(source, model_shapes(cfg), cfg.data.classes)
    else:
        converted, report = convert_resnet50_state(source, backbone_shapes(cfg))
    if not report.ok:
        raise ConversionError(f"'{src}' does not match the {report.kind}: {report.problems()}")
    write_checkpoint_atomic(out, [{"name": name, "data": Tensor(value)} for name, value in converted.items()])
    return report


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", required=True, help="ResNet50 (ModelZoo .ckpt, torchvision .npz/.pth) or "
                                                     "torchvision Mask R-CNN (.npz/.pth) checkpoint")
    parser.add_argument("--out", required=True, help="output .ckpt: backbone.* names, or the whole model")
    args, cfg = config_from_args(parser, argv)
    try:
        report = convert_checkpoint(args.src, args.out, cfg)
    except ConversionError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if report.kind == KIND_BACKBONE:
        print(f"wrote {args.out}: {len(report.converted)} backbone tensors "
              f"(dropped {len(report.dropped)} classifier/optimizer/counter entries)")
    else:
        print(f"wrote {args.out}: {len(report.converted)} Mask R-CNN tensors, class layers: {report.class_mapping} "
              f"(dropped {len(report.dropped)} counters; {', '.join(report.fresh) or 'no state'} at its start)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
