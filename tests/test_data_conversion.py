"""COCO / TXT -> MindRecord conversion (src/data/annotations.py, src/data/conversion.py)."""
import fcntl
import logging
import os
import shutil
import subprocess
import sys
import time

import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

import src.data.conversion as conversion
from data_helpers import (NO_AUGMENTATION, TRAIN_JSON, VAL_JSON, batches_of, data_cfg, raw_records, read_json,
                          samples_of, with_overrides, write_json)
from src.config import load_config
from src.data.annotations import (CLIPPED_BOX, SKIP_CORRUPT_IMAGE, SKIP_DEGENERATE_MASK, SKIP_EMPTY_BOX,
                                  SKIP_MISSING_IMAGE, SKIP_NO_ANNOTATION, SKIP_ORPHAN_ANNOTATION, SKIP_OVER_MAX,
                                  SKIP_SIZE_MISMATCH)
from src.data.conversion import FILE_PREFIX, data_to_mindrecord, load_manifest, manifest_path
from src.data.pipeline import create_maskrcnn_dataset
from src.data.records import DatasetError, decode_image, decode_instances


def _prefixed(directory, is_training=True):
    return [f for f in os.listdir(directory) if f.startswith(FILE_PREFIX[is_training]) or f.startswith(".")]


# ---------------------------------------------------------------- conversion

def test_records_hold_file_bytes_and_compact_annotations(tiny_mindrecord, synthetic_coco):
    cfg = tiny_mindrecord.cfg
    coco = COCO(os.path.join(synthetic_coco, TRAIN_JSON))
    records = raw_records(tiny_mindrecord.train_files)
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
    assert sorted(int(r["image_id"]) for r in raw_records(tiny_mindrecord.val_files)) == sorted(coco.imgs)
    assert [os.path.basename(f) for f in tiny_mindrecord.val_files] == [
        f"{FILE_PREFIX[False]}{i}" for i in range(tiny_mindrecord.cfg.data.mindrecord_shards)]


def test_labels_follow_class_names_not_category_ids(tmp_path, synthetic_coco):
    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    os.symlink(os.path.join(synthetic_coco, "train2017"), root / "train2017")
    coco = read_json(os.path.join(synthetic_coco, TRAIN_JSON))
    new_id = {c["id"]: 50 - c["id"] for c in coco["categories"]}
    names = {c["id"]: c["name"] for c in coco["categories"]}
    coco["categories"] = [dict(c, id=new_id[c["id"]]) for c in reversed(coco["categories"])]
    for ann in coco["annotations"]:
        ann["category_id"] = new_id[ann["category_id"]]
    write_json(root / TRAIN_JSON, coco)
    cfg = data_cfg(root, tmp_path / "mr")
    records = raw_records(data_to_mindrecord(cfg, True))
    original = COCO(os.path.join(synthetic_coco, TRAIN_JSON))
    for record in records:
        rows, _ = decode_instances(record["num_instances"], record["annotation"], record["masks"])
        anns = original.loadAnns(original.getAnnIds(imgIds=int(record["image_id"])))
        assert rows[:, 4].tolist() == [cfg.data.classes.index(names[a["category_id"]]) for a in anns]


def test_parallel_conversion_writes_the_same_records(tmp_path, tiny_mindrecord):
    cfg = with_overrides(tiny_mindrecord.cfg, **{"data.mindrecord_dir": str(tmp_path), "data.convert_workers": 2})
    parallel = raw_records(data_to_mindrecord(cfg, True))
    serial = raw_records(tiny_mindrecord.train_files)
    assert len(parallel) == len(serial)
    for a, b in zip(parallel, serial):
        assert all(np.array_equal(a[k], b[k]) for k in a)


def test_single_shard_conversion_holds_every_record(tmp_path, tiny_mindrecord):
    """FileWriter names a lone shard without an index; the conversion must find and move it."""
    cfg = with_overrides(tiny_mindrecord.cfg, **{"data.mindrecord_dir": str(tmp_path), "data.mindrecord_shards": 1})
    files = data_to_mindrecord(cfg, True)
    assert len(files) == 1 and os.path.isfile(files[0])
    assert len(raw_records(files)) == len(raw_records(tiny_mindrecord.train_files))


def test_complete_conversion_is_reused(tiny_mindrecord, capsys):
    cfg = tiny_mindrecord.cfg
    stamps = [os.stat(f).st_mtime_ns for f in tiny_mindrecord.train_files]
    files = data_to_mindrecord(cfg, True)
    assert files == tiny_mindrecord.train_files
    assert [os.stat(f).st_mtime_ns for f in files] == stamps
    assert "MindRecord train: reused 8 of 8 images" in capsys.readouterr().out


