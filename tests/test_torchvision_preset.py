"""configs/torchvision.yaml: with torchvision's seeded weights converted, our graph computes torchvision's input
batch, anchors, proposals, detections and pasted masks (tests/fixtures/torchvision_reference.npz, written by
bench/torchvision_reference.py); each option of the preset is checked on its own against a reference."""
import cv2
import numpy as np
import pytest
from mindspore import Tensor, nn

from src.checkpoint import load_model_weights
from src.config import load_config
from src.convert_checkpoint import COCO_CATEGORY_IDS
from src.data.transforms import EvalTransform, fitted_size
from src.mask_paste import paste_masks, paste_masks_torchvision
from src.maskrcnn.anchor_generator import cell_anchors
from src.maskrcnn.mask_rcnn_r50 import MaskRcnnResnet50
from src.maskrcnn.roi_align import MultiLevelRoIAlign
from src.ops import backend
from tests.test_convert_checkpoint import TORCHVISION_REFERENCE, converted_coco, torchvision_roi_align  # noqa: F401
from tests.test_roi_align import np_roi_align, np_level

# The fixture's settings: min_size 256, max_size 384, every image pads to 256 x 384 (= our canvas).
FIXTURE_SIZE = {"data.img_height": 256, "data.img_width": 384, "data.min_size": 256, "data.max_size": 384}


@pytest.fixture(scope="module")
def reference():
    return np.load(TORCHVISION_REFERENCE)


@pytest.fixture(scope="module")
def coco_cfg():
    """Recipe's classes and architecture at the fixture size (the converted_coco fixture reads it)."""
    return load_config(overrides={"data.img_height": 256, "data.img_width": 384})


@pytest.fixture(scope="module")
def preset():
    return load_config("torchvision", FIXTURE_SIZE)


def test_recipe_defaults_are_not_the_preset():
    recipe, preset = load_config(), load_config("torchvision")
    assert (recipe.data.resize_mode, recipe.data.resize_kernel, recipe.anchor.anchor_offset,
            recipe.anchor.round_base_anchors, recipe.roi.roi_aligned, recipe.test.test_min_box_size,
            recipe.test.mask_paste) == ("fit", "warp", 0.5, False, True, 0.0, "centres")
    assert (preset.data.resize_mode, preset.data.resize_kernel, preset.anchor.anchor_offset,
            preset.anchor.round_base_anchors, preset.roi.roi_aligned, preset.test.test_min_box_size,
            preset.test.mask_paste) == ("short_long", "torch", 0.0, True, False, 0.01, "torchvision")
    assert (preset.data.min_size, preset.data.max_size, preset.data.img_height) == (800, 1333, 1344)


def test_short_long_sizes_are_torchvision_s():
    cfg = load_config("torchvision")
    assert fitted_size(480, 640, cfg) == (800, 1066)           # floor(640 * 800 / 480) = floor(1066.67)
    assert fitted_size(640, 480, cfg) == (1066, 800)           # portrait: short side 800 too
    assert fitted_size(300, 1000, cfg) == (399, 1333)          # long side capped: floor(300 * 1.333)
    small = load_config("torchvision", {"data.img_height": 256, "data.img_width": 384, "data.max_size": 384,
                                        "data.min_size": 256})
    with pytest.raises(ValueError, match="does not fit the 256x384 canvas: set data.img_height"):
        fitted_size(400, 200, small)                            # portrait needs 384 rows


def _eval_input(cfg, rgb):
    ok, png = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    assert ok
    image, image_shape, _ = EvalTransform(cfg)(np.frombuffer(png.tobytes(), np.uint8), np.int32(1))
    return image, image_shape


def test_eval_transform_reproduces_torchvision_s_batch(reference, preset):
    """Resize rule, floor rounding, torch's bilinear kernel and normalisation: the fixture's padded batch."""
    for index in range(3):
        image, image_shape = _eval_input(preset, reference[f"image{index}"])
        np.testing.assert_allclose(image, reference["batch"][index], atol=2e-5, err_msg=str(index))
        height, width = reference["image_sizes"][index]
        ori_h, ori_w = reference[f"image{index}"].shape[:2]
        np.testing.assert_allclose(image_shape, [ori_h, ori_w, height / ori_h, width / ori_w], rtol=1e-6)
    warp = load_config("torchvision", {**FIXTURE_SIZE, "data.resize_kernel": "warp"})
    image, _ = _eval_input(warp, reference["image1"])            # upsampled x2: the zero border shows
    assert np.abs(image - reference["batch"][1]).max() > 0.1


