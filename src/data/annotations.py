"""Annotation files -> one ImageTask per image, and the reasons input is skipped.

Label conventions:
- COCO: categories are matched BY NAME to `cfg.data.classes`; label = index in that list (1..C-1). A
  category name that is not in the list is an error (filter the annotation file to train on a subset).
- TXT ("other"): `path x1,y1,x2,y2,cls ...`, cls = the label itself, an index into `cfg.data.classes`
  (1..C-1; 0 is the background), as in the ModelZoo. The image path is relative to `cfg.data.image_dir`;
  paths cannot contain spaces. TXT data has no masks: each instance's mask is its filled box. A line that
  is wrong in itself (syntax, class, box with x2 <= x1 or y2 <= y1, image file that does not exist) stops
  the conversion before anything is written; what only the image shows (undecodable, box outside it) is
  skipped like COCO input, the message naming file:line.
- iscrowd regions are stored but are never training targets: the training pipeline drops them.
"""
from __future__ import annotations

import collections
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from src.config import Config
from src.data.records import DatasetError

logger = logging.getLogger(__name__)

MAX_LOGGED_PER_REASON = 10                   # individual warnings per skip reason; the rest only counted

# Skip reasons (manifest "skipped" keys). Image-level reasons drop the image; the rest drop instances.
SKIP_MISSING_IMAGE = "missing image file"
SKIP_CORRUPT_IMAGE = "corrupt image file"
SKIP_SIZE_MISMATCH = "image size differs from annotation"
SKIP_NO_ANNOTATION = "no valid annotation (training)"
SKIP_ORPHAN_ANNOTATION = "annotation for unknown image id"
SKIP_EMPTY_BOX = "zero-area or out-of-image box"
SKIP_DEGENERATE_MASK = "degenerate polygon or empty mask"
SKIP_OVER_MAX = "instances beyond max_instance_count"
CLIPPED_BOX = "box clipped to the image"
IMAGE_REASONS = (SKIP_MISSING_IMAGE, SKIP_CORRUPT_IMAGE, SKIP_SIZE_MISMATCH, SKIP_NO_ANNOTATION)


class SkipLog:
    """Counts skipped input by reason; keeps the first MAX_LOGGED_PER_REASON messages of each until flush().

    Messages wait for flush(), so that the annotation file's warnings follow the line saying why the
    conversion runs.
    """

    def __init__(self):
        self.counts: collections.Counter = collections.Counter()
        self._noted: collections.Counter = collections.Counter()
        self._pending: List[Tuple[str, str]] = []

    def add(self, reason: str, message: str, amount: int = 1) -> None:
        self.counts[reason] += amount
        self.note(reason, message)

    def note(self, reason: str, message: str) -> None:
        if self._noted[reason] < MAX_LOGGED_PER_REASON:
            self._pending.append((reason, message))
        self._noted[reason] += 1

    def flush(self) -> None:
        for reason, message in self._pending:
            logger.warning("skipped (%s): %s", reason, message)
        self._pending.clear()


def describe_skips(counts: Dict[str, int]) -> str:
    """'skipped images: reason n, ...; skipped or changed annotations: reason n, ...' or 'nothing skipped'."""
    def listed(reasons):
        return ", ".join(f"{reason} {counts[reason]}" for reason in reasons)
    images = [r for r in IMAGE_REASONS if counts.get(r)]
    others = sorted(r for r in counts if r not in IMAGE_REASONS and counts[r])
    parts = ([f"skipped images: {listed(images)}"] if images else []) + (
        [f"skipped or changed annotations: {listed(others)}"] if others else [])
    return "; ".join(parts) or "nothing skipped"


@dataclass
class ImageTask:
    """Everything a conversion worker needs to turn one image into a record."""
    image_id: int
    path: str
    size: Optional[Tuple[int, int]]          # (height, width) promised by the annotation file, if any
    boxes: List[List[float]] = field(default_factory=list)          # x1, y1, x2, y2
    labels: List[int] = field(default_factory=list)
    iscrowd: List[int] = field(default_factory=list)
    segmentations: List[object] = field(default_factory=list)       # COCO polygons / RLE; None = filled box
    origin: str = ""                         # where the annotation file lists the image ("file:line" for TXT)

    def where(self) -> str:
        return f"{self.origin} ({self.path})" if self.origin else self.path


def annotation_file(cfg: Config, is_training: bool) -> str:
    """The file the images and their objects are listed in: COCO JSON of the split, or the TXT file."""
    d = cfg.data
    if d.dataset != "coco":
        return d.anno_path
    return os.path.join(d.coco_root, d.instance_set.format(d.train_data_type if is_training else d.val_data_type))