def test_changed_settings_or_missing_manifest_force_a_new_conversion(tmp_path, tiny_mindrecord):
    directory = tmp_path / "mr"
    directory.mkdir()
    for path in tiny_mindrecord.train_files:                       # finished-looking shards, no manifest
        shutil.copy(path, directory)
        shutil.copy(path + ".db", directory)
    cfg = with_overrides(tiny_mindrecord.cfg, **{"data.mindrecord_dir": str(directory)})
    stamps = [os.stat(directory / os.path.basename(f)).st_mtime_ns for f in tiny_mindrecord.train_files]
    files = data_to_mindrecord(cfg, True)
    assert [os.stat(f).st_mtime_ns for f in files] != stamps
    assert load_manifest(cfg, True)["fingerprint"]["max_instance_count"] == cfg.data.max_instance_count

    smaller = with_overrides(cfg, **{"data.max_instance_count": 2})
    data_to_mindrecord(smaller, True)
    assert load_manifest(smaller, True)["fingerprint"]["max_instance_count"] == 2
    assert all(int(r["num_instances"]) <= 2 + 1 for r in raw_records(files))   # + at most one crowd region


def test_interrupted_conversion_leaves_nothing_that_looks_finished(tmp_path, tiny_mindrecord, monkeypatch):
    cfg = with_overrides(tiny_mindrecord.cfg, **{"data.mindrecord_dir": str(tmp_path)})
    data_to_mindrecord(cfg, True)                                   # an earlier, complete conversion
    real_encode, calls = conversion.encode_record, []

    def failing_encode(*args):
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("simulated crash")
        return real_encode(*args)

    monkeypatch.setattr(conversion, "encode_record", failing_encode)
    changed = with_overrides(cfg, **{"data.max_instance_count": 3})          # stale: must be rebuilt, and crashes
    with pytest.raises(RuntimeError, match="simulated crash"):
        data_to_mindrecord(changed, True)
    assert _prefixed(tmp_path) == []
    assert not os.path.exists(manifest_path(changed, True))

    monkeypatch.setattr(conversion, "encode_record", real_encode)
    files = data_to_mindrecord(changed, True)
    assert len(raw_records(files)) == load_manifest(changed, True)["records"] == 8


# ---------------------------------------------------------------- reuse, rebuild, stale partial output

def _copy_of(synthetic_coco, tmp_path):
    root = tmp_path / "coco"
    shutil.copytree(synthetic_coco, root)
    return root, data_cfg(root, tmp_path / "mr")


def test_fixed_images_rebuild_the_mindrecord(tmp_path, synthetic_coco, capsys):
    root, cfg = _copy_of(synthetic_coco, tmp_path)
    image = root / "train2017" / read_json(root / TRAIN_JSON)["images"][0]["file_name"]
    shutil.move(image, tmp_path / "aside.jpg")
    data_to_mindrecord(cfg, True)
    assert "converted 7 of 8 images" in capsys.readouterr().out

    shutil.move(tmp_path / "aside.jpg", image)                      # the user restores the image
    files = data_to_mindrecord(cfg, True)
    out = capsys.readouterr().out
    assert "image files changed" in out and "converted 8 of 8 images" in out
    assert len(raw_records(files)) == 8

    data_to_mindrecord(cfg, True)
    assert "reused 8 of 8 images" in capsys.readouterr().out

    stat = os.stat(image)                                           # replaced in place: same name, new time
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10 ** 9))
    data_to_mindrecord(cfg, True)
    assert "image files changed" in capsys.readouterr().out


def test_reuse_does_not_parse_the_annotation_file(tiny_mindrecord, monkeypatch, capsys):
    def no_parsing(*args):
        raise AssertionError("parsed the annotation file")
    monkeypatch.setattr(conversion, "coco_tasks", no_parsing)
    assert data_to_mindrecord(tiny_mindrecord.cfg, False) == tiny_mindrecord.val_files
    assert "MindRecord eval: reused 4 of 4 images" in capsys.readouterr().out


def test_changed_annotation_file_rebuilds_the_mindrecord(tmp_path, synthetic_coco, capsys):
    root, cfg = _copy_of(synthetic_coco, tmp_path)
    data_to_mindrecord(cfg, True)
    coco = read_json(root / TRAIN_JSON)
    coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] != coco["images"][0]["id"]]
    write_json(root / TRAIN_JSON, coco)
    capsys.readouterr()
    data_to_mindrecord(cfg, True)
    out = capsys.readouterr().out
    assert "annotation file changed" in out and "converted 7 of 8 images" in out


