"""Train-one-step cell (SGD momentum and AdamW maths, loss scale, gradient clipping, NaN guard) and loggers.

The cell is tested on a small network that honours the model's training contract: the same construct
signature, the eight-loss tuple, a frozen parameter and an int32 step counter used as a "sampling seed".
"""
import io
import json

import numpy as np
import pytest

import mindspore as ms
from mindspore import Tensor

from src.config import TrainConfig
from src.maskrcnn.mask_rcnn_r50 import LOSS_NAMES
from src.network_define import (LossLog, MetricsLog, NonFiniteLossError, ProgressBar, StepMonitor, StepRecord,
                                build_train_step, check_finite, format_loss_line)

from contract_net import CLASSES, RECIPE_LINE, ContractNet

BATCH, MAX_INSTANCES, HEIGHT, WIDTH = 2, 3, 16, 24
LR, MOMENTUM, WEIGHT_DECAY = 0.05, 0.91, 1e-4


def make_batch(seed):
    rng = np.random.default_rng(seed)
    image = rng.normal(size=(BATCH, 3, HEIGHT, WIDTH)).astype(np.float32)
    image_shape = np.tile(np.array([[HEIGHT, WIDTH, 1.0, 1.0]], np.float32), (BATCH, 1))
    box = rng.uniform(0, HEIGHT, size=(BATCH, MAX_INSTANCES, 4)).astype(np.float32)
    label = rng.integers(1, CLASSES, size=(BATCH, MAX_INSTANCES)).astype(np.int32)
    valid = np.array([[True, True, False], [True, False, False]])
    mask = rng.integers(0, 2, size=(BATCH, MAX_INSTANCES, HEIGHT, WIDTH)).astype(np.uint8)
    return [Tensor(a) for a in (image, image_shape, box, label, valid, mask)]


def build_train_cell(loss_scale=1.0, nan_at_step=-1, nan_grad_at_step=-1, **train_options):
    ms.set_seed(3)
    net = ContractNet(nan_at_step, nan_grad_at_step)
    net.set_train(True)
    train_options = {"momentum": MOMENTUM, "weight_decay": WEIGHT_DECAY, **train_options}
    train_cfg = TrainConfig(loss_scale=loss_scale, **train_options)
    opt, cell = build_train_step(net, LOSS_NAMES, train_cfg, Tensor(np.full((8,), LR, np.float32)))
    return net, opt, cell


def snapshot(params):
    return {p.name: p.asnumpy().copy() for p in params}


def reference_gradients(net, batch):
    """d total_loss / d trainable weights, computed without the training cells."""
    def total(*inputs):
        return net(*inputs)[-1]
    return ms.grad(total, grad_position=None, weights=net.trainable_params())(*batch)


