"""The training run: devices, data, model, optimizer, resume, and the step loop with logs and checkpoints.

train.py is its command line; tests drive `train` directly with small models.
"""
from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import numpy as np

import mindspore as ms
from mindspore import Tensor, nn

from src import atomic_io, compile_cache
from src.checkpoint import (CheckpointManager, TrainingState, find_checkpoints, format_load_report, load_pretrained,
                            load_resume_point)
from src.config import Config
from src.amp import set_precision
from src.device import release_free_heap, set_device
from src.lr_schedule import dynamic_lr

COMM_BACKENDS = {"Ascend": "hccl", "GPU": "nccl", "CPU": "mccl"}


@dataclass
class RunOptions:
    """What a run needs beyond the config (train.py's options)."""
    output_dir: str = "."
    pre_trained: str = ""         # backbone or full checkpoint to start from (unused when resuming)
    resume: str = ""              # checkpoint to continue from, "auto" for the newest in the checkpoint dir
    run_distribute: bool = False
    max_steps: int = 0            # 0 = all epochs
    deadline: float = 0.0         # Unix time; 0 = none
    compile_command: Tuple[str, ...] = ()   # re-runs this training (train.py's command): compile_cache.compile_apart


# ---------------------------------------------------------------- setup

def init_devices(cfg: Config, distributed: bool):
    """Graph mode on the configured device; for data parallel also the communication group.

    Returns (rank, group_size).
    """
    device_id = os.getenv("DEVICE_ID")
    cfg.train.device_target = set_device(cfg.train.device_target, None if device_id is None else int(device_id))
    if not distributed:
        return 0, 1
    from mindspore.communication import get_group_size, get_rank, init
    init(COMM_BACKENDS[cfg.train.device_target])
    group_size = get_group_size()
    ms.set_auto_parallel_context(parallel_mode=ms.ParallelMode.DATA_PARALLEL, gradients_mean=True,
                                 device_num=group_size)
    return get_rank(), group_size


def wait_for_all_ranks() -> None:
    """A barrier built from an all-reduce (the Barrier op has no CPU kernel)."""
    ms.ops.AllReduce()(Tensor(np.ones(1, np.float32))).asnumpy()


def prepare_mindrecord(cfg: Config, rank: int, group_size: int):
    """Convert the training set on rank 0 if needed; the other ranks then reuse the finished files."""
    from src.data.conversion import data_to_mindrecord
    if rank == 0:
        files = data_to_mindrecord(cfg, is_training=True)
    if group_size > 1:
        wait_for_all_ranks()
    if rank != 0:
        files = data_to_mindrecord(cfg, is_training=True)
    return files


def checkpoint_dir(cfg: Config, output_dir: str) -> str:
    path = cfg.train.save_checkpoint_path
    return os.path.normpath(path if os.path.isabs(path) else os.path.join(output_dir, path))


def resolve_resume(resume: str, directory: str) -> Optional[str]:
    if resume != "auto":
        return resume or None
    found = find_checkpoints(directory)
    if not found:
        print(f"--resume auto: no checkpoint in {directory}; starting from the beginning", flush=True)
        return None
    return found[-1]


def parameter_fingerprint(network: nn.Cell) -> str:
    """sha256 over all model parameters in name order: equal on every rank of a healthy data-parallel run."""
    digest = hashlib.sha256()
    for param in sorted(network.get_parameters(), key=lambda p: p.name):
        digest.update(param.name.encode())
        digest.update(np.ascontiguousarray(param.asnumpy()).tobytes())
    return digest.hexdigest()


# ---------------------------------------------------------------- training

