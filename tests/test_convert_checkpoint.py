"""Checkpoint conversion: ResNet50 (torchvision .npz, ModelZoo .ckpt) into the real backbone, and a whole
torchvision Mask R-CNN into the real model, checked against torchvision's own outputs on the same weights
(tests/fixtures/torchvision_reference.npz, written by bench/torchvision_reference.py)."""
import contextlib
import importlib.util
import io
import json
import math
import os

import numpy as np
import pytest

from mindspore import Tensor, nn

from bench.torchvision_reference import COCO_UNUSED_SLOTS, synthetic_state
from src.checkpoint import load_model_weights, load_pretrained, read_checkpoint, write_checkpoint_atomic
from src.config import load_config
from src.convert_checkpoint import (BACKBONE_PREFIX, COCO_CATEGORY_IDS, ConversionError, backbone_shapes,
                                    convert_checkpoint, grouped_names, main, read_source)
from src.maskrcnn.mask_rcnn_r50 import MaskRcnnResnet50
from src.maskrcnn.resnet50 import ResNet50

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
TORCHVISION_SHAPES = os.path.join(FIXTURES, "torchvision_maskrcnn_shapes.json")
TORCHVISION_REFERENCE = os.path.join(FIXTURES, "torchvision_reference.npz")

TORCH_LEAF = {"gamma": "weight", "beta": "bias", "moving_mean": "running_mean", "moving_variance": "running_var"}
CLASSIFIER_OUT = 1000


@pytest.fixture(scope="module")
def cfg():
    return load_config("tiny")


@pytest.fixture(scope="module")
def shapes(cfg):
    return backbone_shapes(cfg)


def _source_name(name, layout):
    """backbone.<our name> -> the name the source layout uses."""
    module, leaf = name[len(BACKBONE_PREFIX):].rsplit(".", 1)
    if layout == "torchvision":
        return f"{module}.{TORCH_LEAF.get(leaf, leaf)}"
    return f"{module.replace('downsample', 'down_sample_layer')}.{leaf}"


def fake_source(shapes, layout, seed=0):
    """Random weights under the source layout's names, plus the classifier and counters a real file has."""
    rng = np.random.default_rng(seed)
    source = {_source_name(name, layout): rng.normal(size=shape).astype(np.float32) for name, shape in shapes.items()}
    classifier = "fc" if layout == "torchvision" else "end_point"
    source[f"{classifier}.weight"] = rng.normal(size=(CLASSIFIER_OUT, 2048)).astype(np.float32)
    source[f"{classifier}.bias"] = np.zeros(CLASSIFIER_OUT, np.float32)
    if layout == "torchvision":
        source["bn1.num_batches_tracked"] = np.array(100, np.int64)
    else:
        source["moments.conv1.weight"] = np.zeros(shapes["backbone.conv1.weight"], np.float32)
        source["learning_rate"] = np.array(0.1, np.float32)
    return source


class BackboneHolder(nn.Cell):
    """Gives the backbone the model's `backbone.` prefix."""

    def __init__(self, cfg):
        super().__init__()
        self.backbone = ResNet50(cfg)


def assert_loaded_exactly(out_path, source, layout, cfg):
    holder = BackboneHolder(cfg)
    report = load_pretrained(out_path, holder)
    assert not report.skipped and not report.left_at_init
    for param in holder.get_parameters():
        np.testing.assert_array_equal(param.asnumpy(), source[_source_name(param.name, layout)], err_msg=param.name)


def test_torchvision_npz_round_trip(tmp_path, cfg, shapes):
    source = fake_source(shapes, "torchvision")
    assert "layer1.0.downsample.1.running_var" in source and "bn1.weight" in source
    src = str(tmp_path / "resnet50.npz")
    np.savez(src, **source)
    out = str(tmp_path / "backbone.ckpt")
    report = convert_checkpoint(src, out, cfg)
    assert sorted(report.converted) == sorted(shapes)
    assert sorted(report.dropped) == ["bn1.num_batches_tracked", "fc.bias", "fc.weight"]
    assert_loaded_exactly(out, source, "torchvision", cfg)


