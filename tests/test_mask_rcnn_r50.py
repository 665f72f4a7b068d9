"""The whole Mask R-CNN graph at the tiny size: losses, learning, gradients, inference outputs, size.

Two graphs are compiled for the module: one training step (SGD momentum) and one inference pass.
"""
import numpy as np
import pytest

import mindspore as ms
from mindspore import nn

from inference_helpers import NARROW_OVERRIDES
from src.config import Config, load_config
from src.dataset import create_maskrcnn_dataset
from src.maskrcnn import mask_rcnn_r50
from src.maskrcnn.mask_rcnn_r50 import LOSS_NAMES, MaskRcnnResnet50, model_summary
from src.network_define import MaskRcnnObjective, TrainOneStepCell

LEARNING_STEPS = 24
LEARNING_RATE = 0.01
# Mask R-CNN R50-FPN with 81 classes, counting weights and biases (torchvision's maskrcnn_resnet50_fpn has
# 44,401,393 at 91 classes, BatchNorm kept as buffers; 10 classes fewer removes 53,820 head parameters).
R50_FPN_81_CLASS_PARAMETERS = 44_347_573


@pytest.fixture(scope="module")
def batches(tiny_mindrecord):
    """Four fixed training batches of 2 synthetic images (augmentation off, so they repeat exactly)."""
    cfg = tiny_mindrecord.cfg
    cfg.data.flip_ratio = cfg.data.photo_ratio = cfg.data.expand_ratio = 0.0
    dataset = create_maskrcnn_dataset(cfg, tiny_mindrecord.train_files, is_training=True,
                                      batch_size=cfg.train.batch_size)
    return [tuple(batch) for batch in dataset.create_tuple_iterator(num_epochs=1)][:4]


@pytest.fixture(scope="module")
def trained(tiny_mindrecord, batches):
    """The tiny model trained LEARNING_STEPS steps on the fixed batches: (net, initial params, losses)."""
    ms.set_seed(0)
    net = MaskRcnnResnet50(tiny_mindrecord.cfg)
    initial = {p.name: p.asnumpy().copy() for p in net.get_parameters()}
    net.set_train(True)
    optimizer = nn.Momentum(net.trainable_params(), learning_rate=LEARNING_RATE, momentum=0.9, weight_decay=0.0)
    step = TrainOneStepCell(MaskRcnnObjective(net, LOSS_NAMES, 1.0), optimizer)
    step.set_train(True)
    history = []
    for index in range(LEARNING_STEPS):
        losses, finite = step(*batches[index % len(batches)])
        assert bool(finite), f"non-finite loss at step {index}"
        history.append([float(v.asnumpy()) for v in losses])
    return net, initial, np.array(history)


def test_training_returns_finite_named_losses(trained):
    _, _, history = trained
    assert history.shape == (LEARNING_STEPS, len(LOSS_NAMES))
    assert np.isfinite(history).all()
    named = dict(zip(LOSS_NAMES, history[0]))
    assert named["rpn_loss"] == pytest.approx(named["rpn_cls_loss"] + named["rpn_reg_loss"], rel=1e-4)
    assert named["rcnn_loss"] == pytest.approx(
        named["rcnn_cls_loss"] + named["rcnn_reg_loss"] + named["rcnn_mask_loss"], rel=1e-4)
    assert named["total_loss"] == pytest.approx(named["rpn_loss"] + named["rcnn_loss"], rel=1e-4)
    assert all(named[name] > 0 for name in ("rpn_cls_loss", "rcnn_cls_loss", "rcnn_mask_loss"))


def test_total_loss_falls(trained):
    """Measured at the tiny size (4 fixed batches of 2 images, lr 0.01, momentum 0.9, seed 0): over the
    first round of batches (steps 0-3) the mean total loss was 2.23 and the RPN loss 0.73; over the last
    round (steps 20-23) 1.69 and 0.14."""
    _, _, history = trained
    total = history[:, LOSS_NAMES.index("total_loss")]
    rpn = history[:, LOSS_NAMES.index("rpn_loss")]
    assert total[-4:].mean() < 0.85 * total[:4].mean(), total
    assert rpn[-4:].mean() < 0.5 * rpn[:4].mean(), rpn


def test_gradients_reach_trainable_and_spare_frozen_parameters(trained):
    """With weight decay off, a parameter changes only through its gradient."""
    net, initial, _ = trained
    trainable = {p.name for p in net.trainable_params()}
    changed = {name for name, value in initial.items()
               if not np.array_equal(value, net.parameters_dict()[name].asnumpy())}
    assert trainable - changed == set(), f"trainable but never updated: {sorted(trainable - changed)[:10]}"
    frozen_changed = changed - trainable - {"sample_seed"}
    assert frozen_changed == set(), f"frozen but changed: {sorted(frozen_changed)[:10]}"
    assert any(name.startswith("backbone.layer1.") for name in initial)
    assert not any(name.startswith(("backbone.conv1.", "backbone.bn1.", "backbone.layer1.")) for name in trainable)
    assert int(net.sample_seed.asnumpy()) == LEARNING_STEPS