class TrainingLoop:
    """SGD steps from a TrainingState to `last_step`: data position, logging, NaN stop and checkpoints."""

    def __init__(self, train_cfg, epoch_dataset: Callable, train_cell: nn.Cell, optimizer, network: nn.Cell,
                 lr_table: np.ndarray, monitor, manager: Optional[CheckpointManager], loss_names: Sequence[str]):
        self.tr = train_cfg
        self.epoch_dataset = epoch_dataset
        self.train_cell = train_cell
        self.optimizer = optimizer
        self.network = network
        self.lr_table = lr_table
        self.monitor = monitor
        self.manager = manager
        self.loss_names = list(loss_names)
        self.last_losses: Optional[np.ndarray] = None
        self._saved_at = -1

    def save(self, state: TrainingState) -> None:
        """Write a checkpoint (rank 0) unless this step is already saved."""
        if self.manager and state.global_step != self._saved_at:
            print(f"saved {self.manager.save(self.network, self.optimizer, state)}", flush=True)
            self._saved_at = state.global_step

    def run(self, state: TrainingState, last_step: int, deadline: float = 0.0) -> TrainingState:
        """Train until global step `last_step`, or until the next step would end after Unix time `deadline`."""
        from src.network_define import check_finite

        self._saved_at = state.global_step
        first_step = state.global_step
        start_epoch, skip = state.next_position()
        clock = time.perf_counter()
        try:
            for epoch in range(start_epoch, self.tr.epoch_size):
                dataset = self.epoch_dataset(epoch)
                if skip:
                    dataset = dataset.skip(skip)          # batches the interrupted run already trained on
                step_in_epoch, skip = skip, 0
                for batch in dataset.create_tuple_iterator(num_epochs=1):
                    if state.global_step == first_step:        # compile apart, then drop what compiling left
                        self.train_cell.compile(*batch)
                        release_free_heap()
                    losses, finite = self.train_cell(*batch)
                    compile_cache.publish()
                    self.last_losses = np.array([float(loss.asnumpy()) for loss in losses])
                    now = time.perf_counter()
                    step_time, clock = now - clock, now
                    step_in_epoch += 1
                    state = TrainingState(epoch, step_in_epoch, state.global_step + 1, state.steps_per_epoch)
                    check_finite(dict(zip(self.loss_names, self.last_losses)), bool(finite.asnumpy()), epoch + 1,
                                 step_in_epoch, state.global_step, self.tr.loss_scale_mode == "dynamic")
                    self.monitor.step(epoch + 1, step_in_epoch, state.global_step, self.last_losses,
                                      float(self.lr_table[state.global_step - first_step - 1]), step_time)
                    if self.tr.save_checkpoint_steps and state.global_step % self.tr.save_checkpoint_steps == 0:
                        self.save(state)
                    if deadline and state.global_step < last_step and time.time() + step_time > deadline:
                        print(f"deadline reached: stopping at global step {state.global_step} of {last_step}",
                              flush=True)
                        last_step = state.global_step
                    if state.global_step >= last_step:
                        break
                self.monitor.flush()
                epoch_done = state.step_in_epoch == state.steps_per_epoch
                if epoch_done and (epoch + 1) % self.tr.save_checkpoint_epochs == 0:
                    self.save(state)
                if state.global_step >= last_step:
                    break
            self.save(state)                              # the final state, also when stopped early
        finally:
            self.monitor.flush()
        return state


def start_state(options: RunOptions, net: nn.Cell, ckpt_dir: str, steps_per_epoch: int, is_main: bool):
    """(TrainingState, ResumePoint or None): a resumed run restores the model; a new one may load --pre_trained."""
    resume_path = resolve_resume(options.resume, ckpt_dir)
    if resume_path:
        resume = load_resume_point(resume_path, steps_per_epoch)
        resume.restore_network(net)
        if is_main:
            unused = f" (--pre_trained {options.pre_trained} is not used)" if options.pre_trained else ""
            print(f"resumed from {resume_path} at global step {resume.state.global_step}{unused}", flush=True)
        return resume.state, resume
    if options.pre_trained:
        report = load_pretrained(options.pre_trained, net)
        if is_main:
            print(format_load_report(report), flush=True)
    return TrainingState(epoch=0, step_in_epoch=0, global_step=0, steps_per_epoch=steps_per_epoch), None


