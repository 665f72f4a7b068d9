"""COCO/TXT -> MindRecord conversion and the input pipeline (contract in docs/architecture.md)."""
import copy
import json
import logging
import os
import shutil

import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

import mindspore.dataset as ds

import src.dataset as dataset_module
from src.config import load_config
from src.dataset import (CLIPPED_BOX, EVAL_COLUMNS, FILE_PREFIX, SKIP_CORRUPT_IMAGE, SKIP_DEGENERATE_MASK,
                         SKIP_EMPTY_BOX, SKIP_MISSING_IMAGE, SKIP_NO_ANNOTATION, SKIP_ORPHAN_ANNOTATION,
                         SKIP_OVER_MAX, SKIP_SIZE_MISMATCH, TRAIN_COLUMNS, DatasetError, create_maskrcnn_dataset,
                         data_to_mindrecord, decode_image, decode_instances, load_manifest, manifest_path,
                         photometric_distortion, sample_order)

TRAIN_JSON = os.path.join("annotations", "instances_train2017.json")
VAL_JSON = os.path.join("annotations", "instances_val2017.json")
NO_AUGMENTATION = {"data.flip_ratio": 0.0, "data.expand_ratio": 0.0, "data.photo_ratio": 0.0}


# ---------------------------------------------------------------- helpers

def _cfg(coco_root, mindrecord_dir, **overrides):
    return load_config("tiny", {"data.coco_root": str(coco_root), "data.mindrecord_dir": str(mindrecord_dir),
                                **overrides})


def _with(cfg, **overrides):
    """A copy of cfg with dotted-key overrides given as keyword pairs {'data.flip_ratio': 1.0}."""
    out = copy.deepcopy(cfg)
    for key, value in overrides.items():
        section, leaf = key.split(".")
        setattr(getattr(out, section), leaf, value)
    return out


def _batches(dataset):
    return [{k: np.array(v) for k, v in batch.items()}
            for batch in dataset.create_dict_iterator(output_numpy=True, num_epochs=1)]


def _samples(batches):
    """Unbatch: list of per-image dicts."""
    return [{k: v[i] for k, v in batch.items()} for batch in batches for i in range(len(batch["image"]))]


def _raw_records(files):
    reader = ds.MindDataset(list(files), shuffle=False)
    return [dict(row) for row in reader.create_dict_iterator(output_numpy=True, num_epochs=1)]


def _valid_size(image_shape):
    ori_h, ori_w, scale_h, scale_w = image_shape
    return int(round(ori_h * scale_h)), int(round(ori_w * scale_w))


def _write_json(path, payload):
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(payload, handle)


def _read_json(path):
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def _prefixed(directory, is_training=True):
    return [f for f in os.listdir(directory) if f.startswith(FILE_PREFIX[is_training]) or f.startswith(".")]


# ---------------------------------------------------------------- conversion

def test_records_hold_file_bytes_and_compact_annotations(tiny_mindrecord, synthetic_coco):
    cfg = tiny_mindrecord.cfg
    coco = COCO(os.path.join(synthetic_coco, TRAIN_JSON))
    records = _raw_records(tiny_mindrecord.train_files)
    assert len(records) == len(coco.imgs) == load_manifest(cfg, True)["records"]
    assert sorted(int(r["image_id"]) for r in records) == sorted(coco.imgs)
    for record in records:
        info = coco.imgs[int(record["image_id"])]
        with open(os.path.join(synthetic_coco, "train2017", info["file_name"]), "rb") as handle:
            assert record["image"].tobytes() == handle.read()
        rows, rles = decode_instances(record["num_instances"], record["annotation"], record["masks"])
        anns = coco.loadAnns(coco.getAnnIds(imgIds=info["id"]))
        assert len(rows) == len(rles) == len(anns)
        for row, rle, ann in zip(rows, rles, anns):
            x, y, w, h = ann["bbox"]
            np.testing.assert_allclose(row[:4], [x, y, x + w, y + h], atol=1e-4)
            name = coco.cats[ann["category_id"]]["name"]
            assert row[4] == cfg.data.classes.index(name) and row[5] == ann["iscrowd"]
            decoded = mask_utils.decode({"size": [info["height"], info["width"]], "counts": rle})
            np.testing.assert_array_equal(decoded, coco.annToMask(ann))


