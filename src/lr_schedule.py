"""Learning rate per global step: the recipe's warmup followed by a half-cosine decay.

The ModelZoo Mask R-CNN schedule, for global step i (0-based) on each device:
  steps_per_epoch = base_step // rank_size + rank_size   (data is sharded, so each device runs fewer steps)
  total_steps     = steps_per_epoch * total_epoch
  i <  warmup_step: linear from base_lr * warmup_ratio towards base_lr (or constant base_lr * warmup_ratio)
  i >= warmup_step: base_lr * (1 + cos(pi * (i - warmup_step) / total_steps)) / 2
The cosine spans total_steps (not total_steps - warmup_step) and total_epoch (13) exceeds the trained
epochs (12), so the rate never reaches zero: this is the recipe's choice, kept as is. Past total_steps the
rate is held at its last value. Values depend only on the global step, so a resumed run takes the slice
starting at its resumed step and continues exactly where the interrupted run stopped.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np

from src.config import TrainConfig


def schedule_total_steps(train: TrainConfig, rank_size: int = 1) -> int:
    """Length of the recipe's schedule for one device when training on `rank_size` devices."""
    if rank_size < 1:
        raise ValueError(f"rank_size must be >= 1, got {rank_size}")
    return (train.base_step // rank_size + rank_size) * train.total_epoch


def lr_at_step(train: TrainConfig, step: int, rank_size: int = 1) -> float:
    """Learning rate of global step `step` (0-based)."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    total = schedule_total_steps(train, rank_size)
    step = min(step, total - 1)
    if step < train.warmup_step:
        start = train.base_lr * train.warmup_ratio
        if train.warmup_mode == "constant":
            return start
        return start + (train.base_lr - start) * step / train.warmup_step
    progress = (step - train.warmup_step) / total
    return train.base_lr * (1.0 + math.cos(math.pi * progress)) / 2.0


def dynamic_lr(train: TrainConfig, rank_size: int = 1, start_step: int = 0,
               num_steps: Optional[int] = None) -> np.ndarray:
    """float32 (num_steps,) rates for global steps start_step .. start_step + num_steps - 1.

    `num_steps` defaults to the rest of the recipe's schedule. The optimizer indexes this table with its
    own counter, which starts at 0 in every run, hence the slice for a resumed run.
    """
    if num_steps is None:
        num_steps = max(schedule_total_steps(train, rank_size) - start_step, 0)
    return np.array([lr_at_step(train, start_step + i, rank_size) for i in range(num_steps)], dtype=np.float32)