def test_zero_byte_image_is_skipped_naming_it(tmp_path, synthetic_coco, caplog):
    root, cfg = _copy_of(synthetic_coco, tmp_path)
    empty = root / "train2017" / read_json(root / TRAIN_JSON)["images"][1]["file_name"]
    empty.write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="src.data"):
        files = data_to_mindrecord(cfg, True)
    assert load_manifest(cfg, True)["skipped"] == {SKIP_CORRUPT_IMAGE: 1}
    assert len(raw_records(files)) == 7
    assert f"{empty}: empty file" in caplog.text
    assert decode_image(b"") is None


def test_counts_are_printed_on_conversion_and_on_reuse(broken_conversion, capsys):
    cfg, _, _, expected = broken_conversion
    data_to_mindrecord(cfg, True)
    out = capsys.readouterr().out
    assert "MindRecord train: reused 4 of 8 images" in out
    for reason in (SKIP_MISSING_IMAGE, SKIP_CORRUPT_IMAGE, SKIP_SIZE_MISMATCH, SKIP_NO_ANNOTATION):
        assert f"{reason} {expected[reason]}" in out
    for reason in (SKIP_EMPTY_BOX, SKIP_DEGENERATE_MASK, SKIP_ORPHAN_ANNOTATION, SKIP_OVER_MAX, CLIPPED_BOX):
        assert f"{reason} {expected[reason]}" in out


def _dead_pid():
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_stale_partial_output_of_a_dead_process_is_removed(tmp_path, tiny_mindrecord):
    """Folders without a lock file go by the pid in their name; a held lock means alive whatever the pid
    (another pid namespace or host)."""
    cfg = with_overrides(tiny_mindrecord.cfg, **{"data.mindrecord_dir": str(tmp_path)})
    live = subprocess.Popen(["sleep", "60"])
    dead_train = tmp_path / f".{FILE_PREFIX[True]}.partial-{_dead_pid()}-k1ll3d"
    dead_eval = tmp_path / f".{FILE_PREFIX[False]}.partial-{_dead_pid()}-k1ll3d"
    running = tmp_path / f".{FILE_PREFIX[True]}.partial-{live.pid}-w0rk1n"
    locked = tmp_path / f".{FILE_PREFIX[True]}.partial-{_dead_pid()}-l0ck3d"
    for folder in (dead_train, dead_eval, running, locked):
        folder.mkdir()
        (folder / FILE_PREFIX[True]).write_bytes(b"half a shard")
    try:
        with open(locked / conversion.LOCK_NAME, "w", encoding="utf-8") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            data_to_mindrecord(cfg, True)
    finally:
        live.kill()
        live.wait()
    assert sorted(p for p in os.listdir(tmp_path) if ".partial-" in p) == sorted([running.name, locked.name])
    assert (running / FILE_PREFIX[True]).exists() and (locked / FILE_PREFIX[True]).exists()


KILLED_CONVERSION = """
import sys, time
import src.data.conversion as conversion
from data_helpers import data_cfg

real = conversion.encode_record
def slow(task, *args):
    if task.image_id > 2:
        time.sleep(600)                  # killed here, mid-conversion
    return real(task, *args)
conversion.encode_record = slow
conversion.data_to_mindrecord(data_cfg(sys.argv[1], sys.argv[2]), True)
"""


def test_conversion_killed_with_sigkill_is_cleaned_up_and_redone(tmp_path, synthetic_coco, capsys):
    mindrecord_dir = tmp_path / "mr"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.path.dirname(__file__)]), GLOG_v="3")
    child = subprocess.Popen([sys.executable, "-c", KILLED_CONVERSION, synthetic_coco, str(mindrecord_dir)], env=env)
    try:
        deadline = time.monotonic() + 120
        while not (mindrecord_dir.is_dir() and any(".partial-" in p for p in os.listdir(mindrecord_dir))):
            assert child.poll() is None and time.monotonic() < deadline, "the conversion never started"
            time.sleep(0.2)
    finally:
        child.kill()
        child.wait()
    assert [p for p in os.listdir(mindrecord_dir) if ".partial-" in p]          # what a kill leaves
    cfg = data_cfg(synthetic_coco, mindrecord_dir)
    files = data_to_mindrecord(cfg, True)
    assert os.listdir(mindrecord_dir) and not [p for p in os.listdir(mindrecord_dir) if ".partial-" in p]
    assert f"process {child.pid} is gone" in capsys.readouterr().out
    assert len(raw_records(files)) == load_manifest(cfg, True)["records"] == 8