def test_eval_conversion_keeps_every_image(tiny_mindrecord, synthetic_coco):
    coco = COCO(os.path.join(synthetic_coco, VAL_JSON))
    assert sorted(int(r["image_id"]) for r in _raw_records(tiny_mindrecord.val_files)) == sorted(coco.imgs)
    assert [os.path.basename(f) for f in tiny_mindrecord.val_files] == [
        f"{FILE_PREFIX[False]}{i}" for i in range(tiny_mindrecord.cfg.data.mindrecord_shards)]


def test_labels_follow_class_names_not_category_ids(tmp_path, synthetic_coco):
    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    os.symlink(os.path.join(synthetic_coco, "train2017"), root / "train2017")
    coco = _read_json(os.path.join(synthetic_coco, TRAIN_JSON))
    new_id = {c["id"]: 50 - c["id"] for c in coco["categories"]}
    names = {c["id"]: c["name"] for c in coco["categories"]}
    coco["categories"] = [dict(c, id=new_id[c["id"]]) for c in reversed(coco["categories"])]
    for ann in coco["annotations"]:
        ann["category_id"] = new_id[ann["category_id"]]
    _write_json(root / TRAIN_JSON, coco)
    cfg = _cfg(root, tmp_path / "mr")
    records = _raw_records(data_to_mindrecord(cfg, True))
    original = COCO(os.path.join(synthetic_coco, TRAIN_JSON))
    for record in records:
        rows, _ = decode_instances(record["num_instances"], record["annotation"], record["masks"])
        anns = original.loadAnns(original.getAnnIds(imgIds=int(record["image_id"])))
        assert rows[:, 4].tolist() == [cfg.data.classes.index(names[a["category_id"]]) for a in anns]


def test_parallel_conversion_writes_the_same_records(tmp_path, tiny_mindrecord):
    cfg = _with(tiny_mindrecord.cfg, **{"data.mindrecord_dir": str(tmp_path), "data.convert_workers": 2})
    parallel = _raw_records(data_to_mindrecord(cfg, True))
    serial = _raw_records(tiny_mindrecord.train_files)
    assert len(parallel) == len(serial)
    for a, b in zip(parallel, serial):
        assert all(np.array_equal(a[k], b[k]) for k in a)


def test_single_shard_conversion_holds_every_record(tmp_path, tiny_mindrecord):
    """FileWriter names a lone shard without an index; the conversion must find and move it."""
    cfg = _with(tiny_mindrecord.cfg, **{"data.mindrecord_dir": str(tmp_path), "data.mindrecord_shards": 1})
    files = data_to_mindrecord(cfg, True)
    assert len(files) == 1 and os.path.isfile(files[0])
    assert len(_raw_records(files)) == len(_raw_records(tiny_mindrecord.train_files))


def test_complete_conversion_is_reused(tiny_mindrecord, caplog):
    cfg = tiny_mindrecord.cfg
    stamps = [os.stat(f).st_mtime_ns for f in tiny_mindrecord.train_files]
    with caplog.at_level(logging.INFO, logger="src.dataset"):
        files = data_to_mindrecord(cfg, True)
    assert files == tiny_mindrecord.train_files
    assert [os.stat(f).st_mtime_ns for f in files] == stamps
    assert "reusing" in caplog.text


def test_changed_settings_or_missing_manifest_force_a_new_conversion(tmp_path, tiny_mindrecord):
    directory = tmp_path / "mr"
    directory.mkdir()
    for path in tiny_mindrecord.train_files:                       # finished-looking shards, no manifest
        shutil.copy(path, directory)
        shutil.copy(path + ".db", directory)
    cfg = _with(tiny_mindrecord.cfg, **{"data.mindrecord_dir": str(directory)})
    stamps = [os.stat(directory / os.path.basename(f)).st_mtime_ns for f in tiny_mindrecord.train_files]
    files = data_to_mindrecord(cfg, True)
    assert [os.stat(f).st_mtime_ns for f in files] != stamps
    assert load_manifest(cfg, True)["fingerprint"]["max_instance_count"] == cfg.data.max_instance_count

    smaller = _with(cfg, **{"data.max_instance_count": 2})
    data_to_mindrecord(smaller, True)
    assert load_manifest(smaller, True)["fingerprint"]["max_instance_count"] == 2
    assert all(int(r["num_instances"]) <= 2 + 1 for r in _raw_records(files))   # + at most one crowd region