def test_skipping_unused_mask_chunks_changes_no_loss_or_gradient(batches, monkeypatch):
    """Unused positive slots weigh 0, so packing the used slots of the batch first and skipping the mask branch
    for chunks without a used slot must give the losses and gradients of running every slot: 3-row chunks
    (most skipped, one cut through the used slots) against one chunk."""
    cfg = load_config("tiny", NARROW_OVERRIDES)
    nets = []
    for rows in (cfg.train.batch_size * cfg.num_pos_stage2, 3):
        monkeypatch.setattr(mask_rcnn_r50, "MASK_CHUNK_ROWS", rows)
        nets.append(MaskRcnnResnet50(cfg))
    ms.load_param_into_net(nets[1], {p.name: ms.Parameter(p.asnumpy(), name=p.name)      # same weights (copies)
                                     for p in nets[0].get_parameters()})
    outputs = []
    for net in nets:
        net.set_train(True)
        grad_fn = ms.value_and_grad(MaskRcnnObjective(net, LOSS_NAMES, 1.0), None, net.trainable_params(),
                                    has_aux=True)
        values, grads = grad_fn(*batches[0])                                     # (total, *losses), grads
        outputs.append(([float(v.asnumpy()) for v in values[1:]], [g.asnumpy() for g in grads]))
    (one_chunk_losses, one_chunk_grads), (chunked_losses, chunked_grads) = outputs
    assert one_chunk_losses[LOSS_NAMES.index("rcnn_mask_loss")] > 0
    np.testing.assert_allclose(chunked_losses, one_chunk_losses, rtol=1e-5)
    for chunked, whole in zip(chunked_grads, one_chunk_grads):
        np.testing.assert_allclose(chunked, whole, rtol=1e-4, atol=1e-7)


@pytest.fixture(scope="module")
def inference(trained, tiny_mindrecord):
    net, _, _ = trained
    net.set_train(False)
    cfg = tiny_mindrecord.cfg
    dataset = create_maskrcnn_dataset(cfg, tiny_mindrecord.val_files, is_training=False,
                                      batch_size=cfg.test.test_batch_size)
    image, image_shape, _ = next(dataset.create_tuple_iterator(num_epochs=1))
    outputs = [o.asnumpy() for o in net(image, image_shape)]
    net.set_train(True)
    return outputs, image_shape.asnumpy(), cfg


def test_inference_outputs_have_documented_shapes(inference):
    (boxes, scores, labels, valid, masks), image_shape, cfg = inference
    batch, k = cfg.test.test_batch_size, cfg.test.test_max_per_img
    assert boxes.shape == (batch, k, 4) and boxes.dtype == np.float32
    assert scores.shape == (batch, k) and labels.shape == (batch, k) and labels.dtype == np.int32
    assert valid.shape == (batch, k) and valid.dtype == np.bool_
    assert masks.shape == (batch, k, cfg.rcnn.mask_shape, cfg.rcnn.mask_shape)


def test_inference_respects_thresholds(inference):
    (boxes, scores, labels, valid, masks), image_shape, cfg = inference
    assert valid.any(), "a briefly trained model should detect something above the 0.05 score threshold"
    assert (scores[valid] > cfg.test.test_score_thr).all()
    assert ((labels[valid] >= 1) & (labels[valid] < cfg.num_classes)).all()
    assert ((masks >= 0) & (masks <= 1)).all()
    for image in range(boxes.shape[0]):
        height, width = image_shape[image, 0] * image_shape[image, 2], image_shape[image, 1] * image_shape[image, 3]
        kept = boxes[image][valid[image]]
        assert (kept[:, 0] >= 0).all() and (kept[:, 2] <= width + 1e-3).all()
        assert (kept[:, 1] >= 0).all() and (kept[:, 3] <= height + 1e-3).all()
        ordered = scores[image][valid[image]]
        assert (np.diff(ordered) <= 1e-6).all(), "detections are sorted by score"
        for label in np.unique(labels[image][valid[image]]):
            same = kept[labels[image][valid[image]] == label]
            assert _max_pairwise_iou(same) <= cfg.test.test_iou_thr + 1e-4, "per-class NMS left an overlap"


def _max_pairwise_iou(boxes):
    if len(boxes) < 2:
        return 0.0
    x1 = np.maximum(boxes[:, None, 0], boxes[None, :, 0])
    y1 = np.maximum(boxes[:, None, 1], boxes[None, :, 1])
    x2 = np.minimum(boxes[:, None, 2], boxes[None, :, 2])
    y2 = np.minimum(boxes[:, None, 3], boxes[None, :, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    iou = inter / np.maximum(area[:, None] + area[None, :] - inter, 1e-9)
    np.fill_diagonal(iou, 0.0)
    return float(iou.max())


def test_recipe_parameter_count_matches_mask_rcnn_r50_fpn(capsys):
    cfg = Config()
    net = MaskRcnnResnet50(cfg)
    learned = sum(int(np.prod(p.shape)) for p in net.get_parameters()
                  if not p.name.endswith(("moving_mean", "moving_variance", ".gamma", ".beta", "sample_seed")))
    print(model_summary(net, cfg))
    print(f"weights and biases (BatchNorm excluded): {learned:,}")
    assert "81 classes" in capsys.readouterr().out
    assert learned == R50_FPN_81_CLASS_PARAMETERS

