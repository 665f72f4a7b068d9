"""A converted torchvision Mask R-CNN checkpoint (seeded weights in torchvision's layout, src.convert_checkpoint)
is taken by eval.py, predict.py, export.py (with configs/torchvision.yaml's options) and by --pre_trained for
fine-tuning to another class count (class layers re-initialised and reported)."""
import json
import os

import numpy as np
import pytest

from bench.torchvision_reference import synthetic_state
from inference_helpers import ROOT, run_python, val_paths
from src.checkpoint import format_load_report, load_pretrained
from src.config import load_config
from src.convert_checkpoint import convert_checkpoint
from src.maskrcnn.mask_rcnn_r50 import MaskRcnnResnet50
from tests.test_convert_checkpoint import converted_coco, torchvision_shapes  # noqa: F401

pytest_plugins = ["inference_fixtures"]

CLASS_LAYERS = ["rcnn_cls.bbox_pred.bias", "rcnn_cls.bbox_pred.weight", "rcnn_cls.cls_score.bias",
                "rcnn_cls.cls_score.weight", "rcnn_mask.mask_fcn_logits.bias", "rcnn_mask.mask_fcn_logits.weight"]
# The torchvision options at the synthetic set's size: images of 100..260 px resized to short 128 / long 192,
# on a 192 x 192 canvas (both orientations).
PRESET_AT_TINY_SIZE = {
    "data.img_height": 192, "data.img_width": 192, "data.resize_mode": "short_long", "data.min_size": 128,
    "data.max_size": 192, "data.resize_kernel": "torch", "anchor.anchor_offset": 0.0,
    "anchor.round_base_anchors": True, "proposal_test.min_bbox_size": 0.001, "roi.roi_aligned": False,
    "test.test_min_box_size": 0.01, "test.mask_paste": "torchvision"}


@pytest.fixture(scope="module")
def coco_cfg():
    """The converted_coco fixture's config: the recipe at 256 x 384."""
    return load_config(overrides={"data.img_height": 256, "data.img_width": 384})


def test_pre_trained_coco_weights_fine_tune_to_another_class_count(converted_coco):  # noqa: F811
    """91 COCO slots converted to our 81 classes, loaded into a 5-class model: everything but the class
    layers loads; those keep their initialisation and the report names each of them."""
    cfg = load_config("tiny", {"data.img_height": 256, "data.img_width": 384})
    net = MaskRcnnResnet50(cfg)
    before = {p.name: p.asnumpy().copy() for p in net.get_parameters() if p.name in CLASS_LAYERS}
    report = load_pretrained(converted_coco[1], net)
    assert sorted(name for name, _ in report.skipped) == CLASS_LAYERS
    assert sorted(report.left_at_init) == CLASS_LAYERS
    assert len(report.loaded) == len(list(net.get_parameters())) - len(CLASS_LAYERS)
    for name, value in before.items():
        np.testing.assert_array_equal(net.parameters_dict()[name].asnumpy(), value)
    text = format_load_report(report)
    assert "rcnn_cls.cls_score.weight: shape (81, 1024) in checkpoint, (5, 1024) in the model" in text
    assert "left at initialisation 6 tensors (rcnn_cls: 4, rcnn_mask: 2)" in text


@pytest.fixture(scope="module")
def converted_tiny(tiny_mindrecord, tmp_path_factory):
    """torchvision's layout with one slot per class of the synthetic set, converted; config with the preset's
    options at the synthetic size."""
    cfg = load_config("tiny", {**PRESET_AT_TINY_SIZE, "data.coco_root": tiny_mindrecord.cfg.data.coco_root,
                               "data.mindrecord_dir": str(tmp_path_factory.mktemp("tv_mindrecord"))})
    directory = tmp_path_factory.mktemp("tv_tiny")
    src, out = str(directory / "maskrcnn_tv.npz"), str(directory / "maskrcnn_tv.ckpt")
    np.savez(src, **synthetic_state(torchvision_shapes(num_slots=cfg.num_classes), seed=4))
    convert_checkpoint(src, out, cfg)
    return cfg, out


def _cli_args(cfg):
    args = ["--config", "tiny", "--data.coco_root", cfg.data.coco_root, "--data.mindrecord_dir",
            cfg.data.mindrecord_dir]
    for key, value in PRESET_AT_TINY_SIZE.items():
        args += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
    return args


@pytest.mark.slow
def test_eval_predict_and_export_take_the_converted_checkpoint(converted_tiny, tmp_path):
    cfg, checkpoint = converted_tiny
    _, ann_file = val_paths(cfg)
    run = run_python(os.path.join(ROOT, "eval.py"), "--checkpoint_path", checkpoint, "--ann_file", ann_file,
                     "--output_dir", str(tmp_path / "eval"), *_cli_args(cfg))
    assert run.returncode == 0, run.stderr[-3000:]
    with open(tmp_path / "eval" / "eval_metrics.json", encoding="utf-8") as handle:
        metrics = json.load(handle)
    assert metrics["checkpoint"] == checkpoint and metrics["images"] > 0 and "AP" in metrics["segm"]

    from predict import predict
    image_dir, _ = val_paths(cfg)
    first = sorted(os.listdir(image_dir))[0]
    one = tmp_path / "one"
    one.mkdir()
    (one / first).write_bytes(open(os.path.join(image_dir, first), "rb").read())
    records = predict(cfg, checkpoint, str(one), str(tmp_path / "predict"), score_thr=0.0)
    assert [os.path.basename(r["image"]) for r in records] == [first]

    from export import export_model
    path = export_model(cfg, checkpoint, "MINDIR", str(tmp_path / "maskrcnn_tv"), "CPU")
    assert os.path.getsize(path) > 100e6                          # the whole ResNet50-FPN, not an empty graph