# ---------------------------------------------------------------- bad input

@pytest.fixture(scope="module")
def broken_coco(synthetic_coco, tmp_path_factory):
    """A copy of the synthetic set with one problem per training image; returns (root, expectations)."""
    root = str(tmp_path_factory.mktemp("broken") / "coco")
    shutil.copytree(synthetic_coco, root)
    coco = read_json(os.path.join(root, TRAIN_JSON))
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
    write_json(os.path.join(root, TRAIN_JSON), coco)

    val = read_json(os.path.join(root, VAL_JSON))
    val["annotations"] = [a for a in val["annotations"] if a["image_id"] != val["images"][0]["id"]]
    write_json(os.path.join(root, VAL_JSON), val)
    expected = {SKIP_MISSING_IMAGE: 1, SKIP_CORRUPT_IMAGE: 1, SKIP_SIZE_MISMATCH: 1, SKIP_NO_ANNOTATION: 1,
                SKIP_EMPTY_BOX: 2,
                CLIPPED_BOX: 1, SKIP_DEGENERATE_MASK: 2, SKIP_ORPHAN_ANNOTATION: 1,
                SKIP_OVER_MAX: num_targets6 - 8}
    return root, expected


@pytest.fixture(scope="module")
def broken_conversion(broken_coco, tmp_path_factory):
    root, expected = broken_coco
    cfg = data_cfg(root, tmp_path_factory.mktemp("broken_mr"))
    return cfg, data_to_mindrecord(cfg, True), data_to_mindrecord(cfg, False), expected


@pytest.mark.parametrize("reason", [SKIP_MISSING_IMAGE, SKIP_CORRUPT_IMAGE, SKIP_SIZE_MISMATCH, SKIP_NO_ANNOTATION,
                                    SKIP_EMPTY_BOX, CLIPPED_BOX, SKIP_DEGENERATE_MASK, SKIP_ORPHAN_ANNOTATION,
                                    SKIP_OVER_MAX])
def test_bad_training_input_is_counted_and_skipped(broken_conversion, reason):
    cfg, _, _, expected = broken_conversion
    assert load_manifest(cfg, True)["skipped"][reason] == expected[reason]


def test_bad_input_records_are_clean(broken_conversion):
    cfg, train_files, val_files, _ = broken_conversion
    records = {int(r["image_id"]): r for r in raw_records(train_files)}
    assert sorted(records) == [4, 5, 6, 8]                          # 1 missing, 2 corrupt, 3 unannotated, 7 size
    rows4, _ = decode_instances(records[4]["num_instances"], records[4]["annotation"], records[4]["masks"])
    np.testing.assert_allclose(rows4[-1, :4], [0, 0, 15, 15])       # the clipped box
    rows6, _ = decode_instances(records[6]["num_instances"], records[6]["annotation"], records[6]["masks"])
    assert (rows6[:, 5] == 0).sum() == cfg.data.max_instance_count
    assert load_manifest(cfg, False)["records"] == len(raw_records(val_files)) == 4   # unannotated kept
    batches = batches_of(create_maskrcnn_dataset(cfg, train_files, True, 1))
    assert len(batches) == 4 and all(b["valid_num"].sum() >= 1 for b in batches)


def _annotation_only_root(tmp_path, synthetic_coco, edit):
    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    coco = read_json(os.path.join(synthetic_coco, TRAIN_JSON))
    edit(coco)
    write_json(root / TRAIN_JSON, coco)
    return root


def test_unknown_category_name_is_an_error_before_writing(tmp_path, synthetic_coco):
    root = _annotation_only_root(tmp_path, synthetic_coco, lambda c: c["categories"].append(
        {"id": 9, "name": "hexagon", "supercategory": "shape"}))
    with pytest.raises(DatasetError, match=r"hexagon.*data\.classes"):
        data_to_mindrecord(data_cfg(root, tmp_path / "mr"), True)
    assert not os.path.exists(tmp_path / "mr")


def test_undeclared_category_id_is_an_error(tmp_path, synthetic_coco):
    def edit(coco):
        coco["annotations"][0]["category_id"] = 77
    root = _annotation_only_root(tmp_path, synthetic_coco, edit)
    with pytest.raises(DatasetError, match="category_id 77"):
        data_to_mindrecord(data_cfg(root, tmp_path / "mr"), True)


def test_annotation_without_required_key_is_named(tmp_path, synthetic_coco):
    def edit(coco):
        del coco["annotations"][2]["bbox"]
    root = _annotation_only_root(tmp_path, synthetic_coco, edit)
    with pytest.raises(DatasetError, match=r"annotations\[2\] lacks \['bbox'\]"):
        data_to_mindrecord(data_cfg(root, tmp_path / "mr"), True)


