"""Training cells around MaskRcnnResnet50 and the per-step loggers of the training loop.

The model's training construct returns the eight recipe losses (``LOSS_NAMES``). ``MaskRcnnObjective``
turns them into (scaled total loss, all losses) so that gradients flow from the total only while all
eight are returned for logging. ``TrainOneStepCell`` runs forward + backward, averages gradients over
devices when data parallel, divides the loss scale out, optionally clips them to a global norm, checks
them for NaN/Inf and applies the configured optimizer (``build_optimizer``) only to finite gradients. The loss
scale is fixed (the recipe's) or dynamic: halved on every step whose gradients overflow (that step is skipped),
doubled after ``DYNAMIC_SCALE_WINDOW`` finite steps in a row.
"""
from __future__ import annotations

import json
import math
import os
import re
import sys
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, TextIO

import numpy as np

import mindspore as ms
from mindspore import nn, ops
from mindspore.communication import get_group_size

from src import atomic_io

TOTAL_LOSS = "total_loss"
LOSS_DECIMALS = 5                   # the recipe's loss log precision
BAR_WIDTH = 24                      # characters of the console progress bar
LOSS_LINE_POSITION = re.compile(r"epoch:(\d+) step:(\d+) ,")
DYNAMIC_SCALE_FACTOR = 2            # dynamic loss scale: the factor it is halved / doubled by
DYNAMIC_SCALE_WINDOW = 2000         # and the finite steps in a row after which it grows


class MaskRcnnObjective(nn.Cell):
    """(image, image_shape, box, label, valid_num, mask) -> (total_loss * loss_scale, *losses).

    The total is scaled by the loss scale (a float, or a Parameter when dynamic) so small gradients survive low
    precision; ``TrainOneStepCell`` divides the scale out of the gradients again.
    """

    def __init__(self, network: nn.Cell, loss_names: Sequence[str], loss_scale):
        super().__init__(auto_prefix=False)     # keep the model's parameter names in checkpoints
        self.network = network
        self.total_index = list(loss_names).index(TOTAL_LOSS)
        self.loss_scale = loss_scale

    def construct(self, image, image_shape, box, label, valid_num, mask):
        losses = self.network(image, image_shape, box, label, valid_num, mask)
        return (losses[self.total_index] * self.loss_scale,) + tuple(losses)


def _row_first_sum(x):
    """Sum of all elements, reduced along rows first: on CPU a row reduction plus a short final sum is
    faster than MindSpore's ReduceSum over the whole tensor (measured in bench/results.md)."""
    return x.reshape(x.shape[0], -1).sum(1).sum() if x.ndim > 1 else x.sum()


_squared_sum = ops.MultitypeFuncGraph("squared_sum")
_plain_sum = ops.MultitypeFuncGraph("plain_sum")


@_squared_sum.register("Tensor")
def _tensor_squared_sum(grad):
    return _row_first_sum(ops.square(grad))


@_plain_sum.register("Tensor")
def _tensor_plain_sum(grad):
    return _row_first_sum(grad)


def is_data_parallel() -> bool:
    return ms.get_auto_parallel_context("parallel_mode") in (ms.ParallelMode.DATA_PARALLEL,
                                                             ms.ParallelMode.HYBRID_PARALLEL)


