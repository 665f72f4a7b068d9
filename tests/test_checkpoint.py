"""Training checkpoints: round trip, retention, atomic writes, damaged/foreign files, pre-trained report."""
import os

import numpy as np
import pytest

import mindspore as ms
from mindspore import Parameter, Tensor, nn

from src.checkpoint import (CheckpointError, CheckpointManager, TrainingState, format_load_report,
                            load_pretrained, load_resume_point, optimizer_state, write_checkpoint_atomic)
from src.config import TrainConfig
from src.network_define import build_optimizer

STEPS_PER_EPOCH = 5


class SmallDetector(nn.Cell):
    """Named like the model: a backbone, a class-specific head and a frozen int32 step counter."""

    def __init__(self, num_classes=4, seed=0):
        super().__init__()
        rng = np.random.default_rng(seed)
        self.backbone = nn.SequentialCell([nn.Conv2d(3, 4, 3, has_bias=False), nn.BatchNorm2d(4)])
        self.head = nn.Dense(4, num_classes)
        for param in self.trainable_params():
            param.set_data(Tensor(rng.normal(size=param.shape).astype(np.float32)))
        self.step_counter = Parameter(Tensor(int(rng.integers(100)), ms.int32), name="step_counter",
                                      requires_grad=False)


def make_run(num_classes=4, seed=0, optimizer="momentum"):
    net = SmallDetector(num_classes, seed)
    opt = build_optimizer(net.trainable_params(), 0.1, TrainConfig(optimizer=optimizer))
    rng = np.random.default_rng(seed + 100)
    for moment in optimizer_state(opt):
        moment.set_data(Tensor(rng.normal(size=moment.shape).astype(np.float32)))
    return net, opt


def values(params):
    return {p.name: p.asnumpy().copy() for p in params}


def state_at(global_step):
    epoch, step = divmod(global_step - 1, STEPS_PER_EPOCH)
    return TrainingState(epoch, step + 1, global_step, STEPS_PER_EPOCH)


@pytest.mark.parametrize("optimizer", ["momentum", "adam", "adamw"])
def test_round_trip_restores_weights_optimizer_state_counter_and_position(tmp_path, optimizer):
    net, opt = make_run(seed=0, optimizer=optimizer)
    path = CheckpointManager(str(tmp_path), keep_max=3).save(net, opt, state_at(7))
    assert os.path.basename(path) == "maskrcnn-2_2.ckpt"

    fresh_net, fresh_opt = make_run(seed=1, optimizer=optimizer)
    point = load_resume_point(path, STEPS_PER_EPOCH)
    point.restore_network(fresh_net)
    point.restore_optimizer(fresh_opt)
    assert point.state == TrainingState(epoch=1, step_in_epoch=2, global_step=7, steps_per_epoch=5)
    assert point.state.next_position() == (1, 2)
    for name, value in values(net.get_parameters()).items():
        np.testing.assert_array_equal(values(fresh_net.get_parameters())[name], value)
    per_parameter = {"momentum": 1, "adam": 2, "adamw": 2}[optimizer]
    bias_powers = 2 if optimizer == "adam" else 0
    assert len(optimizer_state(opt)) == len(net.trainable_params()) * per_parameter + bias_powers
    for name, value in values(optimizer_state(opt)).items():
        np.testing.assert_array_equal(values(optimizer_state(fresh_opt))[name], value)
    assert fresh_net.step_counter.dtype == ms.int32


def test_epoch_end_resumes_at_the_next_epoch():
    assert state_at(10).next_position() == (2, 0)


def test_keeps_only_the_newest_checkpoints(tmp_path):
    net, opt = make_run()
    manager = CheckpointManager(str(tmp_path), keep_max=2)
    for step in (3, 5, 9, 11):
        manager.save(net, opt, state_at(step))
    names = [os.path.basename(p) for p in manager.checkpoints()]
    assert names == ["maskrcnn-2_4.ckpt", "maskrcnn-3_1.ckpt"]
    assert sorted(os.listdir(tmp_path)) == sorted(names)
    assert os.path.basename(manager.latest()) == "maskrcnn-3_1.ckpt"


