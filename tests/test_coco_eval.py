"""COCO category mapping, results entries, ground truth loading and COCOeval (src/coco_eval.py)."""
import json

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from src.coco_eval import (COCO_METRIC_NAMES, check_image_coverage, detections_to_coco, evaluate_coco,
                           label_to_category_ids, load_coco)
from src.config import load_config
from src.detections import Detections

def _tiny_categories():
    return [{"id": 7, "name": "star"}, {"id": 3, "name": "ellipse"}, {"id": 1, "name": "rectangle"},
            {"id": 5, "name": "triangle"}]


def test_label_to_category_ids_matches_by_name():
    classes = load_config("tiny").data.classes           # background, rectangle, ellipse, triangle, star
    np.testing.assert_array_equal(label_to_category_ids(_tiny_categories(), classes), [0, 1, 3, 5, 7])


def test_label_to_category_ids_names_missing_classes():
    with pytest.raises(ValueError, match=r"\['person'\].*data.classes.*ann.json"):
        label_to_category_ids(_tiny_categories(), ["background", "star", "person"], "ann.json")
    with pytest.raises(ValueError, match=r"'bicycle', 'car', 'motorcycle', 'airplane'\] and 75 more"):
        label_to_category_ids(_tiny_categories(), load_config().data.classes)


def test_coco_results_round_trip_boxes_and_rle():
    masks = np.zeros((2, 30, 40), np.uint8)
    masks[0, 2:10, 3:20] = 1
    masks[1, 15:30, 0:40] = 1
    det = Detections(boxes=np.array([[3, 2, 20, 10], [0, 15, 40, 30]], np.float32),
                     scores=np.array([0.5, 0.25], np.float32), labels=np.array([4, 1], np.int32), masks=masks)
    results = detections_to_coco(11, det, np.array([0, 1, 3, 5, 7]))
    assert json.loads(json.dumps(results)) == results     # JSON-serialisable as is
    assert [r["category_id"] for r in results] == [7, 1]
    assert results[0]["bbox"] == [3.0, 2.0, 17.0, 8.0]
    for r, m in zip(results, masks):
        np.testing.assert_array_equal(mask_utils.decode(r["segmentation"]), m)
    assert detections_to_coco(11, Detections(np.zeros((0, 4)), np.zeros(0), np.zeros(0, np.int32),
                                             np.zeros((0, 30, 40), np.uint8)), np.arange(5)) == []


def _write_gt(tmp_path):
    """Two images, three objects, polygon masks."""
    anns, images = [], [{"id": 1, "width": 60, "height": 50, "file_name": "a.jpg"},
                        {"id": 2, "width": 60, "height": 50, "file_name": "b.jpg"}]
    for ann_id, (image_id, cat, (x, y, w, h)) in enumerate(
            [(1, 1, (5, 5, 20, 30)), (1, 3, (30, 10, 25, 25)), (2, 7, (10, 12, 40, 30))], start=1):
        poly = [x, y, x + w, y, x + w, y + h, x, y + h]
        anns.append({"id": ann_id, "image_id": image_id, "category_id": cat, "bbox": [x, y, w, h],
                     "area": w * h, "iscrowd": 0, "segmentation": [poly]})
    path = tmp_path / "gt.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": _tiny_categories()}))
    return str(path)


def _gt_results(coco_gt, shift=0.0):
    results = []
    for ann in coco_gt.dataset["annotations"]:
        mask = coco_gt.annToMask(ann)
        if shift:
            mask = np.roll(mask, int(shift), axis=1)
        rle = mask_utils.encode(np.asfortranarray(mask))
        x, y, w, h = ann["bbox"]
        results.append({"image_id": ann["image_id"], "category_id": ann["category_id"], "score": 0.9,
                        "bbox": [x + shift, y, w, h],
                        "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()}})
    return results


def test_evaluate_coco_perfect_and_shifted_results(tmp_path, capsys):
    coco_gt = load_coco(_write_gt(tmp_path))
    perfect = evaluate_coco(coco_gt, _gt_results(coco_gt))
    assert set(perfect) == {"bbox", "segm"} and list(perfect["bbox"]) == list(COCO_METRIC_NAMES)
    assert perfect["bbox"]["AP"] == pytest.approx(1.0) and perfect["segm"]["AP"] == pytest.approx(1.0)
    printed = capsys.readouterr().out
    assert printed.count("Average Precision") == 12 and printed.count("Average Recall") == 12
    shifted = evaluate_coco(coco_gt, _gt_results(coco_gt, shift=4.0))
    assert shifted["bbox"]["AP"] < 0.9 and shifted["segm"]["AP"] < 0.9
    assert shifted["bbox"]["AP50"] == pytest.approx(1.0)


def test_evaluate_coco_without_any_detection_scores_zero(tmp_path):
    metrics = evaluate_coco(load_coco(_write_gt(tmp_path)), [])
    assert metrics["bbox"]["AP"] == 0.0 and metrics["segm"]["AR100"] == 0.0


def test_check_image_coverage(tmp_path):
    path = _write_gt(tmp_path)
    coco_gt = load_coco(path)
    check_image_coverage([2, 1], coco_gt, path)
    with pytest.raises(ValueError, match=r"evaluated 1 images but .*gt.json' has 2.*not evaluated"):
        check_image_coverage([1], coco_gt, path)
    with pytest.raises(ValueError, match="more than once"):
        check_image_coverage([1, 2, 2], coco_gt, path)
    with pytest.raises(ValueError, match="not in the annotation file"):
        check_image_coverage([1, 2, 9], coco_gt, path)


def test_load_coco_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_coco(str(tmp_path / "nope.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    with pytest.raises(ValueError, match="bad.json.*lacks"):
        load_coco(str(bad))
    bad.write_text("{")
    with pytest.raises(ValueError, match="bad.json.*not valid JSON"):
        load_coco(str(bad))