class TrainOneStepCell(nn.Cell):
    """One optimizer step; returns (losses tuple, finite flag). Non-finite gradients leave all weights untouched.

    `grad_clip_norm` > 0 rescales the (unscaled) gradients to at most that global L2 norm: from scratch,
    the first steps' gradients are large, and clipping lets a higher learning rate train without diverging.
    One sum over all gradients (of squares when clipping) serves both the clip and the NaN/Inf check (a NaN or
    Inf anywhere makes it non-finite), which is much cheaper than a per-tensor isfinite().all() plus
    ops.clip_by_global_norm (bench/results.md). Without clipping the plain sum skips the squares (and
    overflows only past 3e38, where squares would past 2e19).
    """

    def __init__(self, objective: MaskRcnnObjective, optimizer: nn.Optimizer, grad_clip_norm: float = 0.0):
        super().__init__(auto_prefix=False)
        self.objective = objective
        self.optimizer = optimizer
        self.weights = optimizer.parameters
        self.grad_fn = ops.value_and_grad(objective, None, self.weights, has_aux=True)
        self.hyper_map = ops.HyperMap()
        self.dynamic_scale = isinstance(objective.loss_scale, ms.Parameter)
        self.scale_update = None
        if self.dynamic_scale:
            self.scale_update = nn.DynamicLossScaleUpdateCell(float(objective.loss_scale.asnumpy()),
                                                              DYNAMIC_SCALE_FACTOR, DYNAMIC_SCALE_WINDOW)
            self.inverse_loss_scale = 1.0
        else:
            self.inverse_loss_scale = 1.0 / objective.loss_scale
        self.grad_clip_norm = float(grad_clip_norm)
        self.rescales_gradients = (self.grad_clip_norm > 0.0 or self.inverse_loss_scale != 1.0
                                   or self.dynamic_scale)
        self.grad_reducer = ops.identity
        if is_data_parallel():
            self.grad_reducer = nn.DistributedGradReducer(
                self.weights, ms.get_auto_parallel_context("gradients_mean"), get_group_size())

    def construct(self, image, image_shape, box, label, valid_num, mask):
        outputs, grads = self.grad_fn(image, image_shape, box, label, valid_num, mask)
        losses = outputs[1:]
        grads = self.grad_reducer(grads)
        factor = self.inverse_loss_scale
        if self.dynamic_scale:
            factor = 1.0 / self.objective.loss_scale
        if self.grad_clip_norm > 0.0:
            scaled_norm_sq = ops.stack(self.hyper_map(_squared_sum, grads)).sum()
            finite = ops.isfinite(scaled_norm_sq) & ops.isfinite(outputs[0])
            norm = ops.sqrt(scaled_norm_sq) * factor
            factor = factor * self.grad_clip_norm / ops.maximum(norm, self.grad_clip_norm)
        else:
            finite = ops.isfinite(ops.stack(self.hyper_map(_plain_sum, grads)).sum()) & ops.isfinite(outputs[0])
        if self.dynamic_scale:
            finite = ops.depend(finite, self.scale_update(self.objective.loss_scale, ops.logical_not(finite)))
        if self.rescales_gradients:
            grads = self.hyper_map(ops.partial(ops.mul, factor), grads)
        if finite:
            losses = ops.depend(losses, self.optimizer(grads))
        return losses, finite


def build_optimizer(params, learning_rate, train_cfg) -> nn.Optimizer:
    """The configured optimizer: SGD momentum (the recipe), Adam (bias-corrected, L2 weight decay) or AdamW
    (MindSpore's AdamWeightDecay: decoupled weight decay, no bias correction, so its first few hundred
    steps are several times larger than Adam's)."""
    if train_cfg.optimizer == "adam":
        return nn.Adam(params, learning_rate, weight_decay=train_cfg.weight_decay)
    if train_cfg.optimizer == "adamw":
        return nn.AdamWeightDecay(params, learning_rate, weight_decay=train_cfg.weight_decay)
    return nn.Momentum(params, learning_rate, train_cfg.momentum, weight_decay=train_cfg.weight_decay)


def build_train_step(network: nn.Cell, loss_names: Sequence[str], train_cfg, learning_rate):
    """The configured optimizer over the trainable parameters and the one-step cell around it.

    Returns (optimizer, train_cell); `learning_rate` is a float or a per-step table (Tensor).
    """
    optimizer = build_optimizer(network.trainable_params(), learning_rate, train_cfg)
    loss_scale = train_cfg.loss_scale
    if train_cfg.loss_scale_mode == "dynamic":
        loss_scale = ms.Parameter(ms.Tensor(loss_scale, ms.float32), name="loss_scale", requires_grad=False)
    cell = TrainOneStepCell(MaskRcnnObjective(network, loss_names, loss_scale), optimizer,
                            train_cfg.grad_clip_norm)
    cell.set_train(True)
    return optimizer, cell


# ---------------------------------------------------------------- fault handling

class NonFiniteLossError(RuntimeError):
    """The loss or its gradients became NaN/Inf; training must stop without saving the bad state."""