def test_rounded_cell_anchors_are_torchvision_s(reference, preset):
    a = preset.anchor
    for level, stride in enumerate(a.anchor_strides):
        np.testing.assert_array_equal(cell_anchors(stride, a.anchor_scales, a.anchor_ratios, rounded=True),
                                      reference["cell_anchors"][level])
    assert not np.array_equal(cell_anchors(4, a.anchor_scales, a.anchor_ratios), reference["cell_anchors"][0])


# ---------------------------------------------------------------- RoIAlign aligned=False, both implementations

class _Pool(nn.Cell):
    def __init__(self, cfg, out_size):
        super().__init__()
        self.pool = MultiLevelRoIAlign(cfg, out_size)

    def construct(self, rois, p2, p3, p4, p5):
        return self.pool(rois, (p2, p3, p4, p5))


def _pyramid_and_rois(cfg, seed):
    rng = np.random.default_rng(seed)
    feats = [rng.normal(size=(2, 8, h, w)).astype(np.float32) for h, w in cfg.feature_shapes[:4]]
    side = np.exp(rng.uniform(np.log(2.0), np.log(600.0), 40))
    cx, cy = rng.uniform(-20, 404, 40), rng.uniform(-20, 276, 40)
    aspect = np.exp(rng.uniform(-0.7, 0.7, 40))
    rois = np.stack([rng.integers(0, 2, 40), cx - side * aspect / 2, cy - side / aspect / 2,
                     cx + side * aspect / 2, cy + side / aspect / 2], axis=1).astype(np.float32)
    return feats, rois


@pytest.mark.parametrize("use_kernel", [True, False], ids=["cpu_kernel", "table"])
@pytest.mark.parametrize("aligned", [False, True])
def test_roi_align_offset_matches_numpy_references(aligned, use_kernel, monkeypatch):
    """roi.roi_aligned false is torchvision's MultiScaleRoIAlign (the NumPy reference of the parity tests),
    true the aligned reference of tests/test_roi_align.py, in the C++ kernel and the MindSpore fallback."""
    if use_kernel and not backend.enabled():
        pytest.skip("CPU kernels not built (python -m src.ops.build)")
    if not use_kernel:
        monkeypatch.setattr(backend, "enabled", lambda: False)
    cfg = load_config(overrides={"data.img_height": 256, "data.img_width": 384, "roi.roi_aligned": aligned})
    feats, rois = _pyramid_and_rois(cfg, seed=7 if aligned else 8)
    pool = _Pool(cfg, 7)
    assert pool.pool.align.uses_kernel == use_kernel
    got = pool(Tensor(rois), *(Tensor(f) for f in feats)).asnumpy()
    if aligned:
        strides, finest = cfg.roi.roi_align_featmap_strides, cfg.roi.roi_align_finest_scale
        want = np.stack([np_roi_align(feats[level][int(roi[0])], roi[1:], strides[level], 7, 2)
                         for roi in rois for level in [np_level(roi[1:], finest, 4)]])
    else:
        want = torchvision_roi_align(feats, rois, 7)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4)


# ---------------------------------------------------------------- the whole graph on the fixture

class _Stages(nn.Cell):
    """Proposals and final detections of the model in inference mode."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def construct(self, image, image_shape):
        feats = self.net._features(image)
        cls_scores, bbox_deltas = self.net.rpn(feats)
        proposals, valid = self.net.test_proposals(cls_scores, bbox_deltas, self.net.level_anchors, image_shape)
        return (proposals, valid) + self.net._detect(feats, cls_scores, bbox_deltas, image_shape)


def _iou(a, b):
    """(n, 4) x (m, 4) -> (n, m)."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area = lambda x: np.prod(x[:, 2:] - x[:, :2], axis=1)  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None, :] - inter)


@pytest.fixture(scope="module")
def graph_outputs(reference, preset, converted_coco):  # noqa: F811
    """Our graph with the preset and the converted seeded weights, fed by our own eval transform."""
    net = MaskRcnnResnet50(preset)
    load_model_weights(converted_coco[1], net)
    net.set_train(False)
    inputs = [_eval_input(preset, reference[f"image{i}"]) for i in range(3)]
    images = np.stack([image for image, _ in inputs])
    shapes = np.stack([shape for _, shape in inputs])
    outputs = [o.asnumpy() for o in _Stages(net)(Tensor(images), Tensor(shapes))]
    return outputs, shapes