def test_interrupted_conversion_leaves_nothing_that_looks_finished(tmp_path, tiny_mindrecord, monkeypatch):
    cfg = _with(tiny_mindrecord.cfg, **{"data.mindrecord_dir": str(tmp_path)})
    data_to_mindrecord(cfg, True)                                   # an earlier, complete conversion
    real_encode, calls = dataset_module.encode_record, []

    def failing_encode(*args):
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("simulated crash")
        return real_encode(*args)

    monkeypatch.setattr(dataset_module, "encode_record", failing_encode)
    changed = _with(cfg, **{"data.max_instance_count": 3})          # stale: must be rebuilt, and crashes
    with pytest.raises(RuntimeError, match="simulated crash"):
        data_to_mindrecord(changed, True)
    assert _prefixed(tmp_path) == []
    assert not os.path.exists(manifest_path(changed, True))

    monkeypatch.setattr(dataset_module, "encode_record", real_encode)
    files = data_to_mindrecord(changed, True)
    assert len(_raw_records(files)) == load_manifest(changed, True)["records"] == 8


# ---------------------------------------------------------------- bad input

@pytest.fixture(scope="module")
def broken_coco(synthetic_coco, tmp_path_factory):
    """A copy of the synthetic set with one problem per training image; returns (root, expectations)."""
    root = str(tmp_path_factory.mktemp("broken") / "coco")
    shutil.copytree(synthetic_coco, root)
    coco = _read_json(os.path.join(root, TRAIN_JSON))
    images = {i["id"]: i for i in coco["images"]}
    anns_of = {i: [a for a in coco["annotations"] if a["image_id"] == i] for i in images}
    os.remove(os.path.join(root, "train2017", images[1]["file_name"]))
    corrupt = os.path.join(root, "train2017", images[2]["file_name"])
    with open(corrupt, "rb") as handle:
        head = handle.read()[:400]
    with open(corrupt, "wb") as handle:
        handle.write(head)
    coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] != 3]
    next_id = max(a["id"] for a in coco["annotations"]) + 1

    def add(image_id, bbox, segmentation):
        nonlocal next_id
        coco["annotations"].append({"id": next_id, "image_id": image_id, "category_id": 1, "iscrowd": 0,
                                    "bbox": bbox, "segmentation": segmentation, "area": 1.0})
        next_id += 1

    square = [[2, 2, 12, 2, 12, 12, 2, 12]]
    width4 = images[4]["width"]
    add(4, [10, 10, 0, 5], square)                                       # zero area
    add(4, [width4 + 5, 5, 10, 10], square)                              # wholly outside
    add(4, [-5, -5, 20, 20], square)                                     # partly outside: clipped
    add(5, [2, 2, 10, 10], [[1, 1, 5, 5]])                               # polygon of two points
    add(5, [2, 2, 10, 10], [[0, 0, 10, 0, 20, 0]])                       # collinear: empty mask
    add(999, [2, 2, 10, 10], square)                                     # unknown image id
    crowded = [a for a in anns_of[6] if not a["iscrowd"]][0]
    for _ in range(10):
        add(6, crowded["bbox"], crowded["segmentation"])
    num_targets6 = sum(not a["iscrowd"] for a in anns_of[6]) + 10
    images[7]["height"] += 1                                             # JSON size disagrees with the file
    _write_json(os.path.join(root, TRAIN_JSON), coco)

    val = _read_json(os.path.join(root, VAL_JSON))
    val["annotations"] = [a for a in val["annotations"] if a["image_id"] != val["images"][0]["id"]]
    _write_json(os.path.join(root, VAL_JSON), val)
    expected = {SKIP_MISSING_IMAGE: 1, SKIP_CORRUPT_IMAGE: 1, SKIP_SIZE_MISMATCH: 1, SKIP_NO_ANNOTATION: 1,
                SKIP_EMPTY_BOX: 2,
                CLIPPED_BOX: 1, SKIP_DEGENERATE_MASK: 2, SKIP_ORPHAN_ANNOTATION: 1,
                SKIP_OVER_MAX: num_targets6 - 8}
    return root, expected


