"""COCO / TXT annotations -> sharded MindRecord, and the MindSpore input pipeline that reads it back.

MindRecord layout (one row per image):
    image          bytes   the image file exactly as stored on disk (never re-encoded)
    image_id       int32   COCO image id; for TXT data the 1-based line number
    num_instances  int32   n
    annotation     bytes   float32 (n, 6) little-endian: x1, y1, x2, y2, label, iscrowd (input pixels)
    masks          bytes   n COCO compressed-RLE strings joined by b"\\n", each of the image's size
Annotations travel as bytes plus a count because MindRecord cannot store empty numeric arrays.
Masks are decoded in the pipeline, so a record costs about as much disk as its JPEG.

Conversion is streamed (bounded windows of images handed to a worker pool), written into a hidden
temporary directory next to the output, moved into place when complete, and sealed by a manifest written
last: shard files without a matching manifest are never reused. Bad input either raises DatasetError
before anything is written (configuration-level problems) or is skipped, counted and logged per image,
with a summary stored in the manifest (see SKIP_* reasons).

Label conventions:
- COCO: categories are matched BY NAME to `cfg.data.classes`; label = index in that list (1..C-1). A
  category name that is not in the list is an error (filter the annotation file to train on a subset).
- TXT ("other"): `path x1,y1,x2,y2,cls ...`, cls = 0-based index into the foreground classes
  `cfg.data.classes[1:]` (label = cls + 1; the ModelZoo README does not say, and 0 is our padding label).
  The image path is relative to `cfg.data.image_dir`; paths cannot contain spaces. TXT data has no masks:
  each instance's mask is its filled box.
- iscrowd regions are stored but are never training targets: the training pipeline drops them.

Training augmentation follows the recipe: expand (probability expand_ratio * EXPAND_COIN, canvas filled
with the mean), keep-ratio rescale into img_height x img_width, horizontal flip, photometric distortion.
All geometric steps are folded into one affine map applied identically to image, boxes and masks.
"""
from __future__ import annotations

import collections
import concurrent.futures
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np
from pycocotools import mask as mask_utils
from tqdm import tqdm

import mindspore.dataset as ds
from mindspore.mindrecord import FileWriter

from src import atomic_io
from src.config import Config

logger = logging.getLogger(__name__)

RECORD_SCHEMA = {
    "image": {"type": "bytes"},
    "image_id": {"type": "int32"},
    "num_instances": {"type": "int32"},
    "annotation": {"type": "bytes"},
    "masks": {"type": "bytes"},
}
RECORD_COLUMNS = list(RECORD_SCHEMA)
ANNOTATION_WIDTH = 6                         # x1, y1, x2, y2, label, iscrowd
MASK_SEPARATOR = b"\n"                       # never occurs in compressed RLE (characters 48..111)
RECORD_FORMAT_VERSION = 1                    # bump when the layout above changes: old files are rebuilt
FILE_PREFIX = {True: "MaskRcnn_train.mindrecord", False: "MaskRcnn_eval.mindrecord"}
MANIFEST_SUFFIX = ".manifest.json"

TRAIN_COLUMNS = ["image", "image_shape", "box", "label", "valid_num", "mask"]
EVAL_COLUMNS = ["image", "image_shape", "image_id"]

MIN_BOX_SIZE = 1.0                           # boxes narrower or lower than this (pixels, after clipping) are skipped
CONVERT_WINDOW = 32                          # images in flight per conversion worker: bounds memory
MAX_LOGGED_PER_REASON = 10                   # individual warnings per skip reason; the rest only counted
EXPAND_RATIO_RANGE = (1.0, 4.0)              # canvas side / image side for the expand augmentation (mmdet)
EXPAND_COIN = 0.5                            # the recipe's Expand flips its own coin: expand_ratio 1.0 -> 50 %
BRIGHTNESS_DELTA = 32.0                      # photometric distortion ranges (mmdet PhotoMetricDistortion)
CONTRAST_RANGE = (0.5, 1.5)
SATURATION_RANGE = (0.5, 1.5)
HUE_DELTA = 18.0                             # degrees
PHOTO_STEP_PROBABILITY = 0.5                 # each distortion step (and the channel shuffle) has this chance
SHUFFLE_STREAM = 0                           # separates the shuffle RNG stream from per-image streams
SAMPLE_STREAM = 1

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


