"""eval.py: the eval loop over the real eval pipeline with fake detectors, and the CLI end to end."""
import json
import os
import subprocess

import numpy as np
import pytest

from eval import detect_dataset, mindrecord_image_ids, pad_batch
from inference_helpers import (GroundTruthDetector, config_cli_args, narrow_config, roi_mask, run_python,
                               val_paths)
from src.coco_eval import check_image_coverage, evaluate_coco, label_to_category_ids, load_coco, score_and_save
from src.mask_paste import paste_masks

pytest_plugins = ["inference_fixtures"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _val_ann_file(cfg):
    return val_paths(cfg)[1]


def _run(cfg, files, detector, batch_size):
    from src.data.pipeline import create_maskrcnn_dataset

    coco_gt = load_coco(_val_ann_file(cfg))
    category_ids = label_to_category_ids(coco_gt.dataset["categories"], cfg.data.classes)
    dataset = create_maskrcnn_dataset(cfg, files, is_training=False, batch_size=batch_size)
    results, image_ids, _ = detect_dataset(detector, dataset.create_dict_iterator(output_numpy=True, num_epochs=1),
                                           batch_size, len(coco_gt.getImgIds()), category_ids,
                                           cfg.test.mask_thr_binary)
    check_image_coverage(image_ids, coco_gt, _val_ann_file(cfg))
    return coco_gt, results, image_ids


def _detector(coco_gt, cfg, **kwargs):
    return GroundTruthDetector(coco_gt, cfg.data.classes, cfg.test.test_max_per_img, cfg.rcnn.mask_shape, **kwargs)


def test_perfect_detector_scores_one(tiny_mindrecord):
    cfg = tiny_mindrecord.cfg
    coco_gt = load_coco(_val_ann_file(cfg))
    detector = _detector(coco_gt, cfg)
    coco_gt, results, image_ids = _run(cfg, tiny_mindrecord.val_files, detector, batch_size=3)
    assert detector.batch_sizes == [3, 3]          # 4 images: the short last batch is padded to the graph's size
    assert sorted(image_ids) == sorted(coco_gt.getImgIds())
    metrics = evaluate_coco(coco_gt, results)
    assert metrics["bbox"]["AP"] == pytest.approx(1.0)
    # Masks travel as 28x28 bilinear samples and are pasted back, which is lossy (thin star tips and
    # triangle corners lose pixels): segm AP is 1 only while every mask IoU stays above 0.95. On this
    # set it does (measured segm AP 1.000); a broken paste (offset, transposed, wrong scale) drops far below.
    assert metrics["segm"]["AP50"] == pytest.approx(1.0)
    assert metrics["segm"]["AP"] > 0.95


def test_shifted_and_missing_detections_score_less(tiny_mindrecord):
    cfg = tiny_mindrecord.cfg
    coco_gt = load_coco(_val_ann_file(cfg))
    _, shifted, _ = _run(cfg, tiny_mindrecord.val_files, _detector(coco_gt, cfg, shift_px=6.0), batch_size=2)
    _, partial, image_ids = _run(cfg, tiny_mindrecord.val_files, _detector(coco_gt, cfg, drop_every_other=True),
                                 batch_size=2)
    assert len(image_ids) == len(coco_gt.getImgIds())      # images without detections are still evaluated
    assert {r["image_id"] for r in partial} < set(image_ids)
    shifted_metrics, partial_metrics = evaluate_coco(coco_gt, shifted), evaluate_coco(coco_gt, partial)
    assert shifted_metrics["bbox"]["AP"] < 0.9 and shifted_metrics["segm"]["AP"] < 0.9
    assert partial_metrics["bbox"]["AR100"] < 0.9


def test_pad_batch_repeats_the_last_image():
    batch = {"image": np.arange(6, dtype=np.float32).reshape(2, 3), "image_id": np.array([5, 7], np.int32)}
    padded = pad_batch(batch, 4)
    np.testing.assert_array_equal(padded["image_id"], [5, 7, 7, 7])
    np.testing.assert_array_equal(padded["image"][3], batch["image"][1])
    assert pad_batch(batch, 2) is batch


def test_mindrecord_must_hold_exactly_the_annotated_images(tiny_mindrecord, tmp_path):
    cfg = tiny_mindrecord.cfg
    stored = mindrecord_image_ids(tiny_mindrecord.val_files)
    ann = json.load(open(_val_ann_file(cfg)))
    assert sorted(stored) == sorted(img["id"] for img in ann["images"])
    ann["images"].append(dict(ann["images"][0], id=424242, file_name="extra.jpg"))
    bigger = tmp_path / "instances_more.json"
    bigger.write_text(json.dumps(ann))
    with pytest.raises(ValueError, match=r"evaluated 4 images but .*instances_more.json' has 5.*id 424242"):
        check_image_coverage(stored, load_coco(str(bigger)), str(bigger))


def test_score_and_save_writes_results_and_metrics(tiny_mindrecord, tmp_path):
    cfg = tiny_mindrecord.cfg
    coco_gt = load_coco(_val_ann_file(cfg))
    _, results, image_ids = _run(cfg, tiny_mindrecord.val_files, _detector(coco_gt, cfg), batch_size=2)
    metrics = score_and_save(coco_gt, _val_ann_file(cfg), image_ids, results, str(tmp_path), extra={"images": 4})
    saved = json.load(open(tmp_path / "eval_metrics.json"))
    assert saved["bbox"] == metrics["bbox"] and saved["images"] == 4
    assert len(json.load(open(tmp_path / "detections.json"))) == len(results)


def test_paste_path_reproduces_large_masks(tiny_mindrecord):
    """The 28x28 -> image paste of the eval path, per instance: IoU with the annotation mask."""
    cfg = tiny_mindrecord.cfg
    coco_gt = load_coco(_val_ann_file(cfg))
    ious = []
    for ann in coco_gt.dataset["annotations"]:
        if ann["iscrowd"] or ann["area"] < 1000:
            continue
        image = coco_gt.imgs[ann["image_id"]]
        x, y, w, h = ann["bbox"]
        full = coco_gt.annToMask(ann)
        pasted = paste_masks(roi_mask(full, (x, y, x + w, y + h), cfg.rcnn.mask_shape)[None],
                             np.array([[x, y, x + w, y + h]]), image["height"], image["width"],
                             cfg.test.mask_thr_binary)[0]
        ious.append((pasted & full).sum() / (pasted | full).sum())
    assert ious and min(ious) > 0.85


def _run_eval_cli(*args):
    return run_python(os.path.join(ROOT, "eval.py"), *args)


@pytest.mark.slow
def test_eval_of_a_tiny_model_runs_end_to_end(narrow_eval, narrow_model):
    cfg = narrow_model.cfg
    _, ann_file = val_paths(cfg)
    coco_gt = load_coco(ann_file)
    metrics = narrow_eval.metrics
    assert narrow_eval.stdout.count("Average Precision") == 12 and narrow_eval.stdout.count("Average Recall") == 12
    assert "images/s" in narrow_eval.stdout
    assert metrics["images"] == len(coco_gt.getImgIds()) and metrics["images_per_second"] > 0
    for iou_type in ("bbox", "segm"):
        assert all(value == -1.0 or 0.0 <= value <= 1.0 for value in metrics[iou_type].values())
    results = json.load(open(os.path.join(narrow_eval.output_dir, "detections.json")))
    assert 0 < len(results) <= metrics["images"] * cfg.test.test_max_per_img
    categories = set(coco_gt.getCatIds())
    for r in results:
        image = coco_gt.imgs[r["image_id"]]
        x, y, w, h = r["bbox"]
        assert r["category_id"] in categories and 0.0 <= r["score"] <= 1.0
        assert x >= 0 and y >= 0 and w >= 0 and h >= 0
        assert x + w <= image["width"] + 1e-3 and y + h <= image["height"] + 1e-3
        assert r["segmentation"]["size"] == [image["height"], image["width"]]


def test_eval_rejects_a_checkpoint_with_another_class_count(narrow_model, tmp_path):
    import mindspore as ms
    from src.maskrcnn.mask_rcnn_r50 import MaskRcnnResnet50

    other = narrow_config(narrow_model.cfg, **{"data.classes": ["background", "rectangle", "ellipse"]})
    ckpt = str(tmp_path / "three_classes.ckpt")
    ms.save_checkpoint(MaskRcnnResnet50(other), ckpt)
    _, ann_file = val_paths(narrow_model.cfg)
    run = _run_eval_cli("--checkpoint_path", ckpt, "--ann_file", ann_file, "--output_dir", str(tmp_path),
                        *config_cli_args(narrow_model.cfg))
    assert run.returncode == 1
    assert "three_classes.ckpt' does not fit" in run.stderr and "(3, " in run.stderr and "(5, " in run.stderr


def test_eval_cli_rejects_missing_and_corrupt_checkpoints(tiny_mindrecord, tmp_path):
    cfg = tiny_mindrecord.cfg
    common = ["--ann_file", _val_ann_file(cfg), "--config", "tiny", "--coco_root", cfg.data.coco_root,
              "--mindrecord_dir", cfg.data.mindrecord_dir, "--output_dir", str(tmp_path)]
    missing = _run_eval_cli("--checkpoint_path", str(tmp_path / "none.ckpt"), *common)
    assert missing.returncode == 1 and "none.ckpt' does not exist" in missing.stderr
    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes(b"garbage" * 100)
    broken = _run_eval_cli("--checkpoint_path", str(corrupt), *common)
    assert broken.returncode == 1 and "corrupt.ckpt' cannot be read" in broken.stderr
    assert not os.path.exists(tmp_path / "detections.json")


def test_run_eval_sh_checks_its_arguments(tmp_path):
    script = os.path.join(ROOT, "scripts", "run_eval.sh")
    usage = subprocess.run(["bash", script], capture_output=True, text=True)
    assert usage.returncode != 0 and "Usage" in usage.stderr
    missing = subprocess.run(["bash", script, str(tmp_path / "val.json"), str(tmp_path / "x.ckpt")],
                             capture_output=True, text=True, cwd=tmp_path)
    assert missing.returncode != 0 and "val.json" in missing.stderr


def test_eval_hint_for_a_mismatched_annotation_file_names_the_file_the_images_come_from(narrow_model, tmp_path):
    cfg = narrow_model.cfg
    source = _val_ann_file(cfg)
    ann = json.load(open(source))
    ann["images"] = ann["images"][:-1]
    other = tmp_path / "instances_other.json"
    other.write_text(json.dumps(ann))
    run = _run_eval_cli("--checkpoint_path", narrow_model.checkpoint, "--ann_file", str(other),
                        "--output_dir", str(tmp_path / "out"), *config_cli_args(cfg))
    assert run.returncode == 1
    message = run.stderr.strip().splitlines()[-1]
    assert f"The evaluated images are those of '{source}'" in message and "pass that file as --ann_file" in message
    assert "mindrecord_dir" not in message


@pytest.mark.parametrize("option", ["--output_dir", "--data.mindrecord_dir"])
def test_eval_output_path_that_is_a_file_is_one_line_before_any_work(narrow_model, tmp_path, option):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file")
    run = _run_eval_cli("--checkpoint_path", narrow_model.checkpoint, "--ann_file", _val_ann_file(narrow_model.cfg),
                        "--output_dir", str(tmp_path / "out"), *config_cli_args(narrow_model.cfg),
                        option, str(blocker / "sub"))
    assert run.returncode == 1
    assert run.stderr.strip().splitlines() == [
        f"ERROR: {option.lstrip('-') if option.startswith('--data') else option} '{blocker / 'sub'}' "
        f"lies under the file '{blocker}', not a directory; choose a directory path"]
