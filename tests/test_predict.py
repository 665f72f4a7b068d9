"""predict.py: input listing, drawing, and the narrow tiny model end to end."""
import json
import os
import shutil

import cv2
import numpy as np
import pytest

from inference_helpers import ROOT, config_cli_args, run_python, val_paths
from predict import PREDICTIONS_FILE, class_colour, detections_json, draw_detections, list_images, predict
from src.detections import Detections

pytest_plugins = ["inference_fixtures"]
CLASSES = ["background", "rectangle", "ellipse", "triangle", "star"]


def test_list_images_file_directory_and_errors(tmp_path):
    (tmp_path / "b.jpg").write_bytes(b"x")
    (tmp_path / "a.PNG").write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("x")
    assert list_images(str(tmp_path)) == [str(tmp_path / "a.PNG"), str(tmp_path / "b.jpg")]
    assert list_images(str(tmp_path / "notes.txt")) == [str(tmp_path / "notes.txt")]
    with pytest.raises(FileNotFoundError, match="missing.jpg' is neither an image file nor a directory"):
        list_images(str(tmp_path / "missing.jpg"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="empty' holds no images"):
        list_images(str(empty))


def test_draw_detections_tints_masks_and_draws_boxes():
    rgb = np.full((120, 160, 3), 200, np.uint8)
    mask = np.zeros((1, 120, 160), np.uint8)
    mask[0, 50:70, 60:90] = 1
    detections = Detections(boxes=np.array([[55.0, 45.0, 95.0, 75.0]], np.float32),
                            scores=np.array([0.87], np.float32), labels=np.array([3], np.int32), masks=mask)
    picture = draw_detections(rgb, detections, CLASSES)
    colour = np.array(class_colour(3), float)
    assert picture.shape == (120, 160, 3)
    inside = picture[60, 75].astype(float)                                 # masked, away from box and text
    assert np.linalg.norm(inside - colour) < np.linalg.norm(np.array([200.0] * 3) - colour)
    np.testing.assert_array_equal(picture[70, 55], colour)                  # left box edge
    np.testing.assert_array_equal(picture[110, 10], [200, 200, 200])        # untouched background
    assert (picture[:45, 55:120] != 200).any()                              # label text above the box
    assert detections_json(detections, CLASSES) == [
        {"class": "triangle", "label": 3, "score": pytest.approx(0.87), "bbox": [55.0, 45.0, 95.0, 75.0],
         "mask_area": 600}]


def test_class_colours_differ():
    assert len({class_colour(label) for label in range(1, 81)}) == 80


@pytest.fixture(scope="module")
def image_dir(narrow_model, tmp_path_factory):
    data_path, _ = val_paths(narrow_model.cfg)
    folder = tmp_path_factory.mktemp("predict_in")
    for name in sorted(os.listdir(data_path))[:2]:
        shutil.copy(os.path.join(data_path, name), folder / name)
    (folder / "readme.txt").write_text("not an image")
    return str(folder)


@pytest.mark.slow
def test_predict_writes_pictures_and_detections(narrow_model, image_dir, tmp_path):
    cfg = narrow_model.cfg
    records = predict(cfg, narrow_model.checkpoint, image_dir, str(tmp_path), score_thr=0.0)
    assert [os.path.basename(r["image"]) for r in records] == sorted(
        f for f in os.listdir(image_dir) if f.endswith(".jpg"))
    assert json.load(open(tmp_path / PREDICTIONS_FILE)) == json.loads(json.dumps(records))
    total = 0
    for record in records:
        source = cv2.imread(record["image"])
        picture = cv2.imread(record["picture"])
        assert picture.shape == source.shape == (record["height"], record["width"], 3)
        assert len(record["detections"]) <= cfg.test.test_max_per_img
        for det in record["detections"]:
            x1, y1, x2, y2 = det["bbox"]
            assert 0 <= x1 <= x2 <= record["width"] and 0 <= y1 <= y2 <= record["height"]
            assert det["class"] == cfg.data.classes[det["label"]] and det["label"] >= 1
        total += len(record["detections"])
        if record["detections"]:
            assert (picture != source).any()
    assert total > 0


def test_predict_rejects_unreadable_images(narrow_model, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 this is not a jpeg")
    with pytest.raises(ValueError, match="broken.jpg' cannot be decoded"):
        predict(narrow_model.cfg, narrow_model.checkpoint, str(broken), str(tmp_path / "out"), score_thr=0.5)
    with pytest.raises(ValueError, match="score_thr must be in"):
        predict(narrow_model.cfg, narrow_model.checkpoint, str(broken), str(tmp_path / "out"), score_thr=2.0)


def test_predict_cli_reports_an_empty_directory(narrow_model, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    run = run_python(os.path.join(ROOT, "predict.py"), str(empty), "--checkpoint_path", narrow_model.checkpoint,
                     "--out", str(tmp_path / "out"), *config_cli_args(narrow_model.cfg))
    assert run.returncode == 1 and "empty' holds no images" in run.stderr
    assert not os.path.exists(tmp_path / "out")


def test_predict_skips_undecodable_files_and_finishes_the_rest(narrow_model, image_dir, tmp_path):
    folder = tmp_path / "mixed"
    good = sorted(name for name in os.listdir(image_dir) if name.endswith(".jpg"))[0]
    folder.mkdir()
    shutil.copy(os.path.join(image_dir, good), folder / "b_good.jpg")
    (folder / "a_empty.jpg").write_bytes(b"")
    (folder / "c_broken.png").write_bytes(b"\x89PNG not really")
    out = tmp_path / "out"
    run = run_python(os.path.join(ROOT, "predict.py"), str(folder), "--checkpoint_path", narrow_model.checkpoint,
                     "--out", str(out), *config_cli_args(narrow_model.cfg))
    assert run.returncode == 0, run.stderr[-2000:]
    assert "Traceback" not in run.stderr
    assert "a_empty.jpg' cannot be decoded (the file is empty)" in run.stderr
    assert "c_broken.png' cannot be decoded" in run.stderr
    records = json.load(open(out / PREDICTIONS_FILE))
    assert [os.path.basename(r["image"]) for r in records] == ["b_good.jpg"]
    assert os.path.isfile(out / "b_good.jpg.png")


def test_predict_fails_only_when_no_image_can_be_read(narrow_model, tmp_path):
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(b"")
    (folder / "b.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    run = run_python(os.path.join(ROOT, "predict.py"), str(folder), "--checkpoint_path", narrow_model.checkpoint,
                     "--out", str(tmp_path / "out"), *config_cli_args(narrow_model.cfg))
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines()[-1] == (f"ERROR: no image could be read: image '{folder / 'a.jpg'}' cannot "
                                                   f"be decoded (the file is empty) (and 1 more)")
    assert not os.path.exists(tmp_path / "out" / PREDICTIONS_FILE)


def test_predict_out_that_is_a_file_is_one_line_before_any_work(narrow_model, image_dir, tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file")
    run = run_python(os.path.join(ROOT, "predict.py"), image_dir, "--checkpoint_path", narrow_model.checkpoint,
                     "--out", str(blocker), *config_cli_args(narrow_model.cfg))
    assert run.returncode == 1
    assert run.stderr.strip().splitlines() == [f"ERROR: --out '{blocker}' is a file, not a directory; "
                                               f"choose a directory path"]