def test_missing_annotation_file_is_named(tmp_path):
    with pytest.raises(DatasetError, match="instances_train2017.json"):
        data_to_mindrecord(data_cfg(tmp_path, tmp_path / "mr"), True)


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
            items.append(f"{x},{y},{x + w},{y + h},{ann['category_id']}")
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
    records = {int(r["image_id"]): r for r in raw_records(files)}
    for line_no, labels in expected.items():
        rows, _ = decode_instances(records[line_no]["num_instances"], records[line_no]["annotation"],
                                   records[line_no]["masks"])
        assert rows[:, 4].tolist() == labels                        # cls indexes data.classes (ModelZoo)
    for sample in samples_of(batches_of(create_maskrcnn_dataset(cfg, files, True, 2))):
        for box, mask in zip(sample["box"][sample["valid_num"]], sample["mask"][sample["valid_num"]]):
            filled = np.zeros_like(mask)
            x1, y1, x2, y2 = box
            filled[int(np.ceil(y1 - 0.5)):int(np.ceil(y2 - 0.5)), int(np.ceil(x1 - 0.5)):int(np.ceil(x2 - 0.5))] = 1
            assert (filled != mask).sum() <= 2 * (mask.shape[0] + mask.shape[1]) * 0.1 + 4
            assert (mask & filled).sum() / max((mask | filled).sum(), 1) > 0.8
    assert load_manifest(cfg, False) is None and len(raw_records(data_to_mindrecord(cfg, False))) == len(expected) + 1


def _txt_cfg(tmp_path, lines):
    """A TXT set of two real 60x80 images (train2017/a.jpg, b.jpg) and the given lines."""
    (tmp_path / "train2017").mkdir(exist_ok=True)
    for name in ("a.jpg", "b.jpg"):
        cv2.imwrite(str(tmp_path / "train2017" / name), np.full((60, 80, 3), 120, np.uint8))
    anno_path = tmp_path / "bad.txt"
    anno_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    cfg = load_config("tiny", {"data.dataset": "other", "data.image_dir": str(tmp_path),
                               "data.anno_path": str(anno_path), "data.mindrecord_dir": str(tmp_path / "mr")})
    return cfg, anno_path


@pytest.mark.parametrize("bad_line, message", [
    ("train2017/a.jpg 1,2,3,4", "x1,y1,x2,y2,cls"),
    ("train2017/a.jpg 1,2,3,four,1", "x1,y1,x2,y2,cls"),
    ("train2017/a.jpg 1,2,30,40,0", "class 0 is the background"),
    ("train2017/a.jpg 1,2,30,40,5", "class 5 is past data.classes"),
    ("train2017/a.jpg 30,2,10,40,1", "x2 <= x1"),
    ("train2017/a.jpg 1,40,30,40,1", "y2 <= y1"),
    ("train2017/missing.jpg 1,2,30,40,1", "image file .*missing.jpg does not exist"),
])
def test_bad_txt_line_stops_naming_file_and_line(tmp_path, bad_line, message):
    cfg, anno_path = _txt_cfg(tmp_path, ["train2017/a.jpg 1,2,30,40,1", "", bad_line])
    with pytest.raises(DatasetError, match=f"^{anno_path}:3: .*{message}"):
        data_to_mindrecord(cfg, True)
    assert not os.path.exists(tmp_path / "mr")


def test_every_bad_txt_line_is_counted_in_the_error(tmp_path):
    cfg, anno_path = _txt_cfg(tmp_path, ["train2017/a.jpg 1,2,30,40,0", "train2017/b.jpg 1,2,30,40,1",
                                         "train2017/c.jpg", "train2017/b.jpg 9,9,1,1,2"])
    with pytest.raises(DatasetError, match=f"^{anno_path}:1: .*and 2 more bad lines"):
        data_to_mindrecord(cfg, True)


def test_txt_skip_messages_name_file_and_line(tmp_path, caplog):
    cfg, anno_path = _txt_cfg(tmp_path, ["train2017/a.jpg 1,2,30,40,1", "train2017/b.jpg 200,2,230,40,2"])
    with caplog.at_level(logging.WARNING, logger="src.data"):
        data_to_mindrecord(cfg, True)
    assert load_manifest(cfg, True)["skipped"] == {SKIP_EMPTY_BOX: 1, SKIP_NO_ANNOTATION: 1}
    assert f"{anno_path}:2 " in caplog.text and f"{anno_path}:1" not in caplog.text