class DatasetError(ValueError):
    """Input that cannot be converted at all; the message names the file, line or key."""


# ---------------------------------------------------------------- parsing (main process)

class SkipLog:
    """Counts skipped input by reason and logs the first MAX_LOGGED_PER_REASON cases of each."""

    def __init__(self):
        self.counts: collections.Counter = collections.Counter()
        self._logged: collections.Counter = collections.Counter()

    def add(self, reason: str, message: str, amount: int = 1) -> None:
        self.counts[reason] += amount
        self.log(reason, message)

    def log(self, reason: str, message: str) -> None:
        if self._logged[reason] < MAX_LOGGED_PER_REASON:
            logger.warning("skipped (%s): %s", reason, message)
        self._logged[reason] += 1

    def summary(self) -> str:
        return ", ".join(f"{reason}: {n}" for reason, n in sorted(self.counts.items())) or "nothing skipped"


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


def _coco_tasks(cfg: Config, is_training: bool, skips: SkipLog) -> Tuple[List[ImageTask], str]:
    d = cfg.data
    data_type = d.train_data_type if is_training else d.val_data_type
    anno_file = os.path.join(d.coco_root, d.instance_set.format(data_type))
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


def _txt_tasks(cfg: Config) -> Tuple[List[ImageTask], str]:
    """Parse the whole TXT first, so a malformed line fails before any output is written."""
    d = cfg.data
    if not os.path.isfile(d.anno_path):
        raise DatasetError(f"TXT annotation file not found: '{d.anno_path}' (data.anno_path)")
    num_foreground = d.num_classes - 1
    tasks = []
    with open(d.anno_path, "r", encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            fields = line.split()
            if not fields:
                continue
            task = ImageTask(line_no, os.path.join(d.image_dir, fields[0]), None)
            for item in fields[1:]:
                parts = item.split(",")
                try:
                    if len(parts) != 5:
                        raise ValueError
                    x1, y1, x2, y2 = (float(v) for v in parts[:4])
                    cls = int(parts[4])
                except ValueError:
                    raise DatasetError(f"{d.anno_path}:{line_no}: expected 'x1,y1,x2,y2,cls' items after the "
                                       f"image path, got '{item}'") from None
                if not 0 <= cls < num_foreground:
                    raise DatasetError(f"{d.anno_path}:{line_no}: class {cls} out of range 0..{num_foreground - 1} "
                                       f"(0-based index into data.classes[1:])")
                task.boxes.append([x1, y1, x2, y2])
                task.labels.append(cls + 1)
                task.iscrowd.append(0)
                task.segmentations.append(None)
            tasks.append(task)
    return tasks, d.anno_path


# ---------------------------------------------------------------- one image -> one record (workers)

def decode_image(raw: bytes) -> Optional[np.ndarray]:
    """Encoded bytes -> (h, w, 3) uint8 RGB, or None if undecodable. EXIF rotation is ignored, as in COCO."""
    image = cv2.imdecode(np.frombuffer(raw, np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    return None if image is None else cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def _instance_rle(segmentation, box: List[float], height: int, width: int):
    """Compressed RLE of one instance, or None if the polygons are degenerate or the mask is empty."""
    if segmentation is None:                                   # TXT data: the filled box
        x1, y1, x2, y2 = box
        rle = mask_utils.frPyObjects([[x1, y1, x2, y1, x2, y2, x1, y2]], height, width)[0]
    elif isinstance(segmentation, dict):
        if list(segmentation.get("size", [])) != [height, width]:
            return None
        rle = (mask_utils.frPyObjects(segmentation, height, width)
               if isinstance(segmentation.get("counts"), list) else dict(segmentation))
        if isinstance(rle["counts"], str):
            rle["counts"] = rle["counts"].encode("ascii")
    else:
        polygons = [p for p in segmentation if isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0]
        if not polygons:
            return None
        rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    return rle if mask_utils.area(rle) > 0 else None


def encode_record(task: ImageTask, is_training: bool, max_instances: int):
    """One image -> (record dict or None, Counter of skip reasons, [log messages])."""
    counts: collections.Counter = collections.Counter()
    messages: List[Tuple[str, str]] = []

    def skip(reason: str, detail: str = "", amount: int = 1):
        counts[reason] += amount
        messages.append((reason, f"{task.path}{': ' + detail if detail else ''}"))

    try:
        with open(task.path, "rb") as handle:
            raw = handle.read()
    except OSError as err:
        skip(SKIP_MISSING_IMAGE, err.strerror or str(err))
        return None, counts, messages
    image = decode_image(raw)
    if image is None:
        skip(SKIP_CORRUPT_IMAGE, "cannot be decoded (truncated or not an image)")
        return None, counts, messages
    height, width = image.shape[:2]
    if task.size is not None and task.size != (height, width):
        skip(SKIP_SIZE_MISMATCH, f"annotation says {task.size}, file is {(height, width)}")
        return None, counts, messages

    rows, rles = [], []
    for box, label, crowd, segmentation in zip(task.boxes, task.labels, task.iscrowd, task.segmentations):
        clipped = np.clip(box, 0.0, [width, height, width, height])
        if clipped[2] - clipped[0] < MIN_BOX_SIZE or clipped[3] - clipped[1] < MIN_BOX_SIZE:
            skip(SKIP_EMPTY_BOX, f"box {box}")
            continue
        if not np.allclose(clipped, box):
            counts[CLIPPED_BOX] += 1
        rle = _instance_rle(segmentation, clipped.tolist(), height, width)
        if rle is None:
            skip(SKIP_DEGENERATE_MASK, f"instance with box {box}")
            continue
        rows.append([*clipped, label, crowd])
        rles.append(rle["counts"])

    annotation = np.asarray(rows, np.float32).reshape(-1, ANNOTATION_WIDTH)
    targets = np.flatnonzero(annotation[:, 5] == 0)
    if targets.size > max_instances:
        skip(SKIP_OVER_MAX, f"{targets.size} instances, keeping the first {max_instances}",
             amount=int(targets.size - max_instances))
        keep = np.sort(np.concatenate([np.flatnonzero(annotation[:, 5] != 0), targets[:max_instances]]))
        annotation, rles = annotation[keep], [rles[i] for i in keep]
    if is_training and not (annotation[:, 5] == 0).any():
        skip(SKIP_NO_ANNOTATION)
        return None, counts, messages
    record = {"image": raw, "image_id": int(task.image_id), "num_instances": len(rles),
              "annotation": annotation.astype("<f4").tobytes(), "masks": MASK_SEPARATOR.join(rles)}
    return record, counts, messages


# ---------------------------------------------------------------- conversion driver

def mindrecord_files(cfg: Config, is_training: bool) -> List[str]:
    """The shard paths a conversion writes (whether or not they exist yet).

    Named as MindSpore's FileWriter names them: a single shard has no index suffix.
    """
    base = os.path.join(cfg.data.mindrecord_dir, FILE_PREFIX[is_training])
    if cfg.data.mindrecord_shards == 1:
        return [base]
    return [f"{base}{i}" for i in range(cfg.data.mindrecord_shards)]


def manifest_path(cfg: Config, is_training: bool) -> str:
    return os.path.join(cfg.data.mindrecord_dir, FILE_PREFIX[is_training] + MANIFEST_SUFFIX)


def load_manifest(cfg: Config, is_training: bool) -> Optional[dict]:
    """The manifest of a finished conversion (source, settings, record count, skip counts), or None."""
    path = manifest_path(cfg, is_training)
    if not os.path.isfile(path):
        return None
    with open(path, "r", encoding="utf-8") as handle:
        return json.load(handle)


def _fingerprint(cfg: Config, is_training: bool) -> dict:
    """Everything that changes the records; a manifest with a different fingerprint is stale."""
    d = cfg.data
    if d.dataset == "coco":
        data_type = d.train_data_type if is_training else d.val_data_type
        source = os.path.join(d.coco_root, d.instance_set.format(data_type))
        images = os.path.join(d.coco_root, data_type)
    else:
        source, images = d.anno_path, d.image_dir
    stat = os.stat(source) if os.path.isfile(source) else None
    return {"format_version": RECORD_FORMAT_VERSION, "dataset": d.dataset, "training": is_training,
            "source": os.path.abspath(source), "source_size": stat and stat.st_size,
            "source_mtime_ns": stat and stat.st_mtime_ns, "image_dir": os.path.abspath(images),
            "classes": list(d.classes), "max_instance_count": d.max_instance_count,
            "shards": d.mindrecord_shards}


def _reusable(cfg: Config, is_training: bool, fingerprint: dict) -> bool:
    manifest = load_manifest(cfg, is_training)
    if manifest is None:
        return False
    files = mindrecord_files(cfg, is_training)
    complete = all(os.path.isfile(f) and os.path.isfile(f + ".db") for f in files)
    if manifest.get("fingerprint") != fingerprint or not complete:
        logger.info("existing MindRecord under %s is stale or incomplete; converting again",
                    cfg.data.mindrecord_dir)
        return False
    return True


def _remove_outputs(cfg: Config, is_training: bool) -> None:
    """Drop the manifest first, so a conversion interrupted from here on never looks finished."""
    for path in [manifest_path(cfg, is_training)] + [
            p for f in mindrecord_files(cfg, is_training) for p in (f, f + ".db")]:
        if os.path.exists(path):
            os.remove(path)


def _iter_windows(tasks: Sequence[ImageTask], window: int):
    for start in range(0, len(tasks), window):
        yield tasks[start:start + window]


def _encoded_windows(tasks: Sequence[ImageTask], is_training: bool, max_instances: int, workers: int):
    """Yield lists of encode_record results, a bounded window of images at a time, in task order.

    Threads, not processes: the work is file reads and cv2.imdecode, which release the GIL, and forking a
    process that already runs MindSpore threads can deadlock (spawning re-imports MindSpore per worker).
    """
    window = CONVERT_WINDOW * workers
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        for part in _iter_windows(tasks, window):
            yield list(pool.map(lambda task: encode_record(task, is_training, max_instances), part))


def data_to_mindrecord(cfg: Config, is_training: bool) -> List[str]:
    """Convert cfg.data (COCO or TXT) to `mindrecord_shards` MindRecord files; reuse finished ones."""
    d = cfg.data
    files = mindrecord_files(cfg, is_training)
    fingerprint = _fingerprint(cfg, is_training)
    if _reusable(cfg, is_training, fingerprint):
        logger.info("reusing %d complete MindRecord files %s*", len(files), os.path.join(
            d.mindrecord_dir, FILE_PREFIX[is_training]))
        return files

    skips = SkipLog()
    if d.dataset == "coco":
        tasks, source = _coco_tasks(cfg, is_training, skips)
    else:
        tasks, source = _txt_tasks(cfg)
    if not tasks:
        raise DatasetError(f"{source}: no images listed")

    os.makedirs(d.mindrecord_dir, exist_ok=True)
    _remove_outputs(cfg, is_training)
    staging = tempfile.mkdtemp(prefix=f".{FILE_PREFIX[is_training]}.partial-", dir=d.mindrecord_dir)
    try:
        num_records = _write_shards(os.path.join(staging, FILE_PREFIX[is_training]), tasks, cfg, is_training,
                                    skips, source)
        for path in files:
            for suffix in ("", ".db"):
                os.replace(os.path.join(staging, os.path.basename(path) + suffix), path + suffix)
        manifest = {"fingerprint": fingerprint, "records": num_records, "images_listed": len(tasks),
                    "skipped": dict(sorted(skips.counts.items())), "files": [os.path.basename(f) for f in files]}
        atomic_io.write_json(manifest_path(cfg, is_training), manifest, indent=1)
    finally:
        shutil.rmtree(staging, ignore_errors=True)

    logger.info("wrote %d of %d images from %s to %d MindRecord shards (%s)", num_records, len(tasks), source,
                len(files), skips.summary())
    return files


def _write_shards(base: str, tasks: List[ImageTask], cfg: Config, is_training: bool,
                  skips: SkipLog, source: str) -> int:
    writer = FileWriter(base, shard_num=cfg.data.mindrecord_shards, overwrite=True)
    writer.add_schema(RECORD_SCHEMA, "maskrcnn")
    num_records = 0
    progress = tqdm(total=len(tasks), desc=f"MindRecord {'train' if is_training else 'eval'}", unit="img")
    try:
        for results in _encoded_windows(tasks, is_training, cfg.data.max_instance_count,
                                        cfg.data.convert_workers):
            records = []
            for record, counts, messages in results:
                skips.counts.update(counts)
                for reason, message in messages:
                    skips.log(reason, message)
                if record is not None:
                    records.append(record)
            if records:
                writer.write_raw_data(records)
                num_records += len(records)
            progress.update(len(results))
    finally:
        progress.close()
    if num_records == 0:
        raise DatasetError(f"{source}: no image could be converted ({skips.summary()})")
    writer.commit()
    return num_records


# ---------------------------------------------------------------- geometry of one sample

@dataclass
class Geometry:
    """Continuous map from source pixels to input pixels: x' = scale_w * (x + left), optionally mirrored.

    The source is placed at (top, left) on a canvas of canvas_h x canvas_w (the expand augmentation;
    canvas = source without it), the canvas is scaled to out_h x out_w <= H x W, and mirrored if `flip`.
    Pixel i spans [i, i+1).
    """
    canvas_h: int
    canvas_w: int
    top: int
    left: int
    out_h: int
    out_w: int
    flip: bool = False

    @property
    def scale_h(self) -> float:
        return self.out_h / self.canvas_h

    @property
    def scale_w(self) -> float:
        return self.out_w / self.canvas_w

    def image_shape(self) -> np.ndarray:
        return np.array([self.canvas_h, self.canvas_w, self.scale_h, self.scale_w], np.float32)

    def _axis_maps(self) -> Tuple[Tuple[float, float], Tuple[float, float]]:
        """((a_x, b_x), (a_y, b_y)) with x' = a_x * x + b_x in continuous coordinates."""
        ax, bx = self.scale_w, self.scale_w * self.left
        if self.flip:
            ax, bx = -ax, self.out_w - bx
        return (ax, bx), (self.scale_h, self.scale_h * self.top)

    def pixel_matrix(self) -> np.ndarray:
        """2x3 matrix for cv2.warpAffine, which maps pixel indices (centres at i, not i + 0.5)."""
        (ax, bx), (ay, by) = self._axis_maps()
        return np.array([[ax, 0.0, bx + 0.5 * ax - 0.5], [0.0, ay, by + 0.5 * ay - 0.5]], np.float64)

    def boxes(self, boxes: np.ndarray) -> np.ndarray:
        """(n, 4) x1, y1, x2, y2 source pixels -> input pixels, clipped to the valid region."""
        (ax, bx), (ay, by) = self._axis_maps()
        xs, ys = boxes[:, [0, 2]] * ax + bx, boxes[:, [1, 3]] * ay + by
        out = np.stack([xs.min(1), ys.min(1), xs.max(1), ys.max(1)], axis=1)
        return np.clip(out, 0.0, [self.out_w, self.out_h, self.out_w, self.out_h]).astype(np.float32)


def fitted_size(canvas_h: int, canvas_w: int, cfg: Config) -> Tuple[int, int]:
    """(out_h, out_w): keep-ratio fit inside img_height x img_width, or exactly that size."""
    height, width = cfg.data.img_height, cfg.data.img_width
    if not cfg.data.keep_ratio:
        return height, width
    scale = min(height / canvas_h, width / canvas_w)
    return min(height, max(1, int(round(canvas_h * scale)))), min(width, max(1, int(round(canvas_w * scale))))


def _random_geometry(rng: np.random.Generator, height: int, width: int, cfg: Config) -> Geometry:
    canvas_h, canvas_w, top, left = height, width, 0, 0
    if rng.random() < cfg.data.expand_ratio * EXPAND_COIN:
        ratio = rng.uniform(*EXPAND_RATIO_RANGE)
        canvas_h, canvas_w = int(height * ratio), int(width * ratio)
        top, left = int(rng.integers(0, canvas_h - height + 1)), int(rng.integers(0, canvas_w - width + 1))
    out_h, out_w = fitted_size(canvas_h, canvas_w, cfg)
    return Geometry(canvas_h, canvas_w, top, left, out_h, out_w, flip=bool(rng.random() < cfg.data.flip_ratio))


def photometric_distortion(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """Random brightness, contrast, saturation, hue and channel order, each with PHOTO_STEP_PROBABILITY.

    (h, w, 3) RGB in, float32 in [0, 255] out. Same steps and ranges as the recipe (mmdet).
    """
    image = image.astype(np.float32)
    if rng.random() < PHOTO_STEP_PROBABILITY:
        image += rng.uniform(-BRIGHTNESS_DELTA, BRIGHTNESS_DELTA)
    contrast_first = rng.random() < 0.5          # contrast before or after the HSV steps, equally often
    contrast = rng.uniform(*CONTRAST_RANGE) if rng.random() < PHOTO_STEP_PROBABILITY else None
    if contrast is not None and contrast_first:
        image *= contrast
    saturation = rng.uniform(*SATURATION_RANGE) if rng.random() < PHOTO_STEP_PROBABILITY else None
    hue = rng.uniform(-HUE_DELTA, HUE_DELTA) if rng.random() < PHOTO_STEP_PROBABILITY else None
    if saturation is not None or hue is not None:
        hsv = cv2.cvtColor(np.clip(image, 0.0, 255.0) / 255.0, cv2.COLOR_RGB2HSV)   # H in degrees, S, V in [0, 1]
        if saturation is not None:
            hsv[..., 1] = np.clip(hsv[..., 1] * saturation, 0.0, 1.0)
        if hue is not None:
            hsv[..., 0] = np.mod(hsv[..., 0] + hue, 360.0)
        image = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB) * 255.0
    if contrast is not None and not contrast_first:
        image *= contrast
    if rng.random() < PHOTO_STEP_PROBABILITY:
        image = image[..., rng.permutation(3)]
    return np.clip(image, 0.0, 255.0)


def warp_planes(planes: Sequence[np.ndarray], geometry: Geometry, out: np.ndarray) -> np.ndarray:
    """Warp each (h, w) source plane into out[i] (H, W) in place, bilinearly; outside the source is 0.

    Warping plane by plane straight into the (n, H, W) output avoids an HWC -> CHW copy of the largest
    arrays of the pipeline. uint8 planes round at 0.5, so 0/1 masks stay 0/1.
    """
    matrix = geometry.pixel_matrix()
    height, width = out.shape[1:]
    for plane, target in zip(planes, out):
        cv2.warpAffine(np.ascontiguousarray(plane), matrix, (width, height), dst=target, flags=cv2.INTER_LINEAR,
                       borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return out


class _Normaliser:
    """Normalise an RGB image and warp it into the zero-padded (3, H, W) float32 input."""

    def __init__(self, cfg: Config):
        self.height, self.width = cfg.data.img_height, cfg.data.img_width
        self.mean = np.asarray(cfg.data.img_mean, np.float32)
        self.inv_std = 1.0 / np.asarray(cfg.data.img_std, np.float32)

    def __call__(self, image: np.ndarray, geometry: Geometry) -> np.ndarray:
        # normalising first (at source size) makes the warp's zero border the mean colour: expand canvas
        normalised = (image.astype(np.float32) - self.mean) * self.inv_std                  # (h, w, 3)
        out = warp_planes(cv2.split(normalised), geometry, np.empty((3, self.height, self.width), np.float32))
        out[:, geometry.out_h:] = 0.0            # bilinear taps can reach half a pixel past the valid region
        out[:, :, geometry.out_w:] = 0.0
        return out


def _bytes(column: np.ndarray) -> bytes:
    """A MindRecord bytes column arrives as a (1,) numpy 'S' array; tobytes keeps trailing zero bytes."""
    return column.tobytes()


def _scalar(column: np.ndarray) -> int:
    return int(np.asarray(column).reshape(-1)[0])


def decode_instances(num_instances, annotation, masks) -> Tuple[np.ndarray, List[bytes]]:
    """Record columns -> ((n, 6) float32 annotation rows, n compressed RLE strings)."""
    n = _scalar(num_instances)
    rows = np.frombuffer(_bytes(annotation)[:n * ANNOTATION_WIDTH * 4], "<f4").reshape(n, ANNOTATION_WIDTH)
    rles = _bytes(masks).split(MASK_SEPARATOR) if n else []
    return rows, rles


class TrainTransform:
    """Record columns -> training columns; every random decision comes from (seed, epoch, image_id)."""

    def __init__(self, cfg: Config, epoch: int):
        self.cfg, self.epoch = cfg, epoch
        self.normalise = _Normaliser(cfg)
        self.max_instances = cfg.data.max_instance_count

    def __call__(self, image, image_id, num_instances, annotation, masks):
        d = self.cfg.data
        rng = np.random.default_rng([self.cfg.train.seed, self.epoch, SAMPLE_STREAM, _scalar(image_id)])
        rgb = decode_image(_bytes(image))
        height, width = rgb.shape[:2]
        rows, rles = decode_instances(num_instances, annotation, masks)
        targets = np.flatnonzero(rows[:, 5] == 0)[:self.max_instances]       # crowd regions are not targets
        n = targets.size

        geometry = _random_geometry(rng, height, width, self.cfg)
        if rng.random() < d.photo_ratio:
            rgb = photometric_distortion(rng, rgb)
        out_image = self.normalise(rgb, geometry)                              # (3, H, W)

        box = np.zeros((self.max_instances, 4), np.float32)
        label = np.zeros(self.max_instances, np.int32)
        valid = np.zeros(self.max_instances, np.bool_)
        mask = np.zeros((self.max_instances, d.img_height, d.img_width), np.uint8)
        if n:
            box[:n] = geometry.boxes(rows[targets, :4])
            label[:n] = rows[targets, 4].astype(np.int32)
            valid[:n] = True
            source_masks = mask_utils.decode([{"size": [height, width], "counts": rles[i]} for i in targets])
            warp_planes(source_masks.transpose(2, 0, 1), geometry, mask[:n])          # (h, w, n) -> (n, H, W)
        return out_image, geometry.image_shape(), box, label, valid, mask


class EvalTransform:
    """Record columns -> eval columns: keep-ratio rescale, normalise, pad; no randomness."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.normalise = _Normaliser(cfg)

    def __call__(self, image, image_id):
        rgb = decode_image(_bytes(image))
        height, width = rgb.shape[:2]
        geometry = Geometry(height, width, 0, 0, *fitted_size(height, width, self.cfg))
        return self.normalise(rgb, geometry), geometry.image_shape(), np.int32(_scalar(image_id))


# ---------------------------------------------------------------- pipeline

def sample_order(num_records: int, is_training: bool, seed: int, epoch: int,
                 num_shards: int = 1, shard_id: int = 0) -> np.ndarray:
    """Record positions one shard reads in one epoch.

    Training: a (seed, epoch) permutation dealt round-robin to the shards, each cut to the same length
    (num_records // num_shards) so that every device runs the same number of steps; the few records cut
    change from epoch to epoch. Eval: every record once, in order, dealt round-robin.
    """
    if not 0 <= shard_id < num_shards:
        raise ValueError(f"shard_id must be in [0, {num_shards}), got {shard_id}")
    if not is_training:
        return np.arange(shard_id, num_records, num_shards)
    order = np.random.default_rng([seed, epoch, SHUFFLE_STREAM]).permutation(num_records)
    return order[shard_id::num_shards][:num_records // num_shards]


def create_maskrcnn_dataset(cfg: Config, files: Sequence[str], is_training: bool, batch_size: int,
                            num_shards: int = 1, shard_id: int = 0, epoch: int = 0):
    """Batched MindSpore dataset of one epoch; columns TRAIN_COLUMNS or EVAL_COLUMNS (docs/architecture.md).

    The same (cfg.train.seed, epoch) always yields the same batches, whatever the worker count, so a
    resumed run rebuilds epoch e and calls `.skip(k)` to continue after k finished batches.
    """
    files = list(files)
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        raise DatasetError(f"MindRecord files not found: {missing}")
    num_records = ds.MindDataset(files, columns_list=["image_id"], shuffle=False).get_dataset_size()
    order = sample_order(num_records, is_training, cfg.train.seed, epoch, num_shards, shard_id)
    if is_training and order.size < batch_size:
        raise DatasetError(f"shard {shard_id}/{num_shards} holds {order.size} training images, fewer than "
                           f"one batch of {batch_size}")
    workers = cfg.data.num_parallel_workers
    sampler = ds.SubsetSampler(order.tolist())
    if is_training:
        dataset = ds.MindDataset(files, columns_list=RECORD_COLUMNS, sampler=sampler)
        dataset = dataset.map(TrainTransform(cfg, epoch), input_columns=RECORD_COLUMNS,
                              output_columns=TRAIN_COLUMNS, num_parallel_workers=workers)
        columns = TRAIN_COLUMNS
    else:
        dataset = ds.MindDataset(files, columns_list=["image", "image_id"], sampler=sampler)
        dataset = dataset.map(EvalTransform(cfg), input_columns=["image", "image_id"],
                              output_columns=EVAL_COLUMNS, num_parallel_workers=workers)
        columns = EVAL_COLUMNS
    return dataset.project(columns).batch(batch_size, drop_remainder=is_training)