@pytest.fixture(scope="module")
def broken_conversion(broken_coco, tmp_path_factory):
    root, expected = broken_coco
    cfg = _cfg(root, tmp_path_factory.mktemp("broken_mr"))
    return cfg, data_to_mindrecord(cfg, True), data_to_mindrecord(cfg, False), expected


@pytest.mark.parametrize("reason", [SKIP_MISSING_IMAGE, SKIP_CORRUPT_IMAGE, SKIP_SIZE_MISMATCH, SKIP_NO_ANNOTATION,
                                    SKIP_EMPTY_BOX, CLIPPED_BOX, SKIP_DEGENERATE_MASK, SKIP_ORPHAN_ANNOTATION,
                                    SKIP_OVER_MAX])
def test_bad_training_input_is_counted_and_skipped(broken_conversion, reason):
    cfg, _, _, expected = broken_conversion
    assert load_manifest(cfg, True)["skipped"][reason] == expected[reason]


def test_bad_input_records_are_clean(broken_conversion):
    cfg, train_files, val_files, _ = broken_conversion
    records = {int(r["image_id"]): r for r in _raw_records(train_files)}
    assert sorted(records) == [4, 5, 6, 8]                          # 1 missing, 2 corrupt, 3 unannotated, 7 size
    rows4, _ = decode_instances(records[4]["num_instances"], records[4]["annotation"], records[4]["masks"])
    np.testing.assert_allclose(rows4[-1, :4], [0, 0, 15, 15])       # the clipped box
    rows6, _ = decode_instances(records[6]["num_instances"], records[6]["annotation"], records[6]["masks"])
    assert (rows6[:, 5] == 0).sum() == cfg.data.max_instance_count
    assert load_manifest(cfg, False)["records"] == len(_raw_records(val_files)) == 4   # unannotated kept
    batches = _batches(create_maskrcnn_dataset(cfg, train_files, True, 1))
    assert len(batches) == 4 and all(b["valid_num"].sum() >= 1 for b in batches)


def _annotation_only_root(tmp_path, synthetic_coco, edit):
    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    coco = _read_json(os.path.join(synthetic_coco, TRAIN_JSON))
    edit(coco)
    _write_json(root / TRAIN_JSON, coco)
    return root


def test_unknown_category_name_is_an_error_before_writing(tmp_path, synthetic_coco):
    root = _annotation_only_root(tmp_path, synthetic_coco, lambda c: c["categories"].append(
        {"id": 9, "name": "hexagon", "supercategory": "shape"}))
    with pytest.raises(DatasetError, match=r"hexagon.*data\.classes"):
        data_to_mindrecord(_cfg(root, tmp_path / "mr"), True)
    assert not os.path.exists(tmp_path / "mr")


def test_undeclared_category_id_is_an_error(tmp_path, synthetic_coco):
    def edit(coco):
        coco["annotations"][0]["category_id"] = 77
    root = _annotation_only_root(tmp_path, synthetic_coco, edit)
    with pytest.raises(DatasetError, match="category_id 77"):
        data_to_mindrecord(_cfg(root, tmp_path / "mr"), True)


def test_annotation_without_required_key_is_named(tmp_path, synthetic_coco):
    def edit(coco):
        del coco["annotations"][2]["bbox"]
    root = _annotation_only_root(tmp_path, synthetic_coco, edit)
    with pytest.raises(DatasetError, match=r"annotations\[2\] lacks \['bbox'\]"):
        data_to_mindrecord(_cfg(root, tmp_path / "mr"), True)


def test_missing_annotation_file_is_named(tmp_path):
    with pytest.raises(DatasetError, match="instances_train2017.json"):
        data_to_mindrecord(_cfg(tmp_path, tmp_path / "mr"), True)


# ---------------------------------------------------------------- TXT ("other") format