def test_modelzoo_ckpt_round_trip_through_the_cli(tmp_path, cfg, shapes, capsys):
    source = fake_source(shapes, "modelzoo", seed=1)
    assert "layer2.0.down_sample_layer.0.weight" in source and "bn1.gamma" in source
    src = str(tmp_path / "resnet50_modelzoo.ckpt")
    write_checkpoint_atomic(src, [{"name": name, "data": Tensor(value)} for name, value in source.items()])
    out = str(tmp_path / "backbone.ckpt")
    assert main(["--src", src, "--out", out, "--config", "tiny"]) == 0
    assert f"{len(shapes)} backbone tensors" in capsys.readouterr().out
    assert all(name.startswith(BACKBONE_PREFIX) for name in read_checkpoint(out))
    assert_loaded_exactly(out, source, "modelzoo", cfg)


def test_missing_and_mismatched_tensors_are_named_and_nothing_is_written(tmp_path, cfg, shapes):
    source = fake_source(shapes, "torchvision")
    del source["layer3.5.conv2.weight"]
    source["layer4.2.bn3.running_mean"] = np.zeros(7, np.float32)
    source["layer9.0.conv1.weight"] = np.zeros((1,), np.float32)
    src = str(tmp_path / "broken.npz")
    np.savez(src, **source)
    out = tmp_path / "backbone.ckpt"
    with pytest.raises(ConversionError) as info:
        convert_checkpoint(src, str(out), cfg)
    message = str(info.value)
    assert "missing 1: backbone.layer3.5.conv2.weight" in message
    assert "backbone.layer4.2.bn3.moving_mean (7,) in source vs (2048,) in backbone" in message
    assert "unexpected 1: layer9.0.conv1.weight" in message
    assert not out.exists()


def test_unreadable_sources_get_clear_errors(tmp_path, cfg):
    with pytest.raises(ConversionError, match="does not exist"):
        read_source(str(tmp_path / "nothing.npz"))
    bad = tmp_path / "weights.bin"
    bad.write_bytes(b"123")
    with pytest.raises(ConversionError, match=r"unknown checkpoint type '\.bin'"):
        read_source(str(bad))
    pth = tmp_path / "resnet50.pth"
    pth.write_bytes(b"not really torch")
    if importlib.util.find_spec("torch") is None:
        with pytest.raises(ConversionError, match="needs PyTorch.*npz"):
            read_source(str(pth))


def test_cli_reports_errors_with_exit_code(tmp_path, capsys):
    assert main(["--src", str(tmp_path / "absent.ckpt"), "--out", str(tmp_path / "o.ckpt"), "--config", "tiny"]) == 1
    assert "absent.ckpt' does not exist" in capsys.readouterr().err



# ---------------------------------------------------------------- whole torchvision Mask R-CNN

def torchvision_shapes(num_slots=91):
    """{name: shape} of torchvision's maskrcnn_resnet50_fpn state dict (FrozenBatchNorm2d), heads resized to
    num_slots classes."""
    with open(TORCHVISION_SHAPES, encoding="utf-8") as handle:
        shapes = {name: tuple(shape) for name, shape in json.load(handle).items()}
    for name in ("cls_score", "mask_fcn_logits"):
        for leaf in ("weight", "bias"):
            key = next(k for k in shapes if k.endswith(f"{name}.{leaf}"))
            shapes[key] = (num_slots,) + shapes[key][1:]
    for leaf in ("weight", "bias"):
        key = f"roi_heads.box_predictor.bbox_pred.{leaf}"
        shapes[key] = (4 * num_slots,) + shapes[key][1:]
    return shapes


