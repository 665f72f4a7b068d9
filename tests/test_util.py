"""Mapping detections back to the image, mask pasting, COCO results and metrics (src/util.py)."""
import json
import os

import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_utils

from src.config import load_config
from src.util import (COCO_METRIC_NAMES, Detections, boxes_to_original, check_image_coverage,
                      detections_from_outputs, detections_to_coco, evaluate_coco, label_to_category_ids,
                      load_coco, paste_masks, write_json_atomic)

MASK = 28


def test_boxes_to_original_divides_by_scale_and_clips():
    image_shape = (100.0, 200.0, 0.5, 0.25)            # ori_h, ori_w, scale_h, scale_w
    boxes = np.array([[10, 5, 20, 25], [-4, -2, 60, 80]], np.float32)
    out = boxes_to_original(boxes, image_shape)
    np.testing.assert_allclose(out[0], [40, 10, 80, 50])
    np.testing.assert_allclose(out[1], [0, 0, 200, 100])   # clipped to (ori_w, ori_h)


def test_all_ones_mask_fills_exactly_its_box():
    out = paste_masks(np.ones((1, MASK, MASK)), np.array([[10, 20, 30, 50]]), 60, 40, 0.5)
    expected = np.zeros((60, 40), np.uint8)
    expected[20:50, 10:30] = 1
    np.testing.assert_array_equal(out[0], expected)


def test_box_partly_outside_the_image_is_cut_at_the_border():
    out = paste_masks(np.ones((1, MASK, MASK)), np.array([[-5.0, 30.0, 12.0, 70.0]]), 50, 40, 0.5)
    expected = np.zeros((50, 40), np.uint8)
    expected[30:50, 0:12] = 1
    np.testing.assert_array_equal(out[0], expected)


def test_mask_at_unit_scale_is_copied_pixel_for_pixel():
    rng = np.random.default_rng(0)
    masks = rng.random((2, MASK, MASK)).astype(np.float32)
    boxes = np.array([[5, 7, 5 + MASK, 7 + MASK], [0, 30, MASK, 30 + MASK]], np.float32)
    out = paste_masks(masks, boxes, 64, 40, 0.5)
    np.testing.assert_array_equal(out[0, 7:35, 5:33], masks[0] >= 0.5)
    np.testing.assert_array_equal(out[1, 30:58, 0:28], masks[1] >= 0.5)
    assert out[0].sum() == (masks[0] >= 0.5).sum()      # nothing outside the box


def test_paste_matches_opencv_bilinear_resize_of_the_box():
    rng = np.random.default_rng(1)
    mask = cv2.GaussianBlur(rng.random((MASK, MASK)).astype(np.float32), (5, 5), 0)
    threshold = float(np.median(mask))
    x1, y1, width, height = 12, 3, 45, 70                 # non-square, non-integer scale
    out = paste_masks(mask[None], np.array([[x1, y1, x1 + width, y1 + height]]), 80, 64, threshold)
    reference = cv2.resize(mask, (width, height), interpolation=cv2.INTER_LINEAR) >= threshold
    region = out[0, y1:y1 + height, x1:x1 + width].astype(bool)
    assert (region != reference).mean() < 0.002         # float rounding right at the threshold only
    assert out[0].sum() == region.sum()


def test_left_half_mask_pastes_to_left_half_of_box():
    mask = np.zeros((1, MASK, MASK), np.float32)
    mask[0, :, :MASK // 2] = 1.0
    out = paste_masks(mask, np.array([[0, 0, 2 * MASK, MASK]]), MASK, 2 * MASK, 0.5)
    np.testing.assert_array_equal(out[0].sum(axis=0), [MASK] * MASK + [0] * MASK)


def test_degenerate_box_gives_empty_mask():
    out = paste_masks(np.ones((2, MASK, MASK)), np.array([[10, 10, 10, 30], [5, 5, 5.2, 5.3]]), 40, 40, 0.5)
    assert out.shape == (2, 40, 40) and out.sum() == 0


def test_paste_masks_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="paste_masks"):
        paste_masks(np.ones((2, MASK, MASK)), np.zeros((3, 4)), 10, 10, 0.5)


def test_detections_from_outputs_keeps_valid_rows_in_original_frame():
    boxes = np.array([[10, 10, 38, 38], [0, 0, 5, 5], [20, 4, 48, 32]], np.float32)
    valid = np.array([True, False, True])
    det = detections_from_outputs(boxes, np.array([0.9, 0.8, 0.7]), np.array([1, 2, 3]), valid,
                                  np.ones((3, MASK, MASK), np.float32), (30.0, 40.0, 2.0, 2.0), 0.5)
    np.testing.assert_allclose(det.boxes, [[5, 5, 19, 19], [10, 2, 24, 16]])
    np.testing.assert_array_equal(det.labels, [1, 3])
    assert det.masks.shape == (2, 30, 40)
    assert det.masks[0].sum() == 14 * 14 and det.masks[0, 5:19, 5:19].all()


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


def test_write_json_atomic_leaves_no_temp_file(tmp_path):
    path = tmp_path / "sub" / "out.json"
    write_json_atomic(str(path), {"a": [1, 2]})
    write_json_atomic(str(path), {"a": [3]})
    assert json.loads(path.read_text()) == {"a": [3]}
    assert os.listdir(path.parent) == ["out.json"]