def _per_image(reference, key, counts_key):
    counts = reference[counts_key]
    starts = np.concatenate([[0], np.cumsum(counts)])
    return [reference[key][starts[i]:starts[i + 1]] for i in range(len(counts))]


def test_preset_reproduces_torchvision_s_proposals(reference, graph_outputs):
    """Per image, as sets: torchvision's 1000 proposals against ours. Not well-defined: the order and survivors
    among near-equal scores (NMS ties, float32 sigmoids saturating at 1), so the test asks that nearly all
    (>= 99 %) of torchvision's proposals have one of ours at IoU >= 0.999, and that the best 100 all do."""
    (proposals, valid, *_), _ = graph_outputs
    theirs = _per_image(reference, "proposals", "proposal_counts")
    for image, want in enumerate(theirs):
        ours = proposals[image][valid[image]]
        assert len(ours) == len(want), image
        best = _iou(want, ours).max(axis=1)
        assert (best >= 0.999).mean() >= 0.99, (image, (best >= 0.999).mean())
        assert (best[:100] >= 0.999).all(), image


def test_preset_reproduces_torchvision_s_detections_and_masks(reference, preset, graph_outputs):
    """Final detections per image as sets: each of torchvision's (box, label, score) has one of ours with the
    same COCO class, IoU >= 0.99 and the score within 1e-3, and the counts agree; the 28 x 28 mask probabilities
    of matched detections agree to 1e-3, and the pasted masks (test.mask_paste torchvision) differ in at most
    0.1 % of their pixels (pixels whose value is within rounding of 0.5 may flip). The order of equal scores
    is not defined, hence the matching."""
    (_, _, boxes, scores, labels, valid, masks), shapes = graph_outputs
    category = np.array((0,) + COCO_CATEGORY_IDS)
    want_boxes = _per_image(reference, "det_boxes_input", "det_counts")
    want_scores = _per_image(reference, "det_scores", "det_counts")
    want_labels = _per_image(reference, "det_labels", "det_counts")
    want_original = _per_image(reference, "det_boxes", "det_counts")
    kept_probs = np.minimum(reference["det_counts"], 20)
    want_probs = np.split(reference["det_mask_probs"], np.cumsum(kept_probs)[:-1])
    for image in range(3):
        keep = valid[image]
        ours_boxes, ours_scores, ours_labels = boxes[image][keep], scores[image][keep], category[labels[image][keep]]
        assert len(ours_boxes) == len(want_boxes[image]), image
        iou = _iou(want_boxes[image], ours_boxes)
        same = (want_labels[image][:, None] == ours_labels[None, :]) & \
            (np.abs(want_scores[image][:, None] - ours_scores[None, :]) <= 1e-3)
        match = np.where(same, iou, -1.0).argmax(axis=1)
        assert (np.where(same, iou, -1.0).max(axis=1) >= 0.99).all(), image
        assert len(set(match.tolist())) == len(match), image                   # one to one
        ours_masks = masks[image][keep][match]                                   # in torchvision's order
        np.testing.assert_allclose(ours_masks[:kept_probs[image]], want_probs[image], atol=1e-3)

        ori_h, ori_w = reference[f"image{image}"].shape[:2]
        scale = shapes[image][[3, 2, 3, 2]]
        original = np.clip(ours_boxes[match] / scale, 0, [ori_w, ori_h, ori_w, ori_h])
        np.testing.assert_allclose(original, want_original[image], atol=1e-2)
        pasted = np.unpackbits(reference[f"det_masks_pasted{image}"], axis=-1)[:, :, :ori_w].astype(bool)
        count = len(pasted)
        ours_pasted = paste_masks_torchvision(ours_masks[:count], original[:count], ori_h, ori_w,
                                              preset.test.mask_thr_binary).astype(bool)
        assert (ours_pasted != pasted).mean() <= 1e-3, image
        centres = paste_masks(ours_masks[:count], original[:count], ori_h, ori_w, 0.5).astype(bool)
        assert (centres != pasted).mean() > (ours_pasted != pasted).mean(), image   # the rule matters here