def legacy_names(state):
    """The module names of torchvision < 0.13, which its official COCO weights file uses."""
    renamed = {}
    for name, value in state.items():
        name = name.replace("rpn.head.conv.0.0.", "rpn.head.conv.")
        for block in ("inner_blocks", "layer_blocks"):
            for i in range(4):
                name = name.replace(f"fpn.{block}.{i}.0.", f"fpn.{block}.{i}.")
        for i in range(4):
            name = name.replace(f"mask_head.{i}.0.", f"mask_head.mask_fcn{i + 1}.")
        renamed[name] = value
    return renamed


# torchvision name -> ours, one per kind of module (written out here, independently of the converter's table)
SAMPLE_PAIRS = {
    "backbone.body.conv1.weight": "backbone.conv1.weight",
    "backbone.body.bn1.running_var": "backbone.bn1.moving_variance",
    "backbone.body.layer3.0.downsample.1.weight": "backbone.layer3.0.downsample.1.gamma",
    "backbone.body.layer4.2.bn3.bias": "backbone.layer4.2.bn3.beta",
    "backbone.body.layer2.1.bn2.running_mean": "backbone.layer2.1.bn2.moving_mean",
    "backbone.fpn.inner_blocks.3.0.weight": "neck.lateral_convs.3.weight",
    "backbone.fpn.layer_blocks.0.0.bias": "neck.fpn_convs.0.bias",
    "rpn.head.conv.0.0.weight": "rpn.rpn_conv.weight",
    "rpn.head.cls_logits.bias": "rpn.rpn_cls.bias",
    "rpn.head.bbox_pred.weight": "rpn.rpn_reg.weight",
    "roi_heads.box_head.fc6.weight": "rcnn_cls.fc6.weight",
    "roi_heads.box_head.fc7.bias": "rcnn_cls.fc7.bias",
    "roi_heads.mask_head.0.0.weight": "rcnn_mask.mask_fcn1.weight",
    "roi_heads.mask_head.3.0.bias": "rcnn_mask.mask_fcn4.bias",
    "roi_heads.mask_predictor.conv5_mask.weight": "rcnn_mask.conv5_mask.weight",
}


@pytest.fixture(scope="module")
def coco_cfg():
    """The recipe's architecture and COCO classes at the fixture's 256 x 384 input."""
    return load_config(overrides={"data.img_height": 256, "data.img_width": 384})


@pytest.fixture(scope="module")
def converted_coco(coco_cfg, tmp_path_factory):
    """torchvision's layout with seeded weights (91 COCO slots) saved as .npz and converted by the CLI."""
    source = synthetic_state(torchvision_shapes())
    source["backbone.body.layer1.0.bn1.num_batches_tracked"] = np.array(0, np.int64)
    directory = tmp_path_factory.mktemp("torchvision")
    src, out = str(directory / "maskrcnn_resnet50_fpn.npz"), str(directory / "maskrcnn_tv.ckpt")
    np.savez(src, **source)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["--src", src, "--out", out, "--data.img_height", "256", "--data.img_width", "384"]) == 0
    return source, out, printed.getvalue()


def test_torchvision_detector_converts_into_every_model_parameter(converted_coco, coco_cfg):
    source, out, printed = converted_coco
    net = MaskRcnnResnet50(coco_cfg)
    load_model_weights(out, net)                                  # strict: every parameter, every shape
    params = {p.name: p.asnumpy() for p in net.get_parameters()}
    for theirs, ours in SAMPLE_PAIRS.items():
        np.testing.assert_array_equal(params[ours], source[theirs], err_msg=ours)
    slots = np.array((0,) + COCO_CATEGORY_IDS)                     # our class k <- torchvision slot slots[k]
    np.testing.assert_array_equal(params["rcnn_cls.cls_score.weight"], source["roi_heads.box_predictor.cls_score.weight"][slots])
    np.testing.assert_array_equal(params["rcnn_mask.mask_fcn_logits.bias"],
                                  source["roi_heads.mask_predictor.mask_fcn_logits.bias"][slots])
    person, toothbrush = 1, 80                                     # category ids 1 and 90
    deltas = params["rcnn_cls.bbox_pred.weight"].reshape(81, 4, -1)
    theirs = source["roi_heads.box_predictor.bbox_pred.weight"].reshape(91, 4, -1)
    np.testing.assert_array_equal(deltas[toothbrush], theirs[90])
    np.testing.assert_array_equal(deltas[person], theirs[1])
    assert not set(COCO_UNUSED_SLOTS) & set(COCO_CATEGORY_IDS) and len(COCO_CATEGORY_IDS) == 80
    assert params["sample_seed"] == 0
    assert "307 Mask R-CNN tensors, class layers: 91 COCO slots mapped by category id" in printed


