"""src/amp.py: the amp levels on CPU. O0 leaves the first training step bit for bit as before mixed precision
existed; bf16 convolutions (O1-O3) keep the first step's losses and the detections of the tiny model within the
error bfloat16's rounding explains; the levels resolve per device (auto: by the CPU's bf16 flags) and the keys are
validated."""
import numpy as np
import mindspore as ms
import pytest

from bench.bench_train import synthetic_batch
from src import amp
from src.config import ConfigError, load_config
from src.maskrcnn.mask_rcnn_r50 import LOSS_NAMES, MaskRcnnResnet50
from src.network_define import build_train_step
from src.ops import backend

# First step of configs/tiny.yaml on bench_train's synthetic batch (seed train.seed) before amp levels existed
# (commit 3eb2f58), float32: total_loss 2.772789 (bench/results.md), all eight losses as float32 bits.
O0_FIRST_STEP = (0.7054797410964966, 2.0673093795776367, 0.6655671000480652, 0.03991261124610901,
                 1.3404791355133057, 0.032175786793231964, 0.6946544647216797, 2.7727890014648438)
# bf16 against float32: each convolution rounds its two inputs to bfloat16 (8 significant bits, a relative step of
# 2^-8, about 3 decimal digits) and accumulates in float32, so a layer's output moves by a few 0.1 % of its scale;
# through the ~60 convolutions of the tiny model that grows to about 1 % on the heads' logits and deltas (0.66 %
# measured on the worst loss). The losses are means over many samples, so 2 % of a loss (+ 1e-3 for the losses
# near 0) bounds that with a margin, while a wrong pass (a missing scale, a transposed weight) moves them by far
# more.
LOSS_RTOL, LOSS_ATOL = 2e-2, 1e-3
# Detections: the same boxes (IoU >= 0.98 with the same label) and scores within 0.005; a detection may only be
# missing if its score is within SCORE_ATOL of the last kept score (a near tie at the top-k cut may swap).
MATCH_IOU, SCORE_ATOL = 0.98, 5e-3
MASK_PIXELS_DIFFERENT = 0.02     # of a matched detection's binary mask, near the 0.5 threshold


needs_bf16 = pytest.mark.skipif(not (backend.enabled() and amp.cpu_has_bf16()),
                                reason="bf16 convolutions need our kernels and a CPU with AVX512-BF16 / AMX")


def _first_step_losses(cfg, level):
    ms.set_seed(cfg.train.seed)
    net = MaskRcnnResnet50(cfg)
    net.set_train(True)
    net = amp.apply(net, level, "CPU")
    _, cell = build_train_step(net, LOSS_NAMES, cfg.train, cfg.train.base_lr)
    losses, finite = cell(*synthetic_batch(cfg))
    assert bool(finite.asnumpy())
    return np.array([float(loss.asnumpy()) for loss in losses])


def _detections(cfg, level):
    ms.set_seed(cfg.train.seed)
    net = MaskRcnnResnet50(cfg)
    net.set_train(False)
    net = amp.apply(net, level, "CPU")
    image, image_shape = synthetic_batch(cfg)[:2]
    return [output.asnumpy() for output in net(image, image_shape)]


def _iou(a, b):
    top_left, bottom_right = np.maximum(a[:, None, :2], b[None, :, :2]), np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(bottom_right - top_left, 0, None), -1)
    area_a, area_b = np.prod(a[:, 2:] - a[:, :2], -1), np.prod(b[:, 2:] - b[:, :2], -1)
    return inter / (area_a[:, None] + area_b[None] - inter)


def test_o0_first_step_is_bitwise_the_float32_step(tiny):
    assert _first_step_losses(tiny, "O0").tolist() == list(O0_FIRST_STEP)


@needs_bf16
def test_bf16_first_step_losses_stay_within_bfloat16_rounding(tiny):
    reduced, full = _first_step_losses(tiny, "O2"), np.array(O0_FIRST_STEP)
    np.testing.assert_allclose(reduced, full, rtol=LOSS_RTOL, atol=LOSS_ATOL)
    assert not np.array_equal(reduced, full)          # the convolutions did run in bf16