@pytest.fixture(scope="module")
def txt_dataset(synthetic_coco, tmp_path_factory):
    """The synthetic training set as a TXT file (non-crowd boxes), plus one image line without boxes."""
    coco = COCO(os.path.join(synthetic_coco, TRAIN_JSON))
    lines, expected = [], {}
    for image_id in sorted(coco.imgs):
        items, labels = [], []
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=image_id, iscrowd=False)):
            x, y, w, h = (int(round(v)) for v in ann["bbox"])
            items.append(f"{x},{y},{x + w},{y + h},{ann['category_id'] - 1}")
            labels.append(ann["category_id"])
        lines.append(" ".join([f"train2017/{coco.imgs[image_id]['file_name']}"] + items))
        expected[len(lines)] = labels
    lines.append(f"train2017/{coco.imgs[1]['file_name']}")
    directory = tmp_path_factory.mktemp("txt")
    anno_path = directory / "train.txt"
    anno_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    cfg = load_config("tiny", {"data.dataset": "other", "data.image_dir": synthetic_coco,
                               "data.anno_path": str(anno_path), "data.mindrecord_dir": str(directory / "mr"),
                               **NO_AUGMENTATION})
    return cfg, expected


def test_txt_converts_and_trains_with_box_masks(txt_dataset):
    cfg, expected = txt_dataset
    files = data_to_mindrecord(cfg, True)
    manifest = load_manifest(cfg, True)
    assert manifest["records"] == len(expected) and manifest["skipped"] == {SKIP_NO_ANNOTATION: 1}
    records = {int(r["image_id"]): r for r in _raw_records(files)}
    for line_no, labels in expected.items():
        rows, _ = decode_instances(records[line_no]["num_instances"], records[line_no]["annotation"],
                                   records[line_no]["masks"])
        assert rows[:, 4].tolist() == labels                        # cls is 0-based over classes[1:]
    for sample in _samples(_batches(create_maskrcnn_dataset(cfg, files, True, 2))):
        for box, mask in zip(sample["box"][sample["valid_num"]], sample["mask"][sample["valid_num"]]):
            filled = np.zeros_like(mask)
            x1, y1, x2, y2 = box
            filled[int(np.ceil(y1 - 0.5)):int(np.ceil(y2 - 0.5)), int(np.ceil(x1 - 0.5)):int(np.ceil(x2 - 0.5))] = 1
            assert (filled != mask).sum() <= 2 * (mask.shape[0] + mask.shape[1]) * 0.1 + 4
            assert (mask & filled).sum() / max((mask | filled).sum(), 1) > 0.8
    assert load_manifest(cfg, False) is None and len(_raw_records(data_to_mindrecord(cfg, False))) == len(expected) + 1


@pytest.mark.parametrize("bad_line, message", [
    ("train2017/a.jpg 1,2,3,4", "x1,y1,x2,y2,cls"),
    ("train2017/a.jpg 1,2,3,four,0", "x1,y1,x2,y2,cls"),
    ("train2017/a.jpg 1,2,3,4,4", "class 4 out of range"),
])
def test_malformed_txt_line_names_file_and_line(tmp_path, bad_line, message):
    anno_path = tmp_path / "bad.txt"
    anno_path.write_text(f"train2017/x.jpg 1,2,30,40,0\n\n{bad_line}\n", encoding="utf-8")
    cfg = load_config("tiny", {"data.dataset": "other", "data.image_dir": str(tmp_path),
                               "data.anno_path": str(anno_path), "data.mindrecord_dir": str(tmp_path / "mr")})
    with pytest.raises(DatasetError, match=f"{anno_path}:3: .*{message}"):
        data_to_mindrecord(cfg, True)
    assert not os.path.exists(tmp_path / "mr")


# ---------------------------------------------------------------- pipeline

@pytest.fixture(scope="module")
def train_batches(tiny_mindrecord):
    cfg = tiny_mindrecord.cfg
    return _batches(create_maskrcnn_dataset(cfg, tiny_mindrecord.train_files, True, cfg.train.batch_size))


