"""What the after-training scripts share, written once: from network outputs to COCO results and metrics.

eval.py, postprocess.py (Ascend 310 outputs) and predict.py all turn the fixed-size network outputs
(boxes in network-input pixels, 28x28 mask probabilities) into per-image detections in original image
coordinates through this module, so the three paths cannot drift apart. It also holds their common
plumbing: reading an image as the eval pipeline does, atomic writes, the CLI error wrapper, and building
the inference network from a checkpoint.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import tempfile
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

# Order of COCOeval.stats: the 12 lines of COCOeval.summarize().
COCO_METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
IOU_TYPES = ("bbox", "segm")
RESULTS_FILE = "detections.json"       # COCO results (bbox + RLE segm) of eval.py and postprocess.py
METRICS_FILE = "eval_metrics.json"     # {iou_type: {metric: value}} plus run facts
MAX_LISTED = 5                         # names listed in an error message before "and N more"


@dataclass
class Detections:
    """Kept detections of one image in original image coordinates (N of them)."""
    boxes: np.ndarray    # (N, 4) float32 x1, y1, x2, y2
    scores: np.ndarray   # (N,) float32
    labels: np.ndarray   # (N,) int32 in 1..C-1
    masks: np.ndarray    # (N, ori_h, ori_w) uint8 0/1

    def __len__(self) -> int:
        return len(self.scores)


# ---------------------------------------------------------------- input

def read_image_input(path: str, transform):
    """Image file -> (RGB (h, w, 3) uint8, image (1, 3, H, W) float32, image_shape (1, 4) float32).

    `transform` is the eval pipeline's src.dataset.EvalTransform, so predict.py and preprocess.py feed the
    network exactly what eval.py does.
    """
    from src.dataset import decode_image

    try:
        with open(path, "rb") as handle:
            raw = handle.read()
    except OSError as err:
        raise FileNotFoundError(f"cannot read image '{path}': {err.strerror or err}") from None
    rgb = decode_image(raw)
    if rgb is None:
        raise ValueError(f"image '{path}' cannot be decoded (truncated or not an image)")
    image, image_shape, _ = transform(np.frombuffer(raw, np.uint8), np.zeros(1, np.int32))
    return rgb, image[None], image_shape[None]


# ---------------------------------------------------------------- geometry

def boxes_to_original(boxes: np.ndarray, image_shape: Sequence[float]) -> np.ndarray:
    """Network-input boxes (K, 4) -> original image boxes, clipped to the image.

    image_shape = (ori_h, ori_w, scale_h, scale_w) as produced by the eval pipeline.
    """
    ori_h, ori_w, scale_h, scale_w = (float(v) for v in image_shape)
    scale = np.array([scale_w, scale_h, scale_w, scale_h], dtype=np.float32)
    limit = np.array([ori_w, ori_h, ori_w, ori_h], dtype=np.float32)
    return np.clip(np.asarray(boxes, np.float32) / scale, 0.0, limit)


def _interpolation_matrix(start: float, end: float, length: int, mask_size: int):
    """Bilinear weights from a mask axis of mask_size cells spanning [start, end) to image pixels.

    Returns (first_pixel, weights (n, mask_size)) for the n pixels whose centres fall inside
    [start, end); pixels outside the box are not covered (they stay 0 when pasted).
    """
    first = max(int(np.ceil(start - 0.5)), 0)
    stop = min(int(np.ceil(end - 0.5)), length)
    if stop <= first or end <= start:
        return first, np.zeros((0, mask_size), np.float32)
    centres = np.arange(first, stop, dtype=np.float64) + 0.5
    # Mask cell j covers [start + j*step, start + (j+1)*step); its value sits at the cell centre.
    position = (centres - start) / (end - start) * mask_size - 0.5
    position = np.clip(position, 0.0, mask_size - 1)
    low = np.floor(position).astype(np.int64)
    high = np.minimum(low + 1, mask_size - 1)
    frac = (position - low).astype(np.float32)
    weights = np.zeros((len(centres), mask_size), np.float32)
    rows = np.arange(len(centres))
    np.add.at(weights, (rows, low), 1.0 - frac)
    np.add.at(weights, (rows, high), frac)
    return first, weights


def paste_masks(masks: np.ndarray, boxes: np.ndarray, img_h: int, img_w: int, threshold: float) -> np.ndarray:
    """Paste (K, S, S) mask probabilities into (K, img_h, img_w) binary masks.

    boxes (K, 4) are x1, y1, x2, y2 in the same (original) pixel frame; a pixel belongs to the box when
    its centre does, and takes the bilinear interpolation of the mask cells (separable: Wy @ m @ Wx^T),
    so each mask costs only its box area.
    """
    masks = np.asarray(masks, np.float32)
    boxes = np.asarray(boxes, np.float64)
    if masks.ndim != 3 or masks.shape[1] != masks.shape[2] or len(masks) != len(boxes):
        raise ValueError(f"paste_masks: need masks (K, S, S) and boxes (K, 4), got {masks.shape} and {boxes.shape}")
    mask_size = masks.shape[1]
    out = np.zeros((len(masks), img_h, img_w), np.uint8)
    for k, (x1, y1, x2, y2) in enumerate(boxes):
        col0, wx = _interpolation_matrix(x1, x2, img_w, mask_size)
        row0, wy = _interpolation_matrix(y1, y2, img_h, mask_size)
        if len(wx) == 0 or len(wy) == 0:
            continue
        region = wy @ masks[k] @ wx.T                                   # (ny, nx)
        out[k, row0:row0 + len(wy), col0:col0 + len(wx)] = region >= threshold
    return out


def detections_from_outputs(boxes, scores, labels, valid, masks, image_shape,
                            mask_threshold: float) -> Detections:
    """One image's fixed-size outputs (K rows; masks (K, S, S)) -> its valid detections, original frame."""
    keep = np.asarray(valid, bool).reshape(-1)
    ori_h, ori_w = int(round(float(image_shape[0]))), int(round(float(image_shape[1])))
    kept_boxes = boxes_to_original(np.asarray(boxes)[keep], image_shape)
    return Detections(
        boxes=kept_boxes,
        scores=np.asarray(scores, np.float32)[keep],
        labels=np.asarray(labels, np.int32)[keep],
        masks=paste_masks(np.asarray(masks)[keep], kept_boxes, ori_h, ori_w, mask_threshold),
    )