@needs_bf16
def test_bf16_detections_match_float32(tiny):
    (boxes32, scores32, labels32, valid32, masks32), (boxes16, scores16, labels16, valid16, masks16) = [
        _detections(tiny, level) for level in ("O0", "O2")]
    for image in range(boxes32.shape[0]):
        keep32, keep16 = valid32[image].reshape(-1).astype(bool), valid16[image].reshape(-1).astype(bool)
        assert keep32.sum() == keep16.sum() > 0
        score32, score16 = scores32[image].reshape(-1)[keep32], scores16[image].reshape(-1)[keep16]
        label32, label16 = labels32[image].reshape(-1)[keep32], labels16[image].reshape(-1)[keep16]
        overlap = _iou(boxes32[image][keep32], boxes16[image][keep16]) * (label32[:, None] == label16[None])
        match, best = overlap.argmax(1), overlap.max(1)
        matched = best >= MATCH_IOU
        assert np.all(score32[~matched] <= score32.min() + SCORE_ATOL), (score32[~matched], score32.min())
        assert matched.mean() >= 0.9
        np.testing.assert_allclose(score16[match[matched]], score32[matched], atol=SCORE_ATOL)
        binary32 = masks32[image][keep32][matched] > tiny.test.mask_thr_binary      # (D, 28, 28) probabilities
        binary16 = masks16[image][keep16][match[matched]] > tiny.test.mask_thr_binary
        assert (binary32 != binary16).mean() <= MASK_PIXELS_DIFFERENT


def test_levels_resolve_per_device_and_o1_is_refused_off_the_cpu(tiny):
    assert [amp.resolve("auto", device, cpu_bf16=False) for device in ("CPU", "GPU", "Ascend")] == ["O0", "O2", "O2"]
    assert amp.resolve("auto", "CPU", cpu_bf16=True) == "O2"
    assert amp.resolve("O3", "CPU") == amp.resolve("O3", "CPU", cpu_bf16=False) == "O3"
    assert amp.resolve("O0", "CPU", cpu_bf16=True) == "O0"
    net = MaskRcnnResnet50(tiny)
    with pytest.raises(ValueError, match="O1 is not available on Ascend"):
        amp.apply(net, "O1", "Ascend")


def test_cpu_levels_set_the_convolutions_bf16_flag_and_o0_clears_it(tiny):
    net = MaskRcnnResnet50(tiny)
    convolutions = [cell for _, cell in net.cells_and_names() if hasattr(cell, "set_bf16_math")]
    # the kernels read the flags from the flags tensor's shape: bf16 math is its dimension 2 being 2
    amp.apply(net, "O2", "CPU")
    assert all(cell.flags.shape[2] == 2 for cell in convolutions)
    amp.apply(net, "O0", "CPU")
    assert all(cell.flags.shape[2] == 1 for cell in convolutions)


@pytest.mark.parametrize("key, value", [("train.amp_level", "O4"), ("test.amp_level", "bf16"),
                                        ("train.loss_scale_mode", "auto")])
def test_bad_amp_keys_are_rejected_naming_the_key(key, value):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config("tiny", {key: value})


def test_the_announced_precision_says_float32_when_no_convolution_is_on_the_kernels(tiny, capsys):
    with backend.use_mindspore_kernels():          # as export.py builds its graph
        net = MaskRcnnResnet50(tiny)
    amp.set_precision(net, "O2", "CPU")
    assert "precision: float32 (amp O2 on CPU" in capsys.readouterr().out
    amp.set_precision(MaskRcnnResnet50(tiny), "O0", "CPU")
    assert capsys.readouterr().out.strip() == "precision: float32 (amp O0)"


@pytest.mark.parametrize("flags, native", [("fpu sse avx512f avx512_bf16 avx512_vnni", True),
                                           ("fpu avx512f amx_tile amx_bf16 amx_int8", True),
                                           ("fpu sse avx2 avx512f avx512_vnni", False),
                                           ("fpu avx512f avx512_bf16x", False)])
def test_auto_reads_the_cpus_bf16_flags(tmp_path, flags, native):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n")
    assert amp.cpu_has_bf16(str(cpuinfo)) is native
    assert amp.cpu_has_bf16(str(tmp_path / "missing")) is False


def test_the_presets_whose_numbers_are_compared_stay_float32_on_every_cpu():
    for preset in ("tiny", "torchvision"):
        cfg = load_config(preset)
        assert (cfg.train.amp_level, cfg.test.amp_level) == ("O0", "O0"), preset
    demo = load_config("demo")
    assert (demo.train.amp_level, demo.test.amp_level) == ("auto", "auto")
