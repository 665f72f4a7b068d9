"""Learning rate per global step: the recipe's warmup followed by a half-cosine decay, optionally re-planned.

The ModelZoo Mask R-CNN schedule, for global step i (0-based) on each device:
  steps_per_epoch = base_step // rank_size + rank_size   (data is sharded, so each device runs fewer steps)
  total_steps     = steps_per_epoch * total_epoch
  i <  warmup_step: linear from base_lr * warmup_ratio towards base_lr (or constant base_lr * warmup_ratio)
  i >= warmup_step: base_lr * (1 + cos(pi * (i - warmup_step) / total_steps)) / 2
The cosine spans total_steps (not total_steps - warmup_step) and total_epoch (13) exceeds the trained
epochs (12), so the rate never reaches zero: this is the recipe's choice, kept as is. Past total_steps the
rate is held at its last value.

Re-plans (train.lr_replans, entries [r, T, w] with increasing r) change the length of a running schedule
without a jump. From step r on, the rate follows the fresh schedule of T steps with warmup w ("fresh(i)",
the formula above), re-timed to start at the current rate L = lr(r) of the schedule before the re-plan:
  r <  w: the ramp is re-aimed:  lr(i) = L + (base_lr - L) * (i - r) / (w - r)  for r <= i < w
          (constant warmup: L), and lr(i) = fresh(i) for i >= w;
  r >= w: the cosine continues from the phase whose rate is L, u_r = arccos(2 L / base_lr - 1) / pi, to
          the fresh schedule's last phase e = max((T - 1 - w) / T, u_r) at step T - 1:
          lr(i) = base_lr * (1 + cos(pi * (u_r + (e - u_r) * (min(i, T - 1) - r) / (T - 1 - r)))) / 2
          (held at L when T - 1 == r).
So lr(r) = L, the run ends at the rate a schedule planned for T steps from the start ends at (never above
the current rate), and a re-plan at or before the end of the warmup with an unchanged warmup is no change.
Values depend only on the global step and the config, so a resumed run takes the slice starting at its
resumed step and continues exactly where the interrupted run stopped.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np

from src.config import TrainConfig


def schedule_total_steps(train: TrainConfig, rank_size: int = 1) -> int:
    """Length of the schedule for one device when training on `rank_size` devices (the last re-plan's)."""
    if rank_size < 1:
        raise ValueError(f"rank_size must be >= 1, got {rank_size}")
    if train.lr_replans:
        return train.lr_replans[-1][1]
    return (train.base_step // rank_size + rank_size) * train.total_epoch


def _fresh(train: TrainConfig, step: int, total: int, warmup: int) -> float:
    """The recipe's warmup + cosine of `total` steps at `step` (held past the end)."""
    step = min(step, total - 1)
    if step < warmup:
        start = train.base_lr * train.warmup_ratio
        if train.warmup_mode == "constant":
            return start
        return start + (train.base_lr - start) * step / warmup
    return _cosine(train, (step - warmup) / total)


def _cosine(train: TrainConfig, phase: float) -> float:
    return train.base_lr * (1.0 + math.cos(math.pi * phase)) / 2.0


def _planned(train: TrainConfig, step: int, rank_size: int, plans: int) -> float:
    """Rate at `step` of the schedule made by the first `plans` re-plans."""
    if plans == 0:
        return _fresh(train, step, (train.base_step // rank_size + rank_size) * train.total_epoch, train.warmup_step)
    at, total, warmup = train.lr_replans[plans - 1]
    if step < at:
        return _planned(train, step, rank_size, plans - 1)
    current = _planned(train, at, rank_size, plans - 1)
    if at < warmup:
        if step >= warmup:
            return _fresh(train, step, total, warmup)
        if train.warmup_mode == "constant":
            return current
        return current + (train.base_lr - current) * (step - at) / (warmup - at)
    if total - 1 <= at:
        return current
    start_phase = math.acos(min(max(2.0 * current / train.base_lr - 1.0, -1.0), 1.0)) / math.pi
    end_phase = max((total - 1 - warmup) / total, start_phase)
    progress = (min(step, total - 1) - at) / (total - 1 - at)
    return _cosine(train, start_phase + (end_phase - start_phase) * progress)


def lr_at_step(train: TrainConfig, step: int, rank_size: int = 1) -> float:
    """Learning rate of global step `step` (0-based)."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if rank_size < 1:
        raise ValueError(f"rank_size must be >= 1, got {rank_size}")
    return _planned(train, step, rank_size, len(train.lr_replans))


def dynamic_lr(train: TrainConfig, rank_size: int = 1, start_step: int = 0,
               num_steps: Optional[int] = None) -> np.ndarray:
    """float32 (num_steps,) rates for global steps start_step .. start_step + num_steps - 1.

    `num_steps` defaults to the rest of the schedule. The optimizer indexes this table with its own
    counter, which starts at 0 in every run, hence the slice for a resumed run.
    """
    if num_steps is None:
        num_steps = max(schedule_total_steps(train, rank_size) - start_step, 0)
    return np.array([lr_at_step(train, start_step + i, rank_size) for i in range(num_steps)], dtype=np.float32)