def test_interrupted_save_leaves_no_partial_file_and_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    net, opt = make_run(seed=0)
    manager = CheckpointManager(str(tmp_path), keep_max=5)
    good = manager.save(net, opt, state_at(4))
    saved = values(net.get_parameters())

    def interrupted_save(entries, path, **kwargs):
        with open(path, "wb") as out:
            out.write(b"\x0a\x10half of a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(ms, "save_checkpoint", interrupted_save)
    net.head.weight.set_data(Tensor(net.head.weight.asnumpy() + 1.0))
    with pytest.raises(KeyboardInterrupt):
        manager.save(net, opt, state_at(5))
    assert os.listdir(tmp_path) == [os.path.basename(good)]
    assert manager.latest() == good
    fresh, _ = make_run(seed=1)
    load_resume_point(good, STEPS_PER_EPOCH).restore_network(fresh)
    np.testing.assert_array_equal(fresh.head.weight.asnumpy(), saved["head.weight"])


def test_staging_files_of_a_killed_save_are_removed(tmp_path):
    stale = tmp_path / ".maskrcnn-1_3.ckpt.partial.ckpt"
    stale.write_bytes(b"partial")
    other = tmp_path / "notes.txt"
    other.write_text("kept")
    CheckpointManager(str(tmp_path), keep_max=1)
    assert sorted(os.listdir(tmp_path)) == ["notes.txt"]


def test_truncated_checkpoint_is_refused(tmp_path):
    net, opt = make_run()
    path = CheckpointManager(str(tmp_path), keep_max=1).save(net, opt, state_at(2))
    data = open(path, "rb").read()
    truncated = tmp_path / "maskrcnn-9_9.ckpt"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_resume_point(str(truncated), STEPS_PER_EPOCH)


def test_flipped_byte_fails_the_crc(tmp_path):
    net, opt = make_run()
    path = CheckpointManager(str(tmp_path), keep_max=1).save(net, opt, state_at(2))
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0xFF
    damaged = tmp_path / "damaged.ckpt"
    damaged.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="damaged.ckpt"):
        load_resume_point(str(damaged), STEPS_PER_EPOCH)


def test_foreign_files_are_named_in_the_error(tmp_path):
    text = tmp_path / "notes.ckpt"
    text.write_text("not a checkpoint at all")
    with pytest.raises(CheckpointError, match="notes.ckpt"):
        load_resume_point(str(text), STEPS_PER_EPOCH)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_resume_point(str(tmp_path / "missing.ckpt"), STEPS_PER_EPOCH)
    weights_only = str(tmp_path / "weights.ckpt")
    write_checkpoint_atomic(weights_only, [{"name": p.name, "data": p} for p in make_run()[0].get_parameters()])
    with pytest.raises(CheckpointError, match="not a training checkpoint.*--pre_trained"):
        load_resume_point(weights_only, STEPS_PER_EPOCH)


def test_resume_refuses_another_epoch_length(tmp_path):
    net, opt = make_run()
    path = CheckpointManager(str(tmp_path), keep_max=1).save(net, opt, state_at(2))
    with pytest.raises(CheckpointError, match="5 steps per epoch, this run has 4"):
        load_resume_point(path, 4)


def test_resume_refuses_a_checkpoint_of_another_model_shape(tmp_path):
    net, opt = make_run(num_classes=4)
    path = CheckpointManager(str(tmp_path), keep_max=1).save(net, opt, state_at(2))
    other, _ = make_run(num_classes=6)
    with pytest.raises(CheckpointError, match=r"head.weight: \(4, 4\) in checkpoint, \(6, 4\) here"):
        load_resume_point(path, STEPS_PER_EPOCH).restore_network(other)


