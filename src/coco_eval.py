"""COCO results and evaluation: category mapping, results entries, ground truth loading, COCOeval."""
from __future__ import annotations

import contextlib
import io
import json
import os
from typing import Dict, Iterable, List, Optional, Sequence

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from src import atomic_io
from src.detections import Detections

# Order of COCOeval.stats: the 12 lines of COCOeval.summarize().
COCO_METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
IOU_TYPES = ("bbox", "segm")
RESULTS_FILE = "detections.json"       # COCO results (bbox + RLE segm) of eval.py and postprocess.py
METRICS_FILE = "eval_metrics.json"     # {iou_type: {metric: value}} plus run facts
COVERAGE_FIX = "Pass the annotation file of the images that were evaluated."
MAX_LISTED = 5                         # names listed in an error message before "and N more"



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


def check_image_coverage(image_ids: Iterable[int], coco_gt: COCO, ann_file: str,
                         fix: str = COVERAGE_FIX) -> None:
    """Evaluated images must be exactly the annotation file's images, each once.

    Otherwise COCOeval silently scores missing images as misses (the recipe's known trap: a MindRecord
    built from another split gives wrong numbers without any error). `fix` ends the message: what the
    caller's user can change so that images and annotation file agree.
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
                         f"{'; '.join(problems)}. {fix}")


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


def score_and_save(coco_gt: COCO, ann_file: str, image_ids: Sequence[int], results: List[dict],
                   output_dir: str, extra: Optional[dict] = None, fix: str = COVERAGE_FIX) -> Dict[str, dict]:
    """Check image coverage (`fix` as there), write the results JSON, run COCOeval, write the metrics JSON."""
    check_image_coverage(image_ids, coco_gt, ann_file, fix)
    atomic_io.write_json(os.path.join(output_dir, RESULTS_FILE), results)
    metrics = evaluate_coco(coco_gt, results)
    atomic_io.write_json(os.path.join(output_dir, METRICS_FILE), {**metrics, **(extra or {})})
    return metrics