def train(options: RunOptions, cfg: Config, build_model: Optional[Callable[[Config], nn.Cell]] = None) -> int:
    """Run (or continue) training; `build_model` defaults to MaskRcnnResnet50 (tests pass small models)."""
    from src.data.pipeline import create_maskrcnn_dataset
    from src.maskrcnn.mask_rcnn_r50 import LOSS_NAMES, MaskRcnnResnet50, model_summary
    from src.network_define import build_train_step, open_step_monitor

    tr = cfg.train
    rank, group_size = init_devices(cfg, options.run_distribute)
    ms.set_seed(tr.seed)
    is_main = rank == 0
    ckpt_dir = checkpoint_dir(cfg, options.output_dir)
    files = prepare_mindrecord(cfg, rank, group_size)

    def epoch_dataset(epoch: int):
        return create_maskrcnn_dataset(cfg, files, True, tr.batch_size, group_size, rank, epoch=epoch)

    steps_per_epoch = epoch_dataset(0).get_dataset_size()
    total_steps = tr.epoch_size * steps_per_epoch
    last_step = min(total_steps, options.max_steps) if options.max_steps else total_steps

    net = (build_model or MaskRcnnResnet50)(cfg)
    net.set_train(True)
    net = set_precision(net, tr.amp_level, tr.device_target, announce=is_main)
    state, resume = start_state(options, net, ckpt_dir, steps_per_epoch, is_main)
    if is_main:
        print(f"{model_summary(net, cfg)}; batch {tr.batch_size} per device x {group_size} device(s), "
              f"{steps_per_epoch} steps per epoch", flush=True)
    if state.global_step >= last_step:
        print(f"nothing to do: {state.global_step} steps done, the run ends at {last_step}", flush=True)
        return 0

    # the optimizer indexes its lr table from 0 in every run, so the table starts at the resumed step
    schedule_start = tr.pretrain_epoch_size * steps_per_epoch + state.global_step
    lr_table = dynamic_lr(tr, group_size, schedule_start, last_step - state.global_step)
    optimizer, train_cell = build_train_step(net, LOSS_NAMES, tr, Tensor(lr_table))
    if resume:
        resume.restore_optimizer(optimizer)
    if group_size == 1 and build_model is None:   # ranks would share one entry; other models are not keyed
        # the lr table is a parameter whose length is part of the graph
        compile_cache.enable(cfg, cfg.train.device_target, f"train-{len(lr_table)}")
        if compile_cache.compile_only():
            train_cell.compile(*next(epoch_dataset(0).create_tuple_iterator(num_epochs=1)))
            compile_cache.publish()
            return 0
        compile_cache.compile_apart(options.compile_command)
    manager = CheckpointManager(ckpt_dir, tr.keep_checkpoint_max) if is_main and tr.save_checkpoint else None
    # also `--resume auto` that found no checkpoint: a run killed before its first save logged steps from 1
    monitor = open_step_monitor(options.output_dir, rank, LOSS_NAMES, tr.log_interval, tr.epoch_size,
                                steps_per_epoch, last_step, resumed_step=state.global_step if options.resume else None)
    loop = TrainingLoop(tr, epoch_dataset, train_cell, optimizer, net, lr_table, monitor, manager, LOSS_NAMES)

    run_start, first_step = time.perf_counter(), state.global_step
    state = loop.run(state, last_step, options.deadline)
    elapsed = time.perf_counter() - run_start
    summary = {"rank": rank, "group_size": group_size, "global_step": state.global_step,
               "epoch": state.epoch + 1, "step_in_epoch": state.step_in_epoch,
               "steps_this_run": state.global_step - first_step, "seconds_this_run": elapsed,
               "final_losses": dict(zip(LOSS_NAMES, loop.last_losses.tolist())),
               "parameter_sha256": parameter_fingerprint(net),
               "latest_checkpoint": manager.latest() if manager else None}
    atomic_io.write_json(os.path.join(options.output_dir, f"train_summary_{rank}.json"), summary)
    if is_main:
        print(f"done: {summary['steps_this_run']} steps in {elapsed:.1f} s, global step {state.global_step}",
              flush=True)
    return 0


