"""The synthetic COCO set: loadable by pycocotools, self-consistent annotations, deterministic by seed."""
import itertools
import json
import os

import cv2
import numpy as np
import pytest
from pycocotools.coco import COCO

from src.synthetic import (CATEGORY_NAMES, MIN_VISIBLE_PIXELS, SHAPE_GAP, STYLES, main, make_synthetic_coco,
                           mask_to_polygons, render_image)

SPLITS = ("train2017", "val2017")


@pytest.fixture(scope="module")
def cocos(synthetic_coco):
    return {split: COCO(os.path.join(synthetic_coco, "annotations", f"instances_{split}.json")) for split in SPLITS}


def _tree_bytes(root):
    out = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            with open(path, "rb") as handle:
                out[os.path.relpath(path, root)] = handle.read()
    return out


def test_layout_and_categories_match_tiny_config(synthetic_coco, cocos, tiny_cfg):
    assert tuple(tiny_cfg.data.classes[1:]) == CATEGORY_NAMES
    for split, coco in cocos.items():
        cats = coco.loadCats(coco.getCatIds())
        assert [(c["id"], c["name"]) for c in cats] == list(enumerate(CATEGORY_NAMES, start=1))
        for info in coco.loadImgs(coco.getImgIds()):
            image = cv2.imread(os.path.join(synthetic_coco, split, info["file_name"]))
            assert image is not None and image.shape == (info["height"], info["width"], 3)
    assert len(cocos["train2017"].imgs) == 8 and len(cocos["val2017"].imgs) == 4


def test_every_annotation_decodes_and_bbox_area_match_its_mask(cocos):
    for coco in cocos.values():
        assert coco.anns
        for ann in coco.anns.values():
            mask = coco.annToMask(ann)
            info = coco.imgs[ann["image_id"]]
            assert mask.shape == (info["height"], info["width"])
            assert mask.sum() == ann["area"] >= MIN_VISIBLE_PIXELS
            ys, xs = np.nonzero(mask)
            x, y, w, h = ann["bbox"]
            assert (x, y, x + w, y + h) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
            assert ann["category_id"] in range(1, len(CATEGORY_NAMES) + 1)


def test_instances_describe_visible_pixels_only(cocos):
    """Occluded parts belong to the occluder: masks of one image never overlap, yet boxes do."""
    boxes_overlap = False
    for coco in cocos.values():
        for image_id in coco.getImgIds():
            anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
            for a, b in itertools.combinations(anns, 2):
                assert not (coco.annToMask(a) & coco.annToMask(b)).any()
                ax, ay, aw, ah = a["bbox"]
                bx, by, bw, bh = b["bbox"]
                boxes_overlap |= ax < bx + bw and bx < ax + aw and ay < by + bh and by < ay + ah
    assert boxes_overlap


def test_polygons_rasterise_back_to_the_visible_mask():
    rng = np.random.default_rng(5)
    for _ in range(6):
        _, instances = render_image(rng, 90, 130, with_crowd=False)
        for inst in instances:
            polygons = mask_to_polygons(inst.visible)
            assert polygons and all(len(p) >= 6 and len(p) % 2 == 0 for p in polygons)
            coco_mask = COCO()
            coco_mask.imgs = {1: {"height": 90, "width": 130}}
            decoded = coco_mask.annToMask({"image_id": 1, "segmentation": polygons}).astype(bool)
            np.testing.assert_array_equal(decoded, inst.visible)


def test_crowd_regions_are_rle(cocos):
    crowds = [a for coco in cocos.values() for a in coco.anns.values() if a["iscrowd"]]
    assert len(crowds) >= 2
    for ann in crowds:
        assert isinstance(ann["segmentation"], dict) and isinstance(ann["segmentation"]["counts"], list)
    polygons = [a for coco in cocos.values() for a in coco.anns.values() if not a["iscrowd"]]
    assert polygons and all(isinstance(a["segmentation"], list) for a in polygons)


def test_images_vary_in_size_and_content(synthetic_coco, cocos):
    coco = cocos["train2017"]
    sizes = {(i["height"], i["width"]) for i in coco.imgs.values()}
    ratios = [w / h for h, w in sizes]
    assert len(sizes) == len(coco.imgs) and max(ratios) / min(ratios) > 1.3
    assert all(100 <= s <= 260 for size in sizes for s in size)
    counts = [len(coco.getAnnIds(imgIds=i, iscrowd=False)) for i in coco.getImgIds()]
    assert min(counts) >= 1 and max(counts) >= 3
    for info in coco.imgs.values():
        image = cv2.imread(os.path.join(synthetic_coco, "train2017", info["file_name"]))
        covered = np.zeros(image.shape[:2], bool)
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=info["id"])):
            covered |= coco.annToMask(ann).astype(bool)
        background = image[~covered].astype(np.float32)
        assert background.std(axis=0).min() > 5.0          # textured, not a flat fill


