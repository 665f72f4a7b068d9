"""Schedule values at key steps, hand-computed from the recipe's formula (base_lr 0.02, warmup 500 at 1/3)."""
import math

import numpy as np
import pytest

from src.config import TrainConfig, load_config
from src.lr_schedule import dynamic_lr, lr_at_step, schedule_total_steps

RECIPE = load_config().train


def test_total_steps_scale_with_devices():
    assert schedule_total_steps(RECIPE, 1) == (58633 + 1) * 13 == 762242
    assert schedule_total_steps(RECIPE, 8) == (7329 + 8) * 13 == 95381


def test_linear_warmup_starts_at_ratio_and_climbs_linearly():
    assert lr_at_step(RECIPE, 0) == pytest.approx(0.02 / 3, rel=1e-12)
    assert lr_at_step(RECIPE, 250) == pytest.approx(0.02 / 3 + (0.02 - 0.02 / 3) * 0.5, rel=1e-12)
    assert lr_at_step(RECIPE, 499) == pytest.approx(0.02 / 3 + (0.02 - 0.02 / 3) * 499 / 500, rel=1e-12)


def test_cosine_after_warmup():
    assert lr_at_step(RECIPE, 500) == pytest.approx(0.02, rel=1e-12)
    # a quarter period: (1 + cos(pi/2)) / 2 = 0.5
    assert lr_at_step(RECIPE, 500 + 762242 // 2) == pytest.approx(0.01, rel=1e-12)
    # the recipe trains 12 of the 13 scheduled epochs: last trained step, single device
    last = 12 * 58634 - 1
    expected = 0.02 * (1 + math.cos(math.pi * (last - 500) / 762242)) / 2
    assert lr_at_step(RECIPE, last) == pytest.approx(expected, rel=1e-12)
    assert 0.0 < expected < 0.001


def test_eight_devices_use_their_shorter_schedule():
    assert lr_at_step(RECIPE, 500 + 95381 // 2, rank_size=8) == pytest.approx(
        0.02 * (1 + math.cos(math.pi * (95381 // 2) / 95381)) / 2, rel=1e-12)
    assert lr_at_step(RECIPE, 10000, rank_size=8) < lr_at_step(RECIPE, 10000, rank_size=1)


def test_constant_warmup_and_hold_after_end():
    train = TrainConfig(base_lr=0.1, base_step=10, total_epoch=2, warmup_step=4, warmup_mode="constant",
                        warmup_ratio=0.25)
    assert [lr_at_step(train, i) for i in range(4)] == [pytest.approx(0.025)] * 4
    total = schedule_total_steps(train)                  # (10 + 1) * 2 = 22
    assert total == 22
    assert lr_at_step(train, 100) == lr_at_step(train, total - 1)
    assert lr_at_step(train, total - 1) == pytest.approx(0.1 * (1 + math.cos(math.pi * 17 / 22)) / 2)


def test_no_warmup_starts_at_base_lr():
    train = TrainConfig(base_lr=0.05, base_step=10, total_epoch=1, warmup_step=0)
    assert lr_at_step(train, 0) == pytest.approx(0.05)


def test_resume_slice_equals_the_full_table():
    tiny = load_config("tiny").train
    full = dynamic_lr(tiny, rank_size=1)
    assert full.dtype == np.float32 and full.shape == (schedule_total_steps(tiny),)
    np.testing.assert_array_equal(dynamic_lr(tiny, start_step=3, num_steps=4), full[3:7])
    np.testing.assert_array_equal(dynamic_lr(tiny, start_step=5), full[5:])


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="step"):
        lr_at_step(RECIPE, -1)
    with pytest.raises(ValueError, match="rank_size"):
        schedule_total_steps(RECIPE, 0)