# ---------------------------------------------------------------- COCO categories and results

def label_to_category_ids(categories: List[dict], classes: Sequence[str], source: str = "") -> np.ndarray:
    """(C,) COCO category id of each class index, matched by name; index 0 (background) maps to 0."""
    by_name = {cat["name"]: int(cat["id"]) for cat in categories}
    missing = [name for name in classes[1:] if name not in by_name]
    if missing:
        where = f" of '{source}'" if source else ""
        shown = f"{missing}" if len(missing) <= MAX_LISTED else f"{missing[:MAX_LISTED]} and {len(missing) - MAX_LISTED} more"
        raise ValueError(f"classes {shown} of config key 'data.classes' are not among the categories{where} "
                         f"({', '.join(sorted(by_name)[:MAX_LISTED])}{', ...' if len(by_name) > MAX_LISTED else ''}); "
                         f"use the config preset that matches the annotation file")
    return np.array([0] + [by_name[name] for name in classes[1:]], dtype=np.int64)


def detections_to_coco(image_id: int, detections: Detections, category_ids: np.ndarray) -> List[dict]:
    """COCO results entries (bbox [x, y, w, h] and RLE segmentation) for one image."""
    if len(detections) == 0:
        return []
    rles = mask_utils.encode(np.asfortranarray(detections.masks.transpose(1, 2, 0)))
    results = []
    for box, score, label, rle in zip(detections.boxes, detections.scores, detections.labels, rles):
        x1, y1, x2, y2 = (float(v) for v in box)
        results.append({
            "image_id": int(image_id),
            "category_id": int(category_ids[int(label)]),
            "bbox": [x1, y1, x2 - x1, y2 - y1],
            "score": float(score),
            "segmentation": {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")},
        })
    return results


def load_coco(ann_file: str) -> COCO:
    """COCO ground truth with a clear error for a missing or unreadable annotation file."""
    if not os.path.isfile(ann_file):
        raise FileNotFoundError(f"annotation file '{ann_file}' does not exist")
    with open(ann_file, "r", encoding="utf-8") as handle:
        try:
            dataset = json.load(handle)
        except json.JSONDecodeError as err:
            raise ValueError(f"annotation file '{ann_file}' is not valid JSON: {err}") from None
    missing = [key for key in ("images", "annotations", "categories")
               if not isinstance(dataset, dict) or key not in dataset]
    if missing:
        raise ValueError(f"annotation file '{ann_file}' is not a COCO instances file: lacks {missing}")
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def check_image_coverage(image_ids: Iterable[int], coco_gt: COCO, ann_file: str) -> None:
    """Evaluated images must be exactly the annotation file's images, each once.

    Otherwise COCOeval silently scores missing images as misses (the recipe's known trap: a MindRecord
    built from another split gives wrong numbers without any error).
    """
    ids = [int(i) for i in image_ids]
    expected = set(coco_gt.getImgIds())
    seen = set(ids)
    problems = []
    if len(ids) != len(seen):
        problems.append(f"{len(ids) - len(seen)} images were evaluated more than once")
    if seen - expected:
        problems.append(f"{len(seen - expected)} evaluated images are not in the annotation file "
                        f"(e.g. id {sorted(seen - expected)[0]})")
    if expected - seen:
        problems.append(f"{len(expected - seen)} images of the annotation file were not evaluated "
                        f"(e.g. id {sorted(expected - seen)[0]})")
    if problems:
        raise ValueError(f"evaluated {len(ids)} images but '{ann_file}' has {len(expected)}: "
                         f"{'; '.join(problems)}. Rebuild the eval MindRecord from the same split as the "
                         f"annotation file (delete the eval files under data.mindrecord_dir).")


def _results_for(iou_type: str, results: List[dict]) -> List[dict]:
    """Copies holding only what `iou_type` scores.

    COCO.loadRes takes the box area as instance area whenever a bbox is present, which would put masks
    into the wrong small/medium/large bucket; segm results therefore carry only the segmentation.
    """
    drop = "segmentation" if iou_type == "bbox" else "bbox"
    return [{k: v for k, v in r.items() if k != drop} for r in results]


def _detections_coco(coco_gt: COCO, results: List[dict]) -> COCO:
    if results:
        return coco_gt.loadRes(results)
    empty = COCO()    # loadRes cannot take an empty list; an empty result set scores 0 recall/precision
    empty.dataset = {"images": list(coco_gt.dataset["images"]), "categories": list(coco_gt.dataset["categories"]),
                     "annotations": []}
    empty.createIndex()
    return empty


def evaluate_coco(coco_gt: COCO, results: List[dict], iou_types: Sequence[str] = IOU_TYPES) -> Dict[str, dict]:
    """Run COCOeval per iou type, printing the 12-line summaries; {iou_type: {metric name: value}}."""
    metrics = {}
    for iou_type in iou_types:
        if iou_type not in IOU_TYPES:
            raise ValueError(f"unknown iou type '{iou_type}'; choose from {IOU_TYPES}")
        coco_dt = _detections_coco(coco_gt, _results_for(iou_type, results))
        evaluator = COCOeval(coco_gt, coco_dt, iou_type)
        evaluator.params.imgIds = sorted(coco_gt.getImgIds())
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
        metrics[iou_type] = {name: float(value) for name, value in zip(COCO_METRIC_NAMES, evaluator.stats)}
    return metrics


# ---------------------------------------------------------------- files

def write_bytes_atomic(path: str, data: bytes) -> None:
    """Write through a temp file in the same directory + os.replace, so readers never see a partial file."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=".tmp_", dir=directory)
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_json_atomic(path: str, obj) -> None:
    write_bytes_atomic(path, json.dumps(obj).encode("utf-8"))


def score_and_save(coco_gt: COCO, ann_file: str, image_ids: Sequence[int], results: List[dict],
                   output_dir: str, extra: Optional[dict] = None) -> Dict[str, dict]:
    """Check image coverage, write the results JSON, run COCOeval, write the metrics JSON."""
    check_image_coverage(image_ids, coco_gt, ann_file)
    write_json_atomic(os.path.join(output_dir, RESULTS_FILE), results)
    metrics = evaluate_coco(coco_gt, results)
    write_json_atomic(os.path.join(output_dir, METRICS_FILE), {**metrics, **(extra or {})})
    return metrics


# ---------------------------------------------------------------- network

def run_script(main: Callable, argv: Sequence[str]) -> None:
    """Run a command-line entry point; bad input (missing file, wrong checkpoint, bad value) ends with
    one 'ERROR: ...' line and exit status 1 instead of a traceback."""
    from src.checkpoint import CheckpointError

    try:
        main(argv)
    except (FileNotFoundError, ValueError, CheckpointError) as err:
        print(f"ERROR: {err}", file=sys.stderr)
        sys.exit(1)


def setup_context(device_target: str, device_id: Optional[int] = None) -> str:
    """Graph mode on the chosen device (`auto`: the best available): the inference graph has static shapes
    and compiles once. Returns the device used."""
    from src.device import set_device

    return set_device(device_target, device_id)


def build_inference_net(cfg, checkpoint_path: str):
    """MaskRcnnResnet50 in inference mode with all weights from the checkpoint (strict names and shapes)."""
    from src.checkpoint import load_model_weights
    from src.maskrcnn.mask_rcnn_r50 import MaskRcnnResnet50

    if not os.path.isfile(checkpoint_path):    # before the seconds spent building the network
        raise FileNotFoundError(f"checkpoint '{checkpoint_path}' does not exist")
    net = MaskRcnnResnet50(cfg)
    net.set_train(False)
    load_model_weights(checkpoint_path, net)
    return net