def test_legacy_names_and_per_class_heads_convert_alike(tmp_path):
    """torchvision < 0.13 names (its official COCO file) and a head trained on our own class list."""
    cfg = load_config("tiny")
    source = synthetic_state(torchvision_shapes(num_slots=cfg.num_classes), seed=3)
    current, legacy = str(tmp_path / "current.npz"), str(tmp_path / "legacy.npz")
    np.savez(current, **source)
    np.savez(legacy, **legacy_names(source))
    assert "rpn.head.conv.weight" in legacy_names(source) and "roi_heads.mask_head.mask_fcn4.bias" in legacy_names(source)
    report = convert_checkpoint(legacy, str(tmp_path / "legacy.ckpt"), cfg)
    assert report.class_mapping == f"{cfg.num_classes} slots, one per class"
    convert_checkpoint(current, str(tmp_path / "current.ckpt"), cfg)
    a, b = read_checkpoint(str(tmp_path / "legacy.ckpt")), read_checkpoint(str(tmp_path / "current.ckpt"))
    assert sorted(a) == sorted(b)
    for name in a:
        np.testing.assert_array_equal(a[name].asnumpy(), b[name].asnumpy(), err_msg=name)
    np.testing.assert_array_equal(a["rcnn_cls.bbox_pred.bias"].asnumpy(), source["roi_heads.box_predictor.bbox_pred.bias"])


def test_detector_problems_are_named_and_nothing_is_written(tmp_path):
    cfg = load_config("tiny")                                     # 5 classes: a 91-slot COCO head cannot map
    source = synthetic_state(torchvision_shapes())
    del source["roi_heads.mask_head.2.0.weight"]
    source["backbone.fpn.layer_blocks.1.0.bias"] = np.zeros(7, np.float32)
    source["roi_heads.keypoint_head.0.0.weight"] = np.zeros(1, np.float32)
    src, out = str(tmp_path / "broken.npz"), tmp_path / "maskrcnn.ckpt"
    np.savez(src, **source)
    with pytest.raises(ConversionError) as info:
        convert_checkpoint(src, str(out), cfg)
    message = str(info.value)
    assert message.startswith(f"'{src}' does not match the Mask R-CNN: missing 1: rcnn_mask.mask_fcn3.weight;")
    assert "neck.fpn_convs.1.bias (7,) in source vs (256,) in model" in message
    assert "rcnn_cls.cls_score.weight (91, 1024) in source vs (5, 1024) in model" in message
    assert "rcnn_cls.bbox_pred.bias (364,) in source vs (20,) in model" in message
    assert "unexpected 1: roi_heads.keypoint_head.0.0.weight" in message
    assert "91 slots in source, 5 classes in data.classes" in message
    assert not out.exists()


