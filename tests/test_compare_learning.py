"""bench/compare_learning.py without torch: options, the settings given to torchvision, and the results table."""
import os
import sys

import numpy as np
import pytest

import demo

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import compare_learning  # noqa: E402


def test_options_are_checked():
    parser = compare_learning.build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["--steps", "0"])
    with pytest.raises(SystemExit):
        parser.parse_args(["--steps", "5", "--style", "fancy"])
    args = parser.parse_args(["--steps", "20", "--style", "cluttered", "--seed", "7", "--images", "6"])
    assert (args.steps, args.style, args.seed, args.images, args.sides) == (20, "cluttered", 7, 6,
                                                                             ["ours", "torchvision"])
    argv = compare_learning.demo_argv(args)
    demo_args, _, cfg = demo.parse_args(argv)
    assert (demo_args.steps, demo_args.style, demo_args.seed, demo_args.images) == (20, "cluttered", 7, 6)


def test_torchvision_gets_the_demo_settings_of_the_issue(tmp_path):
    args = compare_learning.build_parser().parse_args(["--steps", "1300", "--out", str(tmp_path)])
    _, _, cfg = demo.parse_args(compare_learning.demo_argv(args))
    job = compare_learning.torch_job(args, cfg)
    o = job["options"]
    assert o["anchor_sizes"] == [[8.0], [16.0], [32.0], [64.0], [128.0]] and o["aspect_ratios"] == [0.5, 1.0, 2.0]
    assert (o["rpn_batch_size_per_image"], o["rpn_positive_fraction"]) == (64, 0.5)
    assert (o["rpn_pre_nms_top_n_train"], o["rpn_post_nms_top_n_train"]) == (300, 64)
    assert (o["box_batch_size_per_image"], o["box_positive_fraction"], o["box_detections_per_img"]) == (32, 0.25, 30)
    assert (job["height"], job["width"], job["batch"], job["flip_ratio"], job["clip"]) == (128, 192, 2, 0.5, 10.0)
    assert job["coco_root"] == cfg.data.coco_root and job["classes"][0] == "background"
    lr = np.array(job["lr"])                                     # demo --steps 1300: 50 warmup steps, then cosine
    assert len(lr) == 1300 and lr.max() == pytest.approx(3e-4) and np.argmax(lr) == 50
    assert lr[0] == pytest.approx(1e-4) and lr[-1] < 0.03 * 3e-4


def test_rows_are_appended_to_one_table(tmp_path):
    args = compare_learning.build_parser().parse_args(["--steps", "20", "--images", "8", "--val_images", "4"])
    results = [{"side": "ours", "steps": 20, "train_seconds": 61.2, "bbox_AP": 0.0123, "segm_AP": 0.02},
               {"side": "torchvision", "steps": 20, "train_seconds": 30.0, "bbox_AP": 0.5, "segm_AP": 0.25}]
    rows = compare_learning.table_rows(results, args)
    assert rows.count("\n") == 2 and "| simple, 0 | 8 / 4 | ours | 20 | 61 | 0.012 | 0.020 |" in rows
    bf16 = compare_learning.table_rows([dict(results[0], precision="bf16")], args)
    assert "| simple, 0 | 8 / 4 | ours bf16 | 20 | 61 |" in bf16
    path = tmp_path / "results.md"
    path.write_text("# Results\n\n## Other\n\ntext\n")
    compare_learning.append_rows(str(path), rows)
    compare_learning.append_rows(str(path), rows)
    text = path.read_text()
    assert text.startswith("# Results\n\n## Other\n\ntext\n\n" + compare_learning.TABLE_TITLE)
    assert text.count(compare_learning.TABLE_TITLE) == 1 and text.count("| torchvision |") == 2
    assert text.endswith(rows + rows)


def test_a_missing_torch_python_fails_before_any_work(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        compare_learning.main(["--steps", "2", "--out", str(tmp_path / "out"), "--torch_python",
                               str(tmp_path / "no_python")])
    assert stop.value.code == 2 and "--torch_python" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "out")


def test_ground_truth_given_as_detections_scores_ap_one(synthetic_coco):
    """The worker's data loading and result conversion, on the session's synthetic set: the val GT itself,
    sent through them as detections, gets AP 1 in bbox and segm (a wrong category map or box format would not)."""
    from pycocotools.coco import COCO

    classes = ["background", "rectangle", "ellipse", "triangle", "star"]
    gt = COCO(os.path.join(synthetic_coco, "annotations", "instances_val2017.json"))
    val = compare_learning._load_split(gt, os.path.join(synthetic_coco, "val2017"), classes)
    category_of = {classes.index(cat["name"]): cat["id"] for cat in gt.loadCats(gt.getCatIds())}
    results = []
    for image_id, path, boxes, labels, masks in val:
        assert compare_learning._read_rgb(path).shape[:2] == masks.shape[1:]
        results += compare_learning.coco_results(image_id, boxes, labels, np.ones(len(labels)), masks, category_of)
    assert len(results) > 0
    ap = compare_learning.coco_ap(gt, [s[0] for s in val], results)
    assert ap["bbox"] > 0.99 and ap["segm"] > 0.99


def test_our_side_options_reach_demo_and_name_the_row(tmp_path):
    args = compare_learning.build_parser().parse_args(
        ["--steps", "20", "--out", str(tmp_path), "--ours_options=--rcnn.rcnn_smooth_l1_beta 0.25 --test.mask_paste torchvision"])
    _, overrides, cfg = demo.parse_args(compare_learning.demo_argv(args))
    assert cfg.rcnn.rcnn_smooth_l1_beta == 0.25 and cfg.test.mask_paste == "torchvision"
    results = [{"side": side, "steps": 20, "train_seconds": 1.0, "bbox_AP": 0.5, "segm_AP": 0.25}
               for side in ("ours", "torchvision")]
    ours_row, torch_row = compare_learning.table_rows(results, args).splitlines()
    assert "| ours (`--rcnn.rcnn_smooth_l1_beta 0.25 --test.mask_paste torchvision`) |" in ours_row
    assert "| torchvision |" in torch_row
    assert compare_learning.training_precision(demo.parse_args(["--train.amp_level", "O0"])[2]) == "fp32"
    assert compare_learning.training_precision(demo.parse_args(["--train.amp_level", "O2"])[2]) == "bf16"
