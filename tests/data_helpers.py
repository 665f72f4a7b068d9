"""Helpers shared by the data tests: configs, record and batch readers, JSON files."""
import copy
import json
import os

import numpy as np

import mindspore.dataset as ds

from src.config import load_config
from src.data.mask_bits import unpack_masks

TRAIN_JSON = os.path.join("annotations", "instances_train2017.json")
VAL_JSON = os.path.join("annotations", "instances_val2017.json")
NO_AUGMENTATION = {"data.flip_ratio": 0.0, "data.expand_ratio": 0.0, "data.photo_ratio": 0.0}


def data_cfg(coco_root, mindrecord_dir, **overrides):
    return load_config("tiny", {"data.coco_root": str(coco_root), "data.mindrecord_dir": str(mindrecord_dir),
                                **overrides})


def with_overrides(cfg, **overrides):
    """A copy of cfg with dotted-key overrides given as keyword pairs {'data.flip_ratio': 1.0}."""
    out = copy.deepcopy(cfg)
    for key, value in overrides.items():
        section, leaf = key.split(".")
        setattr(getattr(out, section), leaf, value)
    return out


def batches_of(dataset, pixels=True):
    """Batches as dicts of arrays; the training masks (bits from the pipeline) as 0/1 pixels unless pixels=False."""
    batches = [{k: np.array(v) for k, v in batch.items()}
               for batch in dataset.create_dict_iterator(output_numpy=True, num_epochs=1)]
    if pixels:
        for batch in batches:
            if "mask" in batch:
                batch["mask"] = unpack_masks(batch["mask"], batch["image"].shape[-1])
    return batches


def samples_of(batches):
    """Unbatch: list of per-image dicts."""
    return [{k: v[i] for k, v in batch.items()} for batch in batches for i in range(len(batch["image"]))]


def raw_records(files):
    reader = ds.MindDataset(list(files), shuffle=False)
    return [dict(row) for row in reader.create_dict_iterator(output_numpy=True, num_epochs=1)]


def valid_size(image_shape):
    ori_h, ori_w, scale_h, scale_w = image_shape
    return int(round(ori_h * scale_h)), int(round(ori_w * scale_w))


def write_json(path, payload):
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(payload, handle)


def read_json(path):
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)