def test_every_problem_tensor_is_named_leaves_folded_per_module(tmp_path):
    """A Keypoint R-CNN's extra head and a Faster R-CNN's missing mask branch: more than a screenful of names,
    each one in the error, the leaves of one module written once."""
    cfg = load_config("tiny")
    source = synthetic_state(torchvision_shapes(num_slots=cfg.num_classes))
    for name in [n for n in source if n.startswith("roi_heads.mask_")]:
        del source[name]
    extra = {f"roi_heads.keypoint_head.{i}.0.{leaf}": np.zeros(1, np.float32) for i in range(8)
             for leaf in ("weight", "bias")}
    source.update(extra)
    src, out = str(tmp_path / "keypoint.npz"), tmp_path / "maskrcnn.ckpt"
    np.savez(src, **source)
    with pytest.raises(ConversionError) as info:
        convert_checkpoint(src, str(out), cfg)
    message = str(info.value)
    assert "missing 12: rcnn_mask.mask_fcn1.{weight,bias}, rcnn_mask.mask_fcn2.{weight,bias}" in message
    assert "rcnn_mask.conv5_mask.{weight,bias}, rcnn_mask.mask_fcn_logits.{weight,bias}" in message
    assert "unexpected 16: " + ", ".join(f"roi_heads.keypoint_head.{i}.0.{{weight,bias}}" for i in range(8)) in message
    assert "\n" not in message and not out.exists()
    assert grouped_names(["a.b.weight", "c", "a.b.bias", "d.e"]) == ["a.b.{weight,bias}", "c", "d.e"]


# ---------------------------------------------------------------- the converted weights compute torchvision's tensors

def torchvision_roi_align(feats, rois, out_size, sampling_ratio=2, canonical_scale=224.0, canonical_level=4):
    """NumPy reference of torchvision's MultiScaleRoIAlign (aligned=False) over P2..P5.

    feats: 4 arrays (B, C, h, w) at strides 4..32; rois (R, 5) (image, x1, y1, x2, y2) in input pixels ->
    (R, C, out, out). Level: floor(k0 + log2(sqrt(area) / 224) + 1e-6) clamped to 2..5. Sample
    (iy, ix) of bin (py, px): y = y1 / s + (py + (iy + 0.5) / sr) * max(h / s, 1) / out; a sample beyond
    -1 or the map size counts 0, others clamp to the map and interpolate bilinearly.
    """
    pooled = np.zeros((len(rois), feats[0].shape[1], out_size, out_size), np.float64)
    for r, (image, x1, y1, x2, y2) in enumerate(rois.astype(np.float64)):
        level = math.floor(canonical_level + math.log2(math.sqrt((x2 - x1) * (y2 - y1)) / canonical_scale) + 1e-6)
        level = min(max(level, 2), 5)
        feat, scale = feats[level - 2][int(image)].astype(np.float64), 1.0 / 2 ** level
        height, width = feat.shape[1:]
        start_y, start_x = y1 * scale, x1 * scale
        bin_h = max(y2 * scale - start_y, 1.0) / out_size
        bin_w = max(x2 * scale - start_x, 1.0) / out_size
        offsets = (np.arange(out_size)[:, None] + (np.arange(sampling_ratio)[None, :] + 0.5) / sampling_ratio)
        ys, xs = (start_y + offsets * bin_h).reshape(-1), (start_x + offsets * bin_w).reshape(-1)

        def taps(coord, size):
            valid = (coord >= -1.0) & (coord <= size)
            coord = np.maximum(coord, 0.0)
            low = np.minimum(np.floor(coord).astype(int), size - 1)
            high = np.minimum(low + 1, size - 1)
            coord = np.where(low >= size - 1, low, coord)
            frac = coord - low
            return low, high, (1.0 - frac) * valid, frac * valid

        y_low, y_high, wy_low, wy_high = taps(ys, height)
        x_low, x_high, wx_low, wx_high = taps(xs, width)
        samples = sum(feat[:, yi][:, :, xi] * (wy[:, None] * wx[None, :])
                      for yi, wy in ((y_low, wy_low), (y_high, wy_high)) for xi, wx in ((x_low, wx_low), (x_high, wx_high)))
        samples = samples.reshape(-1, out_size, sampling_ratio, out_size, sampling_ratio)
        pooled[r] = samples.mean(axis=(2, 4))
    return pooled.astype(np.float32)