def test_pretrained_report_loads_matching_skips_mismatched_and_lists_the_rest(tmp_path):
    source, source_opt = make_run(num_classes=4, seed=0)
    path = CheckpointManager(str(tmp_path), keep_max=1).save(source, source_opt, state_at(3))
    target, _ = make_run(num_classes=6, seed=1)
    head_bias_before = target.head.bias.asnumpy().copy()
    report = load_pretrained(path, target)

    backbone = [p.name for p in source.backbone.get_parameters()]
    assert sorted(report.loaded) == sorted(backbone + ["step_counter"])
    assert dict(report.skipped) == {"head.weight": "shape (4, 4) in checkpoint, (6, 4) in the model",
                                    "head.bias": "shape (4,) in checkpoint, (6,) in the model"}
    assert sorted(report.left_at_init) == ["head.bias", "head.weight"]
    assert report.ignored_training_state == len(source_opt.moments) + 4
    for name in backbone:
        np.testing.assert_array_equal(values(target.get_parameters())[name], values(source.get_parameters())[name])
    np.testing.assert_array_equal(target.head.bias.asnumpy(), head_bias_before)
    text = format_load_report(report)
    assert "loaded 6 tensors (backbone: 5, step_counter: 1)" in text
    assert "head.weight: shape (4, 4) in checkpoint, (6, 4) in the model" in text
    assert "left at initialisation 2 tensors (head: 2)" in text


def test_pretrained_without_any_match_suggests_conversion(tmp_path):
    raw = str(tmp_path / "resnet.ckpt")
    conv = make_run()[0].backbone
    write_checkpoint_atomic(raw, [{"name": p.name.split("backbone.", 1)[-1], "data": p}
                                  for p in conv.get_parameters()])
    with pytest.raises(CheckpointError, match="convert_checkpoint"):
        load_pretrained(raw, make_run()[0])


# ---------------------------------------------------------------- the real model's names

CLASS_SPECIFIC = {"rcnn_cls.cls_score.weight", "rcnn_cls.cls_score.bias", "rcnn_cls.bbox_pred.weight",
                  "rcnn_cls.bbox_pred.bias", "rcnn_mask.mask_fcn_logits.weight", "rcnn_mask.mask_fcn_logits.bias"}


@pytest.fixture(scope="module")
def tiny_models():
    """MaskRcnnResnet50 of the tiny config (5 classes) and the same with 3 classes (built, not compiled)."""
    from src.config import load_config
    from src.maskrcnn.mask_rcnn_r50 import MaskRcnnResnet50
    fewer_classes = load_config("tiny", {"data.classes": ["background", "rectangle", "ellipse"]})
    return MaskRcnnResnet50(load_config("tiny")), MaskRcnnResnet50(fewer_classes)


def test_finetuning_to_another_class_count_drops_exactly_the_class_specific_layers(tmp_path, tiny_models):
    source, target = tiny_models
    path = str(tmp_path / "maskrcnn_coco.ckpt")
    write_checkpoint_atomic(path, [{"name": p.name, "data": p} for p in source.get_parameters()])
    report = load_pretrained(path, target)
    assert {name for name, _ in report.skipped} == CLASS_SPECIFIC
    assert dict(report.skipped)["rcnn_cls.cls_score.weight"] == \
        "shape (5, 1024) in checkpoint, (3, 1024) in the model"
    assert set(report.left_at_init) == CLASS_SPECIFIC
    assert len(report.loaded) == len(list(source.get_parameters())) - len(CLASS_SPECIFIC)
    np.testing.assert_array_equal(target.rcnn_cls.fc6.weight.asnumpy(), source.rcnn_cls.fc6.weight.asnumpy())
    np.testing.assert_array_equal(target.rcnn_mask.mask_fcn4.weight.asnumpy(),
                                  source.rcnn_mask.mask_fcn4.weight.asnumpy())


def test_converted_backbone_fills_only_the_backbone(tmp_path, tiny_models):
    source, target = tiny_models
    path = str(tmp_path / "resnet50_backbone.ckpt")
    backbone = [p for p in source.get_parameters() if p.name.startswith("backbone.")]
    write_checkpoint_atomic(path, [{"name": p.name, "data": p} for p in backbone])
    report = load_pretrained(path, target)
    assert sorted(report.loaded) == sorted(p.name for p in backbone) and not report.skipped
    heads = [p.name for p in target.get_parameters() if not p.name.startswith("backbone.")]
    assert sorted(report.left_at_init) == sorted(heads)
    assert "left at initialisation 43 tensors (neck: 16, rcnn_cls: 8, rcnn_mask: 12, rpn: 6, sample_seed: 1)" \
        in format_load_report(report)