def test_same_seed_same_bytes_other_seed_differs(tmp_path, synthetic_coco):
    again = make_synthetic_coco(str(tmp_path / "again"), 8, 4, 0, 100, 260)
    assert _tree_bytes(again) == _tree_bytes(synthetic_coco)
    other = make_synthetic_coco(str(tmp_path / "other"), 8, 4, 1, 100, 260)
    assert _tree_bytes(other).keys() == _tree_bytes(synthetic_coco).keys()
    assert _tree_bytes(other) != _tree_bytes(synthetic_coco)


def test_command_line_writes_coco_layout(tmp_path):
    out = tmp_path / "cli"
    main(["--out", str(out), "--train", "2", "--val", "1", "--seed", "3", "--min-size", "64", "--max-size", "80"])
    with open(out / "annotations" / "instances_val2017.json", encoding="utf-8") as handle:
        val = json.load(handle)
    assert len(os.listdir(out / "train2017")) == 2 and len(val["images"]) == 1
    assert all(64 <= image[key] <= 80 for image in val["images"] for key in ("height", "width"))


def test_simple_style_separates_plain_contrasting_shapes(tmp_path):
    root = make_synthetic_coco(str(tmp_path / "simple"), 12, 2, 0, 100, 260, style="simple")
    coco = COCO(os.path.join(root, "annotations", "instances_train2017.json"))
    assert not any(a["iscrowd"] for a in coco.anns.values())
    counts = [len(coco.getAnnIds(imgIds=i)) for i in coco.getImgIds()]
    assert min(counts) >= 1 and max(counts) <= STYLES["simple"].max_instances and max(counts) >= 2
    gap = np.ones((2 * SHAPE_GAP + 1,) * 2, np.uint8)
    for info in coco.imgs.values():
        image = cv2.imread(os.path.join(root, "train2017", info["file_name"])).astype(np.float32)
        masks = [coco.annToMask(a) for a in coco.loadAnns(coco.getAnnIds(imgIds=info["id"]))]
        for a, b in itertools.combinations(masks, 2):
            assert not (cv2.dilate(a, gap) & b).any()              # shapes keep apart: no occlusion
        covered = cv2.dilate(np.any(masks, axis=0).astype(np.uint8), gap).astype(bool)   # off the JPEG edges
        background = image[~covered]
        assert background.std(axis=0).max() < 12.0                 # flat colour + pixel noise
        for mask in masks:
            inside = image[cv2.erode(mask, gap).astype(bool)]       # away from JPEG-blurred edges
            if len(inside):
                contrast = np.linalg.norm(inside.mean(axis=0) - background.mean(axis=0))
                assert contrast > 60.0


def test_simple_style_draws_whole_upright_shapes(tmp_path):
    root = make_synthetic_coco(str(tmp_path / "simple"), 16, 0, 1, 100, 260, style="simple")
    coco = COCO(os.path.join(root, "annotations", "instances_train2017.json"))
    for ann in coco.anns.values():
        info = coco.imgs[ann["image_id"]]
        ys, xs = np.nonzero(coco.annToMask(ann))
        assert xs.min() > 0 and ys.min() > 0 and xs.max() < info["width"] - 1 and ys.max() < info["height"] - 1
        x, y, w, h = ann["bbox"]
        fill = ann["area"] / (w * h)
        name = coco.cats[ann["category_id"]]["name"]
        if name == "rectangle":                                      # axis-aligned: fills its box
            assert fill > 0.9
        elif name in ("triangle", "star"):                           # a vertex on top: the top row is narrow
            top_row = xs[ys == ys.min()]
            assert top_row.max() - top_row.min() < 0.3 * w


def test_rejects_unknown_style(tmp_path):
    with pytest.raises(ValueError, match="unknown style 'noisy'"):
        make_synthetic_coco(str(tmp_path), 1, 1, style="noisy")


def test_rejects_bad_sizes(tmp_path):
    with pytest.raises(ValueError, match="min_size"):
        make_synthetic_coco(str(tmp_path), 1, 1, 0, 200, 100)
