"""Offline (Ascend 310) inference contract: preprocess.py -> runner files -> postprocess.py, on CPU.

The C++ runner cannot run here (no Ascend); its file handling (ascend310_infer/src/utils.cc) is compiled
and checked against the Python side of the contract, and the runner itself is stood in for by
src/infer_files.py (a fake ground-truth detector here; the exported MINDIR in test_export.py).
"""
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from inference_helpers import ROOT, GroundTruthDetector, run_python, val_paths
import postprocess as postprocess_script
import preprocess as preprocess_script
from postprocess import postprocess
from preprocess import preprocess
from src.coco_eval import load_coco
from src.config import load_config
from src.infer_files import (OUTPUT_NAMES, keep_valid_rows, list_image_ids, output_path, read_inputs,
                             read_outputs, run_mindir, write_inputs, write_outputs)

pytest_plugins = ["inference_fixtures"]


@pytest.fixture(scope="module")
def preprocessed(tiny_mindrecord, tmp_path_factory):
    cfg = tiny_mindrecord.cfg
    out = str(tmp_path_factory.mktemp("preprocess_result"))
    data_path, ann_file = val_paths(cfg)
    assert preprocess(cfg, data_path, ann_file, out) == 4
    return out


def _random_outputs(rng, cfg, valid):
    k, size = len(valid), cfg.rcnn.mask_shape
    return [rng.random((1, k, 4)).astype(np.float32) * 50, rng.random((1, k)).astype(np.float32),
            rng.integers(1, cfg.num_classes, (1, k)).astype(np.int32), np.asarray(valid, bool)[None],
            rng.random((1, k, size, size)).astype(np.float32)]


def test_preprocess_matches_the_eval_pipeline(tiny_mindrecord, preprocessed):
    from src.dataset import create_maskrcnn_dataset

    cfg = tiny_mindrecord.cfg
    dataset = create_maskrcnn_dataset(cfg, tiny_mindrecord.val_files, is_training=False, batch_size=1)
    seen = []
    for batch in dataset.create_dict_iterator(output_numpy=True, num_epochs=1):
        image_id = int(batch["image_id"][0])
        image, image_shape = read_inputs(preprocessed, image_id, cfg)
        np.testing.assert_array_equal(image, batch["image"])
        np.testing.assert_array_equal(image_shape, batch["image_shape"])
        seen.append(image_id)
    assert list_image_ids(preprocessed) == sorted(seen)


def test_outputs_round_trip_only_kept_rows(tmp_path):
    cfg = load_config("tiny")
    rng = np.random.default_rng(0)
    valid = np.zeros(cfg.test.test_max_per_img, bool)
    valid[[0, 3, 4]] = True
    outputs = _random_outputs(rng, cfg, valid)
    write_outputs(str(tmp_path), 7, outputs)
    back = read_outputs(str(tmp_path), 7, cfg)
    for name, original, kept in zip(OUTPUT_NAMES, outputs, back):
        np.testing.assert_array_equal(kept, original[0][valid], err_msg=name)
    assert os.path.getsize(output_path(str(tmp_path), 7, 4)) == 3 * cfg.rcnn.mask_shape ** 2 * 4

    write_outputs(str(tmp_path), 8, _random_outputs(rng, cfg, np.zeros_like(valid)))
    assert [len(a) for a in read_outputs(str(tmp_path), 8, cfg)] == [0] * 5


def test_read_outputs_errors_name_the_file(tmp_path):
    cfg = load_config("tiny")
    with pytest.raises(FileNotFoundError, match=r"3_0.bin' does not exist"):
        read_outputs(str(tmp_path), 3, cfg)
    valid = np.ones(cfg.test.test_max_per_img, bool)
    write_outputs(str(tmp_path), 3, _random_outputs(np.random.default_rng(1), cfg, valid))
    with open(output_path(str(tmp_path), 3, 4), "ab") as handle:
        handle.write(b"\0" * 8)
    with pytest.raises(ValueError, match=r"3_4.bin' holds .* not a multiple .* 'masks'"):
        read_outputs(str(tmp_path), 3, cfg)
    write_outputs(str(tmp_path), 3, _random_outputs(np.random.default_rng(1), cfg, valid))
    os.replace(output_path(str(tmp_path), 3, 1), output_path(str(tmp_path), 3, 9))
    np.zeros(2, np.float32).tofile(output_path(str(tmp_path), 3, 1))
    with pytest.raises(ValueError, match="disagree on the number of detections"):
        read_outputs(str(tmp_path), 3, cfg)