def test_one_step_is_sgd_momentum_with_weight_decay_and_leaves_frozen_alone():
    net, opt, cell = build_train_cell()
    batch = make_batch(0)
    before = snapshot(net.get_parameters())
    grads = [g.asnumpy() for g in reference_gradients(net, batch)]     # advances the counter to 1
    net.step_counter.set_data(Tensor(0, ms.int32))
    losses, finite = cell(*batch)
    assert bool(finite) and len(losses) == len(LOSS_NAMES)
    assert int(net.step_counter.asnumpy()) == 1
    for param, grad in zip(net.trainable_params(), grads):
        moment = grad + WEIGHT_DECAY * before[param.name]              # first step: accumulator = grad + wd*w
        np.testing.assert_allclose(param.asnumpy(), before[param.name] - LR * moment, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(net.frozen_scale.asnumpy(), before["frozen_scale"])
    total = float(losses[-1].asnumpy())
    parts = [float(losses[LOSS_NAMES.index(n)].asnumpy()) for n in ("rpn_loss", "rcnn_loss")]
    assert total == pytest.approx(sum(parts), rel=1e-6)


def one_step(seed, **train_options):
    """(net, optimizer, weights before, reference gradients) after one step of a fresh train cell."""
    net, opt, cell = build_train_cell(**train_options)
    batch = make_batch(seed)
    before = snapshot(net.trainable_params())
    grads = [g.asnumpy() for g in reference_gradients(net, batch)]
    net.step_counter.set_data(Tensor(0, ms.int32))
    _, finite = cell(*batch)
    assert bool(finite)
    return net, opt, before, grads


def test_adamw_step_is_decoupled_weight_decay_adam():
    net, _, before, grads = one_step(4, loss_scale=64.0, optimizer="adamw")
    beta1, beta2, eps = 0.9, 0.999, 1e-6                                # nn.AdamWeightDecay defaults
    for param, grad in zip(net.trainable_params(), grads):
        first, second = (1 - beta1) * grad, (1 - beta2) * grad ** 2     # no bias correction in this optimizer
        update = first / (np.sqrt(second) + eps) + WEIGHT_DECAY * before[param.name]
        np.testing.assert_allclose(param.asnumpy(), before[param.name] - LR * update, rtol=1e-4, atol=1e-6)


def test_adam_step_is_bias_corrected_with_l2_weight_decay():
    net, opt, before, grads = one_step(6, optimizer="adam")
    beta1, beta2, eps = 0.9, 0.999, 1e-8                                # nn.Adam defaults
    for param, grad in zip(net.trainable_params(), grads):
        grad = grad + WEIGHT_DECAY * before[param.name]
        first, second = (1 - beta1) * grad, (1 - beta2) * grad ** 2
        step = LR * np.sqrt(1 - beta2) / (1 - beta1) * first / (np.sqrt(second) + eps)   # ~ LR * sign(grad)
        np.testing.assert_allclose(param.asnumpy(), before[param.name] - step, rtol=1e-4, atol=1e-6)
    assert float(opt.beta1_power.asnumpy()) == pytest.approx(beta1)


def test_gradients_are_clipped_to_the_global_norm():
    clip = 1e-3
    net, _, before, grads = one_step(5, grad_clip_norm=clip, weight_decay=0.0)
    norm = np.sqrt(sum(float((g.astype(np.float64) ** 2).sum()) for g in grads))
    assert norm > 10 * clip                                            # the clip is active in this test
    for param, grad in zip(net.trainable_params(), grads):
        np.testing.assert_allclose(param.asnumpy(), before[param.name] - LR * grad * clip / norm,
                                   rtol=1e-4, atol=1e-8)


def test_loss_scale_is_divided_out():
    results = []
    for scale in (1.0, 256.0):
        net, _, cell = build_train_cell(loss_scale=scale)
        batch = make_batch(1)
        for _ in range(2):
            losses, _ = cell(*batch)
        results.append((float(losses[-1].asnumpy()), snapshot(net.trainable_params())))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-5)
    for name, value in results[0][1].items():
        np.testing.assert_allclose(results[1][1][name], value, rtol=1e-4, atol=1e-6)


def test_nan_loss_skips_the_update_and_is_reported():
    net, opt, cell = build_train_cell(nan_at_step=1)
    batch = make_batch(2)
    losses, finite = cell(*batch)
    assert bool(finite)
    weights, moments = snapshot(net.trainable_params()), snapshot(opt.moments)
    losses, finite = cell(*batch)
    assert not bool(finite)
    assert np.isnan(float(losses[-1].asnumpy()))
    for name, value in snapshot(net.trainable_params()).items():
        np.testing.assert_array_equal(value, weights[name])
    for name, value in snapshot(opt.moments).items():
        np.testing.assert_array_equal(value, moments[name])
    named = {n: float(v.asnumpy()) for n, v in zip(LOSS_NAMES, losses)}
    with pytest.raises(NonFiniteLossError, match=r"epoch 1 step 2 \(global step 2\).*total_loss=nan"):
        check_finite(named, bool(finite), 1, 2, 2)


@pytest.mark.parametrize("grad_clip_norm", [0.0, 1e-3])
def test_nan_gradients_under_a_finite_loss_skip_the_update(grad_clip_norm):
    net, opt, cell = build_train_cell(nan_grad_at_step=1, grad_clip_norm=grad_clip_norm)
    batch = make_batch(2)
    assert bool(cell(*batch)[1])
    weights, moments = snapshot(net.trainable_params()), snapshot(opt.moments)
    losses, finite = cell(*batch)
    assert np.isfinite(float(losses[-1].asnumpy())) and not bool(finite)
    for name, value in snapshot(net.trainable_params()).items():
        np.testing.assert_array_equal(value, weights[name])
    for name, value in snapshot(opt.moments).items():
        np.testing.assert_array_equal(value, moments[name])
    assert bool(cell(*batch)[1])                            # the next step is finite again and trains