def test_training_columns_shapes_and_dtypes(train_batches, tiny_mindrecord):
    cfg = tiny_mindrecord.cfg
    b, m, h, w = cfg.train.batch_size, cfg.data.max_instance_count, cfg.data.img_height, cfg.data.img_width
    assert len(train_batches) == 8 // b
    expected = {"image": ((b, 3, h, w), np.float32), "image_shape": ((b, 4), np.float32),
                "box": ((b, m, 4), np.float32), "label": ((b, m), np.int32), "valid_num": ((b, m), np.bool_),
                "mask": ((b, m, h, w), np.uint8)}
    for batch in train_batches:
        assert list(batch) == TRAIN_COLUMNS
        assert {k: (v.shape, v.dtype) for k, v in batch.items()} == expected


def test_training_values_are_in_range(train_batches, tiny_mindrecord):
    cfg = tiny_mindrecord.cfg
    mean, std = np.array(cfg.data.img_mean), np.array(cfg.data.img_std)
    for sample in _samples(train_batches):
        valid, n = sample["valid_num"], int(sample["valid_num"].sum())
        assert n >= 1 and valid[:n].all() and not valid[n:].any()
        assert ((sample["label"][:n] >= 1) & (sample["label"][:n] < cfg.num_classes)).all()
        assert not sample["label"][n:].any() and not sample["box"][n:].any() and not sample["mask"][n:].any()
        assert set(np.unique(sample["mask"])) <= {0, 1}
        valid_h, valid_w = _valid_size(sample["image_shape"])
        assert valid_h <= cfg.data.img_height and valid_w <= cfg.data.img_width
        assert max(valid_h / cfg.data.img_height, valid_w / cfg.data.img_width) == pytest.approx(1.0, abs=0.01)
        box = sample["box"][:n]
        assert (box[:, 2] > box[:, 0]).all() and (box[:, 3] > box[:, 1]).all()
        assert (box >= 0).all() and (box[:, [0, 2]] <= valid_w).all() and (box[:, [1, 3]] <= valid_h).all()
        image = sample["image"]
        assert not image[:, valid_h:].any() and not image[:, :, valid_w:].any()
        low, high = (-mean / std).min() - 1e-4, ((255 - mean) / std).max() + 1e-4
        assert low <= image.min() and image.max() <= high


def _assert_boxes_enclose_masks(samples, tolerance=2.0):
    """Every non-empty transformed mask lies inside its box, and the box is tight around it."""
    checked = empty = 0
    for sample in samples:
        for box, mask in zip(sample["box"][sample["valid_num"]], sample["mask"][sample["valid_num"]]):
            ys, xs = np.nonzero(mask)
            if xs.size == 0:
                empty += 1
                continue
            x1, y1, x2, y2 = box
            extent = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)
            assert extent[0] >= x1 - 1 and extent[1] >= y1 - 1 and extent[2] <= x2 + 1 and extent[3] <= y2 + 1
            np.testing.assert_allclose(extent, box, atol=tolerance)
            checked += 1
    assert checked > 4 * empty
    return checked


def test_boxes_follow_masks_through_expand_rescale_and_flip(tiny_mindrecord, synthetic_coco):
    cfg = _with(tiny_mindrecord.cfg, **{"data.expand_ratio": 1.0, "data.photo_ratio": 0.0})
    sizes = {i["id"]: (i["height"], i["width"]) for i in _read_json(os.path.join(synthetic_coco, TRAIN_JSON))["images"]}
    expanded = 0
    for flip in (0.0, 1.0):
        flipped = _with(cfg, **{"data.flip_ratio": flip})
        for epoch in range(2):
            samples = _samples(_batches(create_maskrcnn_dataset(flipped, tiny_mindrecord.train_files, True, 2,
                                                                epoch=epoch)))
            _assert_boxes_enclose_masks(samples)
            originals = {s for s in sizes.values()}
            expanded += sum((int(s["image_shape"][0]), int(s["image_shape"][1])) not in originals for s in samples)
    assert expanded >= 4