def check_finite(losses: Dict[str, float], finite: bool, epoch: int, step_in_epoch: int, global_step: int,
                 overflow_skips: bool = False) -> None:
    """Raise NonFiniteLossError naming the step and the offending losses. With `overflow_skips` (dynamic loss
    scale) gradients overflowing under finite losses only skip the step, which this reports."""
    bad = {name: value for name, value in losses.items() if not math.isfinite(value)}
    if finite and not bad:
        return
    if overflow_skips and not bad:
        print(f"gradients overflowed at global step {global_step}: step skipped, loss scale halved", flush=True)
        return
    what = ", ".join(f"{name}={value}" for name, value in bad.items()) or "gradients are NaN/Inf"
    raise NonFiniteLossError(f"non-finite loss at epoch {epoch} step {step_in_epoch} (global step {global_step}): "
                             f"{what}; the weights of this step were not applied")


# ---------------------------------------------------------------- step logging

@dataclass
class StepRecord:
    """One logged step; losses and step time are means over the steps since the previous record."""
    epoch: int                  # 1-based, as in the recipe's log
    step_in_epoch: int          # 1-based
    global_step: int            # completed steps since the start of training
    losses: Dict[str, float]
    lr: float
    step_time: float            # seconds


def format_loss_line(record: StepRecord, loss_names: Sequence[str]) -> str:
    """The recipe's loss_<rank>.log line: 'epoch:1 step:7393 ,rpn_loss:0.10626, rcnn_loss:..., total_loss:...'."""
    values = ", ".join(f"{name}:{record.losses[name]:.{LOSS_DECIMALS}f}" for name in loss_names)
    return f"epoch:{record.epoch} step:{record.step_in_epoch} ,{values}"


def keep_log_lines(path: str, keep: Callable[[str], bool]) -> int:
    """Rewrite the log at `path` (atomically) with the complete lines `keep` accepts; returns lines dropped.

    A line without its newline is the torn last write of a killed run and is always dropped.
    """
    if not os.path.isfile(path):
        return 0
    with open(path, "r", encoding="utf-8") as handle:
        lines = handle.readlines()
    kept = [line for line in lines if line.endswith("\n") and keep(line)]
    if len(kept) != len(lines):
        atomic_io.write_text(path, "".join(kept))
    return len(lines) - len(kept)


class LossLog:
    """Appends the recipe's loss line; flushed per line so a killed run keeps its log."""

    def __init__(self, path: str, loss_names: Sequence[str]):
        self.path = path
        self.loss_names = list(loss_names)

    def truncate(self, global_step: int, steps_per_epoch: int) -> int:
        """Drop the lines of steps after `global_step` (a resumed run logs them again); returns lines dropped."""
        def keep(line: str) -> bool:
            position = LOSS_LINE_POSITION.match(line)
            if position is None:
                return True
            epoch, step_in_epoch = (int(v) for v in position.groups())
            return (epoch - 1) * steps_per_epoch + step_in_epoch <= global_step
        return keep_log_lines(self.path, keep)

    def write(self, record: StepRecord) -> None:
        with open(self.path, "a", encoding="utf-8") as out:
            out.write(format_loss_line(record, self.loss_names) + "\n")


class MetricsLog:
    """metrics.jsonl: one JSON object per logged step (losses, lr, step time) for plotting."""

    def __init__(self, path: str):
        self.path = path

    def truncate(self, global_step: int, steps_per_epoch: int) -> int:
        """Drop the rows of steps after `global_step` (a resumed run logs them again); returns rows dropped."""
        def keep(line: str) -> bool:
            try:
                return int(json.loads(line)["global_step"]) <= global_step
            except (ValueError, KeyError, TypeError):
                return False
        return keep_log_lines(self.path, keep)

    def write(self, record: StepRecord) -> None:
        row = {"epoch": record.epoch, "step": record.step_in_epoch, "global_step": record.global_step,
               **record.losses, "lr": record.lr, "step_time_ms": record.step_time * 1000.0}
        with open(self.path, "a", encoding="utf-8") as out:
            out.write(json.dumps(row) + "\n")