def coco_tasks(cfg: Config, is_training: bool, skips: SkipLog) -> Tuple[List[ImageTask], str]:
    d = cfg.data
    data_type = d.train_data_type if is_training else d.val_data_type
    anno_file = annotation_file(cfg, is_training)
    if not os.path.isfile(anno_file):
        raise DatasetError(f"COCO annotation file not found: {anno_file} (check data.coco_root / "
                           f"data.instance_set / data.{'train' if is_training else 'val'}_data_type)")
    try:
        with open(anno_file, "r", encoding="utf-8") as handle:
            coco = json.load(handle)
    except json.JSONDecodeError as err:
        raise DatasetError(f"{anno_file}: not valid JSON: {err}") from None
    for key in ("images", "annotations", "categories"):
        if not isinstance(coco.get(key), list):
            raise DatasetError(f"{anno_file}: missing list '{key}'")

    class_index = {name: i for i, name in enumerate(d.classes)}
    unknown = sorted(c["name"] for c in coco["categories"] if c["name"] not in class_index)
    if unknown:
        raise DatasetError(f"{anno_file}: categories {unknown} are not in data.classes; add them to the "
                           f"config or remove them from the annotation file")
    label_of_category = {c["id"]: class_index[c["name"]] for c in coco["categories"]}

    tasks: Dict[int, ImageTask] = {}
    image_dir = os.path.join(d.coco_root, data_type)
    for index, image in enumerate(coco["images"]):
        _require(image, ("id", "file_name", "height", "width"), f"{anno_file}: images[{index}]")
        tasks[image["id"]] = ImageTask(image["id"], os.path.join(image_dir, image["file_name"]),
                                       (int(image["height"]), int(image["width"])))
    for index, ann in enumerate(coco["annotations"]):
        _require(ann, ("image_id", "category_id", "bbox"), f"{anno_file}: annotations[{index}]")
        if ann["category_id"] not in label_of_category:
            raise DatasetError(f"{anno_file}: annotation id {ann.get('id')} has category_id "
                               f"{ann['category_id']}, which is not in 'categories'")
        task = tasks.get(ann["image_id"])
        if task is None:
            skips.add(SKIP_ORPHAN_ANNOTATION, f"{anno_file}: annotation id {ann.get('id')} refers to "
                                              f"image id {ann['image_id']}, which is not in 'images'")
            continue
        x, y, w, h = (float(v) for v in ann["bbox"])
        task.boxes.append([x, y, x + w, y + h])
        task.labels.append(label_of_category[ann["category_id"]])
        task.iscrowd.append(int(ann.get("iscrowd", 0)))
        task.segmentations.append(ann.get("segmentation") or [])
    return [tasks[i] for i in sorted(tasks)], anno_file


def _require(entry: dict, keys: Sequence[str], where: str) -> None:
    missing = [key for key in keys if key not in entry]
    if missing:
        raise DatasetError(f"{where} lacks {missing}")


def txt_tasks(cfg: Config) -> Tuple[List[ImageTask], str]:
    """Parse and check the whole TXT first, so a bad line stops before any output is written."""
    d = cfg.data
    if not os.path.isfile(d.anno_path):
        raise DatasetError(f"TXT annotation file not found: '{d.anno_path}' (data.anno_path)")
    tasks, errors = [], []
    with open(d.anno_path, "r", encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            fields = line.split()
            if not fields:
                continue
            where = f"{d.anno_path}:{line_no}"
            try:
                tasks.append(_txt_line(fields, where, line_no, d.image_dir, len(d.classes)))
            except DatasetError as err:
                errors.append(str(err))
    if errors:
        more = f" (and {len(errors) - 1} more bad line{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
        raise DatasetError(f"{errors[0]}{more}; fix or remove the line (README: the \"other\" TXT format)")
    return tasks, d.anno_path


def _txt_line(fields: List[str], where: str, line_no: int, image_dir: str, num_classes: int) -> ImageTask:
    """One non-empty TXT line -> ImageTask; DatasetError names `where` (file:line) and what is wrong."""
    task = ImageTask(line_no, os.path.join(image_dir, fields[0]), None, origin=where)
    if not os.path.isfile(task.path):
        raise DatasetError(f"{where}: image file {task.path} does not exist (paths are relative to "
                           f"data.image_dir)")
    for item in fields[1:]:
        parts = item.split(",")
        try:
            if len(parts) != 5:
                raise ValueError
            x1, y1, x2, y2 = (float(v) for v in parts[:4])
            cls = int(parts[4])
        except ValueError:
            raise DatasetError(f"{where}: expected 'x1,y1,x2,y2,cls' items after the image path, "
                               f"got '{item}'") from None
        if cls == 0:
            raise DatasetError(f"{where}: class 0 is the background; object classes are 1..{num_classes - 1} "
                               f"(the index into data.classes)")
        if not 0 < cls < num_classes:
            raise DatasetError(f"{where}: class {cls} is past data.classes; object classes are "
                               f"1..{num_classes - 1} (the index into data.classes)")
        if x2 <= x1 or y2 <= y1:
            raise DatasetError(f"{where}: box '{item}' has {'x2 <= x1' if x2 <= x1 else 'y2 <= y1'}; boxes are "
                               f"x1,y1,x2,y2 with x1 < x2 and y1 < y2")
        task.boxes.append([x1, y1, x2, y2])
        task.labels.append(cls)
        task.iscrowd.append(0)
        task.segmentations.append(None)
    return task