def test_flip_mirrors_image_boxes_and_masks(tiny_mindrecord):
    cfg = _with(tiny_mindrecord.cfg, **NO_AUGMENTATION)
    plain = _samples(_batches(create_maskrcnn_dataset(cfg, tiny_mindrecord.train_files, True, 2)))
    mirrored = _samples(_batches(create_maskrcnn_dataset(_with(cfg, **{"data.flip_ratio": 1.0}),
                                                         tiny_mindrecord.train_files, True, 2)))
    for a, b in zip(plain, mirrored):
        np.testing.assert_array_equal(a["image_shape"], b["image_shape"])
        valid_h, valid_w = _valid_size(a["image_shape"])
        np.testing.assert_allclose(b["image"][:, :valid_h, :valid_w], a["image"][:, :valid_h, valid_w - 1::-1],
                                   atol=0.05)
        n = int(a["valid_num"].sum())
        np.testing.assert_allclose(b["box"][:n, [0, 2]], valid_w - a["box"][:n, [2, 0]], atol=1e-3)
        np.testing.assert_array_equal(b["box"][:n, [1, 3]], a["box"][:n, [1, 3]])
        differing = (b["mask"][:n, :, :valid_w] != a["mask"][:n, :, valid_w - 1::-1]).sum()
        assert differing <= 0.01 * a["mask"][:n].sum()


def test_photometric_distortion_changes_colours_within_range(tiny_mindrecord):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(20, 30, 3)).astype(np.uint8)
    outputs = [photometric_distortion(np.random.default_rng(seed), image) for seed in range(8)]
    assert all(o.dtype == np.float32 and o.shape == image.shape and 0 <= o.min() and o.max() <= 255 for o in outputs)
    assert sum(not np.allclose(o, image, atol=1.0) for o in outputs) >= 6
    cfg = _with(tiny_mindrecord.cfg, **NO_AUGMENTATION)
    plain = _batches(create_maskrcnn_dataset(cfg, tiny_mindrecord.train_files, True, 2))
    distorted = _batches(create_maskrcnn_dataset(_with(cfg, **{"data.photo_ratio": 1.0}),
                                                 tiny_mindrecord.train_files, True, 2))
    assert not all(np.allclose(a["image"], b["image"]) for a, b in zip(plain, distorted))
    for a, b in zip(plain, distorted):
        for column in ("image_shape", "box", "mask"):
            np.testing.assert_array_equal(a[column], b[column])


def test_crowd_regions_are_not_training_targets(tiny_mindrecord):
    cfg = _with(tiny_mindrecord.cfg, **NO_AUGMENTATION)
    targets = {}
    for record in _raw_records(tiny_mindrecord.train_files):
        rows, _ = decode_instances(record["num_instances"], record["annotation"], record["masks"])
        targets[int(record["image_id"])] = rows
    assert any((rows[:, 5] == 1).any() for rows in targets.values())
    order = sample_order(len(targets), True, cfg.train.seed, 0)
    ids = [int(r["image_id"]) for r in _raw_records(tiny_mindrecord.train_files)]
    samples = _samples(_batches(create_maskrcnn_dataset(cfg, tiny_mindrecord.train_files, True, 2)))
    for position, sample in zip(order, samples):
        rows = targets[ids[position]]
        non_crowd = rows[rows[:, 5] == 0]
        assert sample["valid_num"].sum() == len(non_crowd)
        np.testing.assert_array_equal(sample["label"][:len(non_crowd)], non_crowd[:, 4])


def test_eval_columns_are_the_plain_rescaled_image(tiny_mindrecord, synthetic_coco):
    cfg = tiny_mindrecord.cfg
    coco = _read_json(os.path.join(synthetic_coco, VAL_JSON))
    batches = _batches(create_maskrcnn_dataset(cfg, tiny_mindrecord.val_files, False, 3))
    assert [len(b["image"]) for b in batches] == [3, 1]                  # no drop_remainder for eval
    samples = _samples(batches)
    assert all(list(b) == EVAL_COLUMNS for b in batches)
    recorded = [int(r["image_id"]) for r in _raw_records(tiny_mindrecord.val_files)]
    assert [int(s["image_id"]) for s in samples] == recorded
    infos = {i["id"]: i for i in coco["images"]}
    mean, std = np.array(cfg.data.img_mean, np.float32), np.array(cfg.data.img_std, np.float32)
    for sample in samples:
        info = infos[int(sample["image_id"])]
        assert sample["image"].shape == (3, cfg.data.img_height, cfg.data.img_width)
        assert sample["image_id"].dtype == np.int32
        ori_h, ori_w, scale_h, scale_w = sample["image_shape"]
        assert (ori_h, ori_w) == (info["height"], info["width"])
        valid_h, valid_w = _valid_size(sample["image_shape"])
        with open(os.path.join(synthetic_coco, "val2017", info["file_name"]), "rb") as handle:
            rgb = decode_image(handle.read())
        reference = (cv2.resize(rgb, (valid_w, valid_h), interpolation=cv2.INTER_LINEAR) - mean) / std
        got = sample["image"][:, :valid_h, :valid_w].transpose(1, 2, 0)
        assert np.abs(got - reference).mean() < 0.02
        assert not sample["image"][:, valid_h:].any() and not sample["image"][:, :, valid_w:].any()