def _format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class ProgressBar:
    """Console progress: epoch, step, bar, total loss, lr, ms/step and ETA of the run.

    On a terminal the line is redrawn in place; otherwise (a log file) one line per record is printed.
    The first step of a process includes graph compilation and is left out of the speed estimate.
    """

    def __init__(self, total_epochs: int, steps_per_epoch: int, last_global_step: int,
                 stream: Optional[TextIO] = None):
        self.total_epochs = total_epochs
        self.steps_per_epoch = steps_per_epoch
        self.last_global_step = last_global_step
        self.stream = stream or sys.stdout
        self.in_place = self.stream.isatty()
        self.timed_steps = 0
        self.timed_seconds = 0.0

    def add_timing(self, steps: int, seconds: float, includes_compile: bool) -> None:
        if not includes_compile:
            self.timed_steps += steps
            self.timed_seconds += seconds

    def write(self, record: StepRecord) -> None:
        done = int(BAR_WIDTH * record.step_in_epoch / self.steps_per_epoch)
        bar = "#" * done + "-" * (BAR_WIDTH - done)
        if self.timed_steps:
            per_step = self.timed_seconds / self.timed_steps
            remaining = per_step * (self.last_global_step - record.global_step)
            speed = f"{per_step * 1000:.0f} ms/step ETA {_format_duration(remaining)}"
        else:
            speed = f"{record.step_time * 1000:.0f} ms/step (incl. compile)"
        line = (f"epoch {record.epoch}/{self.total_epochs} step {record.step_in_epoch}/{self.steps_per_epoch} "
                f"[{bar}] {TOTAL_LOSS} {record.losses[TOTAL_LOSS]:.4f} lr {record.lr:.6f} {speed}")
        if self.in_place:
            end = "\n" if record.step_in_epoch == self.steps_per_epoch else ""
            self.stream.write("\r" + line + end)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


class StepMonitor:
    """Averages losses and step times over `log_interval` steps and hands each record to the sinks."""

    def __init__(self, loss_names: Sequence[str], log_interval: int, sinks: List, progress: Optional[ProgressBar]):
        self.loss_names = list(loss_names)
        self.log_interval = log_interval
        self.sinks = sinks + ([progress] if progress else [])
        self.progress = progress
        self._reset()
        self._first_step = True

    def _reset(self) -> None:
        self._sums = np.zeros(len(self.loss_names), np.float64)
        self._count = 0
        self._seconds = 0.0
        self._includes_compile = False

    def step(self, epoch: int, step_in_epoch: int, global_step: int, losses: np.ndarray, lr: float,
             step_time: float) -> None:
        """Account one completed step (epoch and step_in_epoch 1-based)."""
        self._sums += losses
        self._count += 1
        self._seconds += step_time
        self._includes_compile |= self._first_step
        self._first_step = False
        self._position = (epoch, step_in_epoch, global_step, lr)
        if self._count >= self.log_interval:
            self.flush()

    def flush(self) -> None:
        """Write the pending partial interval (called at the end of each epoch and of the run)."""
        if not self._count:
            return
        epoch, step_in_epoch, global_step, lr = self._position
        means = self._sums / self._count
        record = StepRecord(epoch, step_in_epoch, global_step,
                            {name: float(value) for name, value in zip(self.loss_names, means)},
                            lr, self._seconds / self._count)
        if self.progress:
            self.progress.add_timing(self._count, self._seconds, self._includes_compile)
        for sink in self.sinks:
            sink.write(record)
        self._reset()


def open_step_monitor(output_dir: str, rank: int, loss_names: Sequence[str], log_interval: int,
                      total_epochs: int, steps_per_epoch: int, last_global_step: int,
                      resumed_step: Optional[int] = None) -> StepMonitor:
    """loss_<rank>.log on every rank; metrics.jsonl and the console progress bar on rank 0 only.

    A run resumed at `resumed_step` first cuts both logs back to it, so that the steps between the
    checkpoint and the interruption are logged once, by this run.
    """
    os.makedirs(output_dir, exist_ok=True)
    sinks: List = [LossLog(os.path.join(output_dir, f"loss_{rank}.log"), loss_names)]
    progress = None
    if rank == 0:
        sinks.append(MetricsLog(os.path.join(output_dir, "metrics.jsonl")))
        progress = ProgressBar(total_epochs, steps_per_epoch, last_global_step)
    if resumed_step is not None:
        for sink in sinks:
            dropped = sink.truncate(resumed_step, steps_per_epoch)
            if dropped:
                print(f"{sink.path}: dropped {dropped} lines logged after global step {resumed_step} "
                      f"(they are trained again)", flush=True)
    return StepMonitor(loss_names, log_interval, sinks, progress)