def test_dynamic_loss_scale_halves_and_skips_on_overflow_and_matches_the_fixed_step_otherwise():
    """Gradients overflowing at scale 3e38 skip the step and halve the scale; at a scale that fits, the step
    equals the fixed-scale one (the scale is divided out)."""
    net, opt, cell = build_train_cell(loss_scale=3e38, loss_scale_mode="dynamic")
    batch = make_batch(1)
    weights = snapshot(net.trainable_params())
    losses, finite = cell(*batch)
    assert not bool(finite) and np.isfinite(float(losses[-1].asnumpy()))
    assert float(cell.objective.loss_scale.asnumpy()) == pytest.approx(1.5e38)
    for name, value in snapshot(net.trainable_params()).items():
        np.testing.assert_array_equal(value, weights[name])
    dynamic_net, _, dynamic_cell = build_train_cell(loss_scale=256.0, loss_scale_mode="dynamic")
    fixed_net, _, fixed_cell = build_train_cell(loss_scale=256.0)
    for _ in range(2):
        assert bool(dynamic_cell(*batch)[1]) and bool(fixed_cell(*batch)[1])
    assert float(dynamic_cell.objective.loss_scale.asnumpy()) == 256.0      # grows only after the window
    fixed = snapshot(fixed_net.trainable_params())
    for name, value in snapshot(dynamic_net.trainable_params()).items():
        np.testing.assert_allclose(value, fixed[name], rtol=1e-6, atol=1e-7)


def test_check_finite_with_dynamic_scale_skips_gradient_overflow_but_not_a_nan_loss(capsys):
    check_finite({"total_loss": 1.0}, False, 1, 4, 4, overflow_skips=True)
    assert "gradients overflowed at global step 4" in capsys.readouterr().out
    with pytest.raises(NonFiniteLossError, match="total_loss=nan"):
        check_finite({"total_loss": float("nan")}, False, 1, 4, 4, overflow_skips=True)


def test_check_finite_catches_gradient_only_overflow():
    check_finite({"total_loss": 1.0}, True, 1, 1, 1)
    with pytest.raises(NonFiniteLossError, match="gradients are NaN/Inf"):
        check_finite({"total_loss": 1.0}, False, 3, 7, 27)


# ---------------------------------------------------------------- loggers



def record(step, total=1.0):
    losses = {name: total * (i + 1) / 10 for i, name in enumerate(LOSS_NAMES)}
    return StepRecord(epoch=2, step_in_epoch=step, global_step=10 + step, losses=losses, lr=0.01, step_time=0.25)


def test_loss_line_matches_the_recipe_format():
    line = format_loss_line(record(7393), LOSS_NAMES)
    match = RECIPE_LINE.match(line)
    assert match, line
    assert line.startswith("epoch:2 step:7393 ,rpn_loss:0.10000, rcnn_loss:0.20000, rpn_cls_loss:0.30000")
    assert line.endswith("total_loss:0.80000")


def test_monitor_averages_over_the_interval_and_flushes_the_rest(tmp_path):
    loss_log = LossLog(str(tmp_path / "loss_0.log"), LOSS_NAMES)
    metrics = MetricsLog(str(tmp_path / "metrics.jsonl"))
    stream = io.StringIO()
    progress = ProgressBar(total_epochs=3, steps_per_epoch=5, last_global_step=15, stream=stream)
    monitor = StepMonitor(LOSS_NAMES, log_interval=2, sinks=[loss_log, metrics], progress=progress)
    for step in range(1, 6):
        losses = np.arange(1, 9, dtype=np.float64) * step
        monitor.step(epoch=1, step_in_epoch=step, global_step=step, losses=losses, lr=0.001 * step,
                     step_time=10.0 if step == 1 else 0.5)
    monitor.flush()
    lines = open(tmp_path / "loss_0.log").read().splitlines()
    assert [RECIPE_LINE.match(line).group(2) for line in lines] == ["2", "4", "5"]
    assert RECIPE_LINE.match(lines[0]).group(3) == "1.50000"      # mean of rpn_loss 1 and 2
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [row["global_step"] for row in rows] == [2, 4, 5]
    assert rows[1]["total_loss"] == pytest.approx(8 * 3.5) and rows[1]["lr"] == pytest.approx(0.004)
    assert rows[0]["step_time_ms"] == pytest.approx(5250.0) and rows[2]["step_time_ms"] == pytest.approx(500.0)
    assert set(LOSS_NAMES) <= set(rows[0])
    console = stream.getvalue().splitlines()
    assert len(console) == 3 and "(incl. compile)" in console[0]
    # speed from steps 3..5 only (the compile step is excluded): 500 ms, 10 steps left -> 5 s
    assert console[2].startswith("epoch 1/3 step 5/5 [" + "#" * 24 + "]")
    assert "500 ms/step ETA 0:00:05" in console[2]