def relative_error(ours, theirs):
    return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


class _Features(nn.Cell):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def construct(self, image):
        feats = self.net._features(image)
        cls_scores, bbox_deltas = self.net.rpn(feats)
        return feats, cls_scores, bbox_deltas


@pytest.fixture(scope="module")
def parity(converted_coco, coco_cfg):
    """Our model with the converted seeded weights, run on torchvision's transformed batch."""
    reference = np.load(TORCHVISION_REFERENCE)
    _, out, _ = converted_coco
    net = MaskRcnnResnet50(coco_cfg)
    load_model_weights(out, net)
    net.set_train(False)
    feats, cls_scores, bbox_deltas = _Features(net)(Tensor(reference["batch"]))
    return reference, net, [f.asnumpy() for f in feats], [c.asnumpy() for c in cls_scores], \
        [d.asnumpy() for d in bbox_deltas]


def test_converted_fpn_and_rpn_head_compute_torchvision_s(parity, coco_cfg):
    reference, _, feats, cls_scores, bbox_deltas = parity
    strides = reference["map_strides"]
    num_anchors = coco_cfg.num_anchors
    for level, feat in enumerate(feats):
        assert feat.shape == tuple(reference[f"fpn{level}_shape"])
        s = strides[level]
        assert relative_error(feat[:, ::32, ::s, ::s], reference[f"fpn{level}_sample"]) <= 1e-4, level
        assert relative_error(feat.mean(axis=(2, 3)), reference[f"fpn{level}_mean"]) <= 1e-4, level
        assert relative_error((feat.astype(np.float64) ** 2).mean(axis=(2, 3)), reference[f"fpn{level}_meansq"]) <= 1e-4
        batch, _, height, width = feat.shape
        # ours: cell-major, anchor-minor (B, h * w * A); torchvision's head: (B, A, h, w) and (B, A * 4, h, w)
        objectness = cls_scores[level].reshape(batch, height, width, num_anchors).transpose(0, 3, 1, 2)
        assert relative_error(objectness[:, :, ::s, ::s], reference[f"rpn_objectness{level}"]) <= 1e-4, level
        deltas = bbox_deltas[level].reshape(batch, height, width, num_anchors * 4).transpose(0, 3, 1, 2)
        assert relative_error(deltas[:, :, ::s, ::s], reference[f"rpn_deltas{level}"]) <= 1e-4, level


def test_converted_box_and_mask_heads_compute_torchvision_s(parity):
    """Both heads on torchvision's RoIAlign (aligned=False, the NumPy reference) of our FPN maps, for the
    fixture's given RoIs: logits of our 81 classes equal torchvision's slots of their category ids."""
    reference, net, feats, _, _ = parity
    slots = np.array((0,) + COCO_CATEGORY_IDS)
    roi_feats = torchvision_roi_align(feats[:4], reference["box_rois"], 7)
    logits, deltas = (t.asnumpy() for t in net.rcnn_cls(Tensor(roi_feats)))
    assert relative_error(logits, reference["box_logits"][:, slots]) <= 1e-4
    theirs = reference["box_deltas"].reshape(len(roi_feats), 91, 4)[:, slots]
    assert relative_error(deltas, theirs) <= 1e-4

    mask_feats = torchvision_roi_align(feats[:4], reference["mask_rois"], 14)
    mask_logits = net.rcnn_mask(Tensor(mask_feats)).asnumpy()                 # (R, 81, 28, 28)
    ours_of_slot = {int(slot): index for index, slot in enumerate(slots)}
    kept = [ours_of_slot[int(slot)] for slot in reference["mask_slots"]]
    assert relative_error(mask_logits[:, kept], reference["mask_logits"]) <= 1e-4
    assert relative_error(mask_logits.mean(axis=(2, 3)), reference["mask_logits_mean"][:, slots]) <= 1e-4