def test_same_seed_and_epoch_give_identical_batches_for_any_worker_count(tiny_mindrecord, train_batches):
    cfg = tiny_mindrecord.cfg
    again = _batches(create_maskrcnn_dataset(_with(cfg, **{"data.num_parallel_workers": 2}),
                                             tiny_mindrecord.train_files, True, cfg.train.batch_size))
    assert len(again) == len(train_batches)
    for a, b in zip(again, train_batches):
        for column in TRAIN_COLUMNS:
            np.testing.assert_array_equal(a[column], b[column])


def test_other_epoch_or_seed_changes_order_and_augmentation(tiny_mindrecord, train_batches):
    cfg = tiny_mindrecord.cfg
    assert not np.array_equal(sample_order(8, True, cfg.train.seed, 0), sample_order(8, True, cfg.train.seed, 1))
    assert not np.array_equal(sample_order(8, True, 1, 0), sample_order(8, True, 2, 0))
    later = _batches(create_maskrcnn_dataset(cfg, tiny_mindrecord.train_files, True, cfg.train.batch_size, epoch=1))
    assert not all(np.array_equal(a["image_shape"], b["image_shape"]) for a, b in zip(later, train_batches))


def test_resumed_epoch_skips_to_the_same_batches(tiny_mindrecord):
    cfg = tiny_mindrecord.cfg
    full = _batches(create_maskrcnn_dataset(cfg, tiny_mindrecord.train_files, True, 2, epoch=3))
    resumed = _batches(create_maskrcnn_dataset(cfg, tiny_mindrecord.train_files, True, 2, epoch=3).skip(2))
    assert len(resumed) == len(full) - 2
    for a, b in zip(resumed, full[2:]):
        for column in TRAIN_COLUMNS:
            np.testing.assert_array_equal(a[column], b[column])


@pytest.mark.parametrize("num_records, num_shards", [(8, 2), (9, 2), (7, 3)])
def test_training_shards_are_disjoint_and_equal_sized(num_records, num_shards):
    shards = [sample_order(num_records, True, 3, 5, num_shards, s) for s in range(num_shards)]
    merged = np.concatenate(shards)
    assert len(set(merged.tolist())) == merged.size == (num_records // num_shards) * num_shards
    assert {len(s) for s in shards} == {num_records // num_shards}
    assert set(merged.tolist()) <= set(range(num_records))


def test_eval_shards_cover_every_image_once(tiny_mindrecord):
    cfg = tiny_mindrecord.cfg
    ids = [[int(i) for b in _batches(create_maskrcnn_dataset(cfg, tiny_mindrecord.val_files, False, 1,
                                                             num_shards=2, shard_id=s)) for i in b["image_id"]]
           for s in range(2)]
    assert not set(ids[0]) & set(ids[1])
    assert sorted(ids[0] + ids[1]) == sorted(int(r["image_id"]) for r in _raw_records(tiny_mindrecord.val_files))


def test_training_shard_batches(tiny_mindrecord):
    cfg = tiny_mindrecord.cfg
    shards = [_batches(create_maskrcnn_dataset(cfg, tiny_mindrecord.train_files, True, 2, num_shards=2,
                                               shard_id=s)) for s in range(2)]
    assert [len(s) for s in shards] == [2, 2]
    images = [b["image"][i].tobytes() for s in shards for b in s for i in range(2)]
    assert len(set(images)) == len(images) == 8
    with pytest.raises(DatasetError, match="fewer than one batch"):
        create_maskrcnn_dataset(cfg, tiny_mindrecord.train_files, True, 5, num_shards=2)