def test_inputs_of_another_size_are_rejected(tmp_path):
    cfg = load_config("tiny")
    write_inputs(str(tmp_path), 5, np.zeros((1, 3, 32, 32), np.float32), np.zeros((1, 4), np.float32))
    with pytest.raises(ValueError, match=r"image/5.bin' holds 3072 float32 values, expected shape \(1, 3, 128, 192\)"):
        read_inputs(str(tmp_path), 5, cfg)
    os.makedirs(tmp_path / "image_shape", exist_ok=True)
    (tmp_path / "image_shape" / "abc.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="abc.bin': file names must be <image_id>.bin"):
        list_image_ids(str(tmp_path))


def test_postprocess_of_perfect_outputs_scores_one(tiny_mindrecord, preprocessed, tmp_path):
    cfg = tiny_mindrecord.cfg
    _, ann_file = val_paths(cfg)
    coco_gt = load_coco(ann_file)
    detector = GroundTruthDetector(coco_gt, cfg.data.classes, cfg.test.test_max_per_img, cfg.rcnn.mask_shape)
    result_dir = str(tmp_path / "result_files")
    for image_id in list_image_ids(preprocessed):
        image, image_shape = read_inputs(preprocessed, image_id, cfg)
        outputs = detector({"image": image, "image_shape": image_shape, "image_id": np.array([image_id])})
        write_outputs(result_dir, image_id, outputs)
    metrics = postprocess(cfg, result_dir, preprocessed, ann_file, str(tmp_path))
    assert metrics["bbox"]["AP"] == pytest.approx(1.0) and metrics["segm"]["AP"] > 0.95
    assert os.path.isfile(tmp_path / "eval_metrics.json") and os.path.isfile(tmp_path / "detections.json")

    os.remove(output_path(result_dir, list_image_ids(preprocessed)[0], 2))
    with pytest.raises(FileNotFoundError, match="did inference finish"):
        postprocess(cfg, result_dir, preprocessed, ann_file, str(tmp_path))


@pytest.mark.slow
def test_exported_model_offline_gives_the_eval_metrics(narrow_model, narrow_mindir, narrow_eval, preprocessed,
                                                     tmp_path):
    """preprocess.py -> MINDIR runner (CPU stand-in, runner file format) -> postprocess.py == eval.py."""
    cfg = narrow_model.cfg
    _, ann_file = val_paths(cfg)
    result_dir = str(tmp_path / "result_files")
    environment = dict(os.environ)
    count, _ = run_mindir(narrow_mindir.path, preprocessed, result_dir, cfg)
    assert count == len(load_coco(ann_file).getImgIds())
    assert dict(os.environ) == environment      # e.g. an ISA cap would reach the processes started after it
    run = run_python(os.path.join(ROOT, "postprocess.py"), "--result_dir", result_dir, "--input_dir", preprocessed,
                     "--ann_file", ann_file, "--output_dir", str(tmp_path), "--config", "tiny")
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.count("Evaluate annotation type") == 2 and run.stdout.count("Average Precision") == 12
    offline = json.load(open(tmp_path / "eval_metrics.json"))
    for iou_type in ("bbox", "segm"):
        for name, value in narrow_eval.metrics[iou_type].items():
            assert offline[iou_type][name] == pytest.approx(value, abs=1e-6), (iou_type, name)
    assert offline["detections"] == narrow_eval.metrics["detections"] > 0
    # the same detections, not just the same numbers (a random model scores AP ~0 either way)
    key = lambda r: (r["image_id"], -r["score"], r["bbox"])
    from_eval = sorted(json.load(open(os.path.join(narrow_eval.output_dir, "detections.json"))), key=key)
    from_offline = sorted(json.load(open(tmp_path / "detections.json")), key=key)
    for a, b in zip(from_eval, from_offline):
        assert (a["image_id"], a["category_id"]) == (b["image_id"], b["category_id"])
        np.testing.assert_allclose(a["bbox"] + [a["score"]], b["bbox"] + [b["score"]], rtol=1e-4, atol=1e-3)
    same_masks = [a["segmentation"] == b["segmentation"] for a, b in zip(from_eval, from_offline)]
    assert np.mean(same_masks) > 0.95             # a pixel right at the 0.5 threshold may flip


CPP_DRIVER = r"""
#include <iostream>
#include "inc/utils.h"
// Stand-in for main.cc's WriteKeptRows without MindSpore: full outputs (K rows) are read from files.
int main(int argc, char **argv) {
  try {
    if (argc == 2) { maskrcnn::ParseOptions(argc - 1, argv + 1); return 0; }
    maskrcnn::EnsureDirectory(argv[3]);
    for (const std::string &id : maskrcnn::ListImageIds(argv[1])) {
      std::vector<std::vector<char>> outs;
      for (size_t i = 0; i < maskrcnn::kNumOutputs; ++i) outs.push_back(maskrcnn::ReadFile(maskrcnn::OutputPath(argv[2], id, i)));
      const std::vector<char> &valid = outs[maskrcnn::kValidOutput];
      for (size_t i = 0; i < outs.size(); ++i) {
        maskrcnn::WriteFileAtomic(maskrcnn::OutputPath(argv[3], id, i),
            maskrcnn::KeepRows(outs[i].data(), valid.size(), outs[i].size() / valid.size(),
                               reinterpret_cast<const uint8_t *>(valid.data())));
      }
      std::cout << id << "\n";
    }
  } catch (const std::exception &err) { std::cerr << "ERROR: " << err.what() << "\n"; return 1; }
  return 0;
}
"""


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
def test_cpp_runner_file_handling_matches_python_contract(tmp_path):
    cfg = load_config("tiny")
    driver = tmp_path / "driver.cc"
    driver.write_text(CPP_DRIVER)
    binary = tmp_path / "driver"
    subprocess.run(["g++", "-std=c++17", "-Wall", "-Wextra", "-Werror", "-I", os.path.join(ROOT, "ascend310_infer"),
                    str(driver), os.path.join(ROOT, "ascend310_infer", "src", "utils.cc"), "-o", str(binary)],
                   check=True)
    rng = np.random.default_rng(2)
    inputs, full, by_cpp, by_python = (str(tmp_path / d) for d in ("in", "full", "cpp", "python"))
    k = cfg.test.test_max_per_img
    expected = {}
    for image_id, valid in ((10, rng.random(k) < 0.3), (2, np.zeros(k, bool)), (3, np.ones(k, bool))):
        write_inputs(inputs, image_id, np.zeros((1, 3, 4, 4), np.float32), np.zeros((1, 4), np.float32))
        outputs = _random_outputs(rng, cfg, valid)
        os.makedirs(full, exist_ok=True)
        for index, out in enumerate(outputs):
            out.tofile(output_path(full, image_id, index))
        write_outputs(by_python, image_id, outputs)
        expected[image_id] = keep_valid_rows(outputs)
    run = subprocess.run([str(binary), inputs, full, by_cpp], capture_output=True, text=True, check=True)
    assert run.stdout.split() == ["2", "3", "10"]                    # numeric order, as list_image_ids
    for image_id, kept in expected.items():
        for index in range(len(OUTPUT_NAMES)):
            with open(output_path(by_cpp, image_id, index), "rb") as a, \
                    open(output_path(by_python, image_id, index), "rb") as b:
                assert a.read() == b.read()
        for got, want in zip(read_outputs(by_cpp, image_id, cfg), kept):
            np.testing.assert_array_equal(got, want)
    assert not [f for f in os.listdir(by_cpp) if f.endswith(".tmp")]

    bad = subprocess.run([str(binary), "--model_path=/nonexistent.mindir"], capture_output=True, text=True)
    assert bad.returncode == 1 and "--input_dir are required" in bad.stderr


def test_aipp_cfg_matches_the_recipe_config():
    cfg = load_config()
    with open(os.path.join(ROOT, "src", "aipp.cfg"), encoding="utf-8") as handle:
        values = dict(re.findall(r"^\s*(\w+)\s*:\s*(\S+)\s*$", handle.read(), flags=re.M))
    assert int(values["src_image_size_w"]) == cfg.data.img_width
    assert int(values["src_image_size_h"]) == cfg.data.img_height
    for channel in range(3):
        assert float(values[f"min_chn_{channel}"]) == pytest.approx(cfg.data.img_mean[channel])
        assert float(values[f"var_reci_chn_{channel}"]) == pytest.approx(1.0 / cfg.data.img_std[channel])


@pytest.mark.parametrize("script,args,message", [
    ("run_infer_310.sh", [], "Usage"),
    ("run_infer_310.sh", ["model.onnx", ".", "ann.json"], "is not a file"),
    ("docker_start.sh", ["image"], "Usage"),
    ("docker_start.sh", ["image", "/nonexistent_data", "."], "is not a directory"),
])
def test_deployment_scripts_check_arguments(script, args, message, tmp_path):
    run = subprocess.run(["bash", os.path.join(ROOT, "scripts", script), *args], capture_output=True, text=True,
                         cwd=tmp_path)
    assert run.returncode != 0 and message in run.stderr


def test_run_infer_310_rejects_unknown_model_formats(tmp_path):
    model = tmp_path / "model.onnx"
    model.write_bytes(b"x")
    (tmp_path / "ann.json").write_text("{}")
    run = subprocess.run(["bash", os.path.join(ROOT, "scripts", "run_infer_310.sh"), str(model), str(tmp_path),
                          str(tmp_path / "ann.json")], capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 1 and "must be a .mindir or .air" in run.stderr


@pytest.mark.skipif(shutil.which("cmake") is None, reason="needs cmake")
def test_run_infer_310_preprocesses_then_stops_clearly_without_the_inference_api(tiny_mindrecord, tmp_path):
    data_path, ann_file = val_paths(tiny_mindrecord.cfg)
    model = tmp_path / "maskrcnn.mindir"
    model.write_bytes(b"not built here")
    (tmp_path / "no_mindspore_lite").mkdir()
    env = dict(os.environ, MINDSPORE_PATH=str(tmp_path / "no_mindspore_lite"), BUILD_DIR=str(tmp_path / "build"),
               PYTHON=sys.executable)
    run = subprocess.run(["bash", os.path.join(ROOT, "scripts", "run_infer_310.sh"), str(model), data_path,
                          ann_file, "0", "--config", "tiny"], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert run.returncode == 1 and "[2/4] build the runner" in run.stdout
    assert "MindSpore inference API not found" in run.stderr
    assert list_image_ids(str(tmp_path / "preprocess_result")) == sorted(load_coco(ann_file).getImgIds())


@pytest.mark.parametrize("script, inputs", [(preprocess_script, ["--data_path", "images", "--ann_file", "a.json"]),
                                            (postprocess_script, ["--result_dir", "r", "--input_dir", "i",
                                                                  "--ann_file", "a.json"])])
def test_an_output_dir_that_is_a_file_is_refused_before_any_work(tmp_path, script, inputs):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file")
    with pytest.raises(ValueError, match=f"--output_dir '{blocker}' is a file, not a directory"):
        script.main([*inputs, "--config", "tiny", "--output_dir", str(blocker)])
