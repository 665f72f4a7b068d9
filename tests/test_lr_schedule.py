"""Schedule values at key steps, hand-computed from the recipe's formula (base_lr 0.02, warmup 500 at 1/3), and
re-planned schedules: continuous at every re-plan, ending where the last plan ends, equal across resumes."""
import dataclasses
import json
import math

import numpy as np
import pytest

from src.config import ConfigError, TrainConfig, load_config
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


# ---------------------------------------------------------------- re-planned schedules

DEMO = load_config("demo").train                    # 3e-4, warmup 50 at 1/3, base schedule 501 steps
DEMO_REPLANS = [[6, 1300, 50], [437, 1100, 50], [735, 1250, 50]]   # calibration, then shorter, then longer


def replanned(replans, base=DEMO):
    return dataclasses.replace(base, lr_replans=[list(e) for e in replans])


def fresh(total, warmup, base=DEMO):
    return dataclasses.replace(base, base_step=total - 1, total_epoch=1, warmup_step=warmup)


def test_a_replanned_curve_has_no_jump_and_ends_as_planned():
    train = replanned(DEMO_REPLANS)
    rates = dynamic_lr(train).astype(np.float64)
    assert len(rates) == 1250 and schedule_total_steps(train) == 1250
    steps = np.abs(np.diff(rates))                  # steps[i - 1] = |lr(i) - lr(i - 1)|
    for at, _, _ in DEMO_REPLANS:
        neighbours = np.concatenate([steps[at - 6:at - 1], steps[at:at + 5]])
        assert steps[at - 1] <= 1.5 * neighbours.max(), f"jump at re-plan step {at}"
    assert steps[50:].max() < 2e-3 * DEMO.base_lr                  # the whole cosine: smooth
    # the end: the rate a 1250-step plan made at the start ends at (below 3 % of base_lr)
    assert rates[-1] == pytest.approx(lr_at_step(fresh(1250, 50), 1249), rel=1e-6)
    assert rates[-1] < 0.03 * DEMO.base_lr
    assert np.all(np.diff(rates[50:]) <= 0)                        # decays monotonically after the warmup


def test_replans_without_continuation_would_jump():
    """What the demo did before: each segment a fresh schedule of its new total (the test above must differ)."""
    old = [lr_at_step(fresh(1300, 50), 436), lr_at_step(fresh(1100, 50), 437)]
    new = [lr_at_step(replanned(DEMO_REPLANS), s) for s in (436, 437)]
    assert abs(old[1] - old[0]) > 20 * abs(new[1] - new[0])


def test_a_replan_at_the_warmup_with_the_same_warmup_is_the_fresh_schedule():
    np.testing.assert_allclose(dynamic_lr(replanned([[6, 1300, 50]])), dynamic_lr(fresh(1300, 50)), rtol=1e-6)
    np.testing.assert_allclose(dynamic_lr(replanned([[50, 400, 50]])), dynamic_lr(fresh(400, 50)), rtol=1e-6)


def test_a_replan_inside_the_warmup_re_aims_the_ramp():
    train = replanned([[6, 200, 20]])              # a short run: the warmup shrinks from 50 to 20 steps
    at6 = lr_at_step(DEMO, 6)
    assert lr_at_step(train, 6) == pytest.approx(at6, rel=1e-12)
    assert lr_at_step(train, 13) == pytest.approx(at6 + (DEMO.base_lr - at6) * 7 / 14, rel=1e-12)
    assert lr_at_step(train, 20) == pytest.approx(DEMO.base_lr, rel=1e-12)
    assert lr_at_step(train, 120) == pytest.approx(lr_at_step(fresh(200, 20), 120), rel=1e-12)
    constant = replanned([[6, 200, 20]], dataclasses.replace(DEMO, warmup_mode="constant"))
    assert lr_at_step(constant, 19) == pytest.approx(DEMO.base_lr / 3, rel=1e-12)


def test_a_replan_past_the_planned_end_never_raises_the_rate():
    train = replanned([[6, 1000, 50], [900, 950, 50]])   # 950 steps' end phase is below the current one
    rates = dynamic_lr(train)
    assert np.all(np.diff(rates[899:]) <= 0) and rates[-1] < rates[899]
    held = replanned([[6, 1000, 50], [900, 901, 50]])    # one step left: held at the current rate
    current = lr_at_step(replanned([[6, 1000, 50]]), 900)
    assert lr_at_step(held, 900) == pytest.approx(current, rel=1e-12) == lr_at_step(held, 5000)


def test_resumed_segments_get_the_rates_of_the_whole_run():
    """Each demo segment runs with the plans made so far: its rates equal the final config's."""
    final = dynamic_lr(replanned(DEMO_REPLANS))
    for count in range(1, len(DEMO_REPLANS) + 1):
        start = DEMO_REPLANS[count - 1][0]
        stop = DEMO_REPLANS[count][0] if count < len(DEMO_REPLANS) else len(final)
        segment = dynamic_lr(replanned(DEMO_REPLANS[:count]), start_step=start, num_steps=stop - start)
        np.testing.assert_array_equal(segment, final[start:stop])
    train = replanned(DEMO_REPLANS)
    np.testing.assert_array_equal(dynamic_lr(train, start_step=500, num_steps=300), final[500:800])


@pytest.mark.parametrize("replans, message", [
    ([[6, 100]], "entries are"),
    ([[6, 100, 5], [6, 200, 5]], "must increase"),
    ([[10, 10, 5]], "total_steps > at_step"),
    ([[-1, 10, 5]], "must increase"),
])
def test_bad_replans_are_named(replans, message):
    with pytest.raises(ConfigError, match=f"train.lr_replans.*{message}"):
        load_config("demo", {"train.lr_replans": json.dumps(replans)})
