"""export.py (MINDIR and ONNX round trips, AIR guard) and mindspore_hub_conf.py, on the narrow tiny model."""
import os

import numpy as np
import pytest

from export import _unsupported_op, export_inputs, export_model
from inference_helpers import ROOT, run_python, val_paths
from mindspore_hub_conf import create_network
from src.config import load_config

pytest_plugins = ["inference_fixtures"]


@pytest.fixture(scope="module")
def sample_input(narrow_model):
    """A real synthetic val image through the eval transform: (image (1,3,H,W), image_shape (1,4))."""
    from src.dataset import EvalTransform
    from src.image_input import read_image_input

    data_path, _ = val_paths(narrow_model.cfg)
    name = sorted(os.listdir(data_path))[0]
    _, image, image_shape = read_image_input(os.path.join(data_path, name), EvalTransform(narrow_model.cfg))
    return image, image_shape


@pytest.fixture(scope="module")
def cell_outputs(narrow_model, sample_input):
    import mindspore as ms
    from src.inference import build_inference_net

    net = build_inference_net(narrow_model.cfg, narrow_model.checkpoint)
    return [out.asnumpy() for out in net(*(ms.Tensor(a) for a in sample_input))]


def _assert_same_detections(got, want, padding_too=True):
    """Same valid flags, and the same boxes, scores, labels and masks: in every row, or (padding_too=False) in the
    valid rows only. The rows after the valid ones are padding taken from discarded candidates, all scored alike,
    whose order among equal scores onnxruntime's TopK (lowest index first) and MindSpore's need not share."""
    np.testing.assert_array_equal(got[3], want[3])
    rows = np.ones_like(want[3]) if padding_too else want[3]
    boxes, scores, labels, _, masks = (output[rows] for output in got)
    np.testing.assert_array_equal(labels, want[2][rows])
    np.testing.assert_allclose(boxes, want[0][rows], rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(scores, want[1][rows], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(masks, want[4][rows], rtol=1e-4, atol=1e-4)


def test_export_inputs_have_the_configured_batch_one_shape(narrow_model):
    image, image_shape = export_inputs(narrow_model.cfg)
    cfg = narrow_model.cfg
    assert image.shape == (1, 3, cfg.data.img_height, cfg.data.img_width) and image.dtype == np.float32
    np.testing.assert_array_equal(image_shape, [[cfg.data.img_height, cfg.data.img_width, 1.0, 1.0]])


@pytest.mark.slow
def test_mindir_round_trip_matches_the_cell(narrow_model, narrow_mindir, sample_input, cell_outputs):
    import mindspore as ms
    from mindspore import nn

    assert narrow_mindir.path.endswith(".mindir") and os.path.getsize(narrow_mindir.path) > 0
    assert not [f for f in os.listdir(os.path.dirname(narrow_mindir.path)) if ".partial" in f]
    graph = nn.GraphCell(ms.load(narrow_mindir.path))
    outputs = [out.asnumpy() for out in graph(*(ms.Tensor(a) for a in sample_input))]
    k, size = narrow_model.cfg.test.test_max_per_img, narrow_model.cfg.rcnn.mask_shape
    assert [o.shape for o in outputs] == [(1, k, 4), (1, k), (1, k), (1, k), (1, k, size, size)]
    assert [o.dtype for o in outputs] == [np.float32, np.float32, np.int32, np.bool_, np.float32]
    assert outputs[3].any()
    _assert_same_detections(outputs, cell_outputs)


@pytest.mark.slow
def test_onnx_graph_runs_in_onnxruntime_with_the_cells_detections(narrow_model, sample_input, cell_outputs, tmp_path):
    """The ONNX export (built from operators the exporter converts) must succeed, load in onnxruntime and give the
    inference graph's detections at the MINDIR round trip's tolerance."""
    import onnxruntime

    path = export_model(narrow_model.cfg, narrow_model.checkpoint, "ONNX", str(tmp_path / "maskrcnn"), "CPU")
    assert os.listdir(tmp_path) == ["maskrcnn.onnx"]
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    assert [inp.name for inp in session.get_inputs()] == ["image", "image_shape"]
    outputs = session.run(None, {inp.name: array for inp, array in zip(session.get_inputs(), sample_input)})
    k, size = narrow_model.cfg.test.test_max_per_img, narrow_model.cfg.rcnn.mask_shape
    assert [o.shape for o in outputs] == [(1, k, 4), (1, k), (1, k), (1, k), (1, k, size, size)]
    assert [o.dtype for o in outputs] == [np.float32, np.float32, np.int32, np.bool_, np.float32]
    assert outputs[3].any()
    _assert_same_detections(outputs, cell_outputs, padding_too=False)


def test_unsupported_op_is_found_in_exporter_messages():
    mindspore_2_10 = ("Can not find key MaxPool3DWithArgmax in convert map. Exporting MaxPool3DWithArgmax "
                      "operator is not yet supported.")
    assert _unsupported_op(mindspore_2_10) == "MaxPool3DWithArgmax"
    assert _unsupported_op("Can not find key NMSWithMask in convert map.") == "NMSWithMask"
    assert _unsupported_op("Op [ROIAlign] is not supported") == "ROIAlign"
    assert _unsupported_op("shape mismatch in node 3") == ""


def test_air_off_ascend_fails_before_any_work(narrow_model, tmp_path):
    with pytest.raises(ValueError, match="AIR export needs --device_target Ascend.*got 'CPU'"):
        export_model(narrow_model.cfg, str(tmp_path / "does_not_exist.ckpt"), "AIR", str(tmp_path / "m"), "CPU")
    with pytest.raises(ValueError, match="--file_format must be one of MINDIR, AIR, ONNX"):
        export_model(narrow_model.cfg, narrow_model.checkpoint, "TFLITE", str(tmp_path / "m"), "CPU")
    assert not os.listdir(tmp_path)


def test_export_cli_reports_bad_input(tmp_path):
    missing = run_python(os.path.join(ROOT, "export.py"), "--ckpt_file", str(tmp_path / "none.ckpt"),
                         "--file_format", "MINDIR", "--device_target", "CPU", "--config", "tiny")
    assert missing.returncode == 1 and "none.ckpt' does not exist" in missing.stderr
    air = run_python(os.path.join(ROOT, "export.py"), "--ckpt_file", str(tmp_path / "none.ckpt"),
                     "--file_format", "AIR", "--device_target", "CPU", "--config", "tiny")
    assert air.returncode == 1 and "AIR export needs --device_target Ascend" in air.stderr


def test_hub_creates_the_model_in_either_mode(narrow_model):
    import mindspore as ms

    inference = create_network("maskrcnn", config=narrow_model.cfg)
    training = create_network("maskrcnn", config=narrow_model.cfg, is_training=True)
    assert not inference.training and training.training
    saved = ms.load_checkpoint(narrow_model.checkpoint)
    assert {p.name for p in inference.get_parameters()} == set(saved)
    assert [tuple(p.shape) for p in training.get_parameters()] == [tuple(saved[p.name].shape)
                                                                   for p in training.get_parameters()]


def test_hub_selects_presets_and_rejects_bad_requests():
    tiny = create_network("maskrcnn", config="tiny")
    assert tiny.cfg.data.img_width == 192 and tiny.cfg.num_classes == 5
    with pytest.raises(ValueError, match="unknown network 'fasterrcnn'"):
        create_network("fasterrcnn")
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['pretrained'\]"):
        create_network("maskrcnn", config="tiny", pretrained=True)


def test_an_export_path_under_a_file_is_refused_before_any_work(tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file")
    with pytest.raises(ValueError, match=f"the directory of --file_name '{blocker / 'out'}' lies under the file"):
        export_model(load_config("tiny"), str(tmp_path / "missing.ckpt"), "MINDIR", str(blocker / "out" / "m"), "CPU")
