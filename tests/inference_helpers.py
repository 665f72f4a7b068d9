"""Test helpers for the eval / export / offline-inference / predict tests.

- GroundTruthDetector: a fake detector answering with the annotations, to test the eval paths exactly.
- The NARROW model: the tiny config with 1 bottleneck per stage and 32-channel FPN and heads (0.34 M
  parameters instead of 44 M). Same graph structure and the same code paths, but the end-to-end tests
  (eval, export, offline runner, predict) take about a minute instead of three: the full-width tiny
  model's checkpoint and MINDIR are 169 MB each and every compile/run is slower. The tests check that
  the pipeline runs and that its outputs are valid, not accuracy, so the weights are the random
  initialisation. bench/bench_deploy.py runs the same pipeline on the full-width tiny model.
"""
import json
import os
import subprocess
import sys

import cv2
import numpy as np

from src.config import Config, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

NARROW_OVERRIDES = {
    "backbone.resnet_block": [1, 1, 1, 1],
    "backbone.resnet_in_channels": [16, 32, 64, 128],
    "backbone.resnet_out_channels": [32, 64, 128, 256],
    "fpn.fpn_in_channels": [32, 64, 128, 256],
    "fpn.fpn_out_channels": 32,
    "roi.roi_align_out_channels": 32,
    "rpn.rpn_in_channels": 32,
    "rpn.rpn_feat_channels": 32,
    "rcnn.rcnn_in_channels": 32,
    "rcnn.rcnn_fc_out_channels": 64,
    "rcnn.rcnn_mask_out_channels": 32,
}
MODEL_SEED = 0


def narrow_config(data_cfg: Config, **extra) -> Config:
    """The tiny preset, narrowed, reading the synthetic data of `data_cfg`."""
    return load_config("tiny", {**NARROW_OVERRIDES, "data.coco_root": data_cfg.data.coco_root,
                                "data.mindrecord_dir": data_cfg.data.mindrecord_dir, **extra})


def config_cli_args(cfg: Config) -> list:
    """`--key value` arguments reproducing narrow_config(cfg) on a script's command line."""
    args = ["--config", "tiny", "--data.coco_root", cfg.data.coco_root, "--data.mindrecord_dir",
            cfg.data.mindrecord_dir]
    for key, value in NARROW_OVERRIDES.items():
        args += [f"--{key}", json.dumps(value) if isinstance(value, list) else str(value)]
    return args


def run_python(*args, timeout=600):
    env = dict(os.environ, GLOG_v="3")
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def val_paths(cfg: Config):
    """(image directory, annotation file) of the eval split."""
    return (os.path.join(cfg.data.coco_root, cfg.data.val_data_type),
            os.path.join(cfg.data.coco_root, cfg.data.instance_set.format(cfg.data.val_data_type)))


def roi_mask(mask: np.ndarray, box, size: int) -> np.ndarray:
    """(S, S) bilinear samples of a full-image mask at the cell centres of `box` (what RoIAlign targets see)."""
    x1, y1, x2, y2 = box
    step_x, step_y = (x2 - x1) / size, (y2 - y1) / size
    # output cell j centre -> source x1 + (j + 0.5) * step; cv2 pixel centres sit at integer coordinates
    to_source = np.array([[step_x, 0, x1 + 0.5 * step_x - 0.5], [0, step_y, y1 + 0.5 * step_y - 0.5]])
    return cv2.warpAffine(mask.astype(np.float32), to_source, (size, size),
                          flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_CONSTANT)


class GroundTruthDetector:
    """Returns the annotations of each image as detections, in network-input pixels (box * scale).

    shift_px moves every box (and its mask) right by that many ORIGINAL pixels; drop_every_other drops all
    detections of every second image. Records the batch sizes it was called with.
    """

    def __init__(self, coco_gt, classes, max_per_image, mask_size, shift_px=0.0, drop_every_other=False):
        self.coco_gt, self.max_per_image, self.mask_size = coco_gt, max_per_image, mask_size
        self.label_of_category = {c["id"]: classes.index(c["name"]) for c in coco_gt.dataset["categories"]}
        self.shift_px, self.drop_every_other = shift_px, drop_every_other
        self.batch_sizes = []

    def _one_image(self, image_id, image_shape):
        k, size = self.max_per_image, self.mask_size
        boxes, scores = np.zeros((k, 4), np.float32), np.zeros(k, np.float32)
        labels, valid = np.zeros(k, np.int32), np.zeros(k, bool)
        masks = np.zeros((k, size, size), np.float32)
        anns = [a for a in self.coco_gt.imgToAnns[image_id] if not a["iscrowd"]]
        if self.drop_every_other and image_id % 2:
            anns = []
        ori_h, ori_w, scale_h, scale_w = image_shape
        for row, ann in enumerate(anns[:k]):
            x, y, w, h = ann["bbox"]
            box = np.array([x + self.shift_px, y, x + w + self.shift_px, y + h])
            full = np.roll(self.coco_gt.annToMask(ann), int(round(self.shift_px)), axis=1)
            masks[row] = roi_mask(full, box, size)
            boxes[row] = box * [scale_w, scale_h, scale_w, scale_h]
            scores[row], labels[row], valid[row] = 0.9, self.label_of_category[ann["category_id"]], True
        return boxes, scores, labels, valid, masks

    def __call__(self, batch):
        self.batch_sizes.append(len(batch["image_id"]))
        per_image = [self._one_image(int(i), s) for i, s in zip(batch["image_id"], batch["image_shape"])]
        return [np.stack(column) for column in zip(*per_image)]
