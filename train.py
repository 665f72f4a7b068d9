"""Train Mask R-CNN (ResNet50-FPN) with the ModelZoo recipe; resumable, single device or data parallel.

    python train.py --config configs/coco.yaml [--pre_trained backbone.ckpt] [--key value ...]
    python train.py --config tiny --coco_root data/synthetic_coco --max_steps 20
    python train.py ... --resume auto            # continue from the newest checkpoint of the output dir

Any config key can be overridden (`--train.base_lr 0.01` or a unique leaf `--base_lr 0.01`). Outputs in
--output_dir: loss_<rank>.log (the recipe's loss lines), metrics.jsonl (rank 0), train_summary_<rank>.json,
and checkpoints under train.save_checkpoint_path (relative to --output_dir unless absolute, rank 0 only).
"""
from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from typing import Callable, Optional, Sequence

import numpy as np

import mindspore as ms
from mindspore import Tensor, nn

from src.checkpoint import (CheckpointError, CheckpointManager, TrainingState, find_checkpoints,
                            format_load_report, load_pretrained, load_resume_point)
from src.config import Config, ConfigError, config_from_args, resolved_paths, set_value, validate
from src.device import AUTO, set_device
from src.lr_schedule import dynamic_lr

COMM_BACKENDS = {"Ascend": "hccl", "GPU": "nccl", "CPU": "mccl"}
# script option -> config key it sets (the script option wins over a config override of the same key)
OPTION_KEYS = {"device_target": "train.device_target", "dataset": "data.dataset",
               "mindrecord_dir": "data.mindrecord_dir", "coco_root": "data.coco_root", "seed": "train.seed"}
EXIT_TRAINING_ERROR = 1


def _flag(value: str) -> bool:
    if value.lower() in ("true", "1", "yes"):
        return True
    if value.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got '{value}'")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device_target", choices=[AUTO, *sorted(COMM_BACKENDS)],
                        help="sets train.device_target (auto: Ascend, then GPU, then CPU)")
    parser.add_argument("--dataset", choices=("coco", "other"), help="sets data.dataset")
    parser.add_argument("--mindrecord_dir", help="sets data.mindrecord_dir (converted on first use)")
    parser.add_argument("--coco_root", help="sets data.coco_root")
    parser.add_argument("--seed", type=int, help="sets train.seed (weights init, data order, augmentation)")
    parser.add_argument("--pre_trained", default="",
                        help="converted ResNet50 backbone or full Mask R-CNN checkpoint to start from")
    parser.add_argument("--run_distribute", type=_flag, nargs="?", const=True, default=False,
                        help="data parallel over all ranks (msrun or an Ascend rank table)")
    parser.add_argument("--output_dir", default=".", help="logs, metrics and checkpoints go here")
    parser.add_argument("--resume", default="",
                        help="training checkpoint to continue from, or 'auto' for the newest in the output dir")
    parser.add_argument("--max_steps", type=int, default=0,
                        help="stop (and save) once this many global steps are done; 0 = train all epochs")
    parser.add_argument("--deadline", type=float, default=0.0,
                        help="Unix time: stop (and save) before a step that would end after it; 0 = no deadline")
    return parser


def parse_args(argv: Optional[Sequence[str]] = None):
    """Script options + config; every value is validated before any data is touched."""
    parser = build_parser()
    args, cfg = config_from_args(parser, argv)
    try:
        for option, key in OPTION_KEYS.items():
            if getattr(args, option) is not None:
                set_value(cfg, key, getattr(args, option))
        validate(cfg)
    except ConfigError as err:
        parser.error(str(err))
    if args.max_steps < 0:
        parser.error(f"--max_steps must be >= 0, got {args.max_steps}")
    if args.deadline < 0:
        parser.error(f"--deadline must be a Unix time >= 0 (0 = none), got {args.deadline}")
    if args.deadline and args.run_distribute:
        # each rank would read its own clock, stop at its own step and leave the others waiting in AllReduce
        parser.error("--deadline works for standalone training only, not with --run_distribute")
    return args, cfg


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
    from src.dataset import data_to_mindrecord
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
                    losses, finite = self.train_cell(*batch)
                    self.last_losses = np.array([float(loss.asnumpy()) for loss in losses])
                    now = time.perf_counter()
                    step_time, clock = now - clock, now
                    step_in_epoch += 1
                    state = TrainingState(epoch, step_in_epoch, state.global_step + 1, state.steps_per_epoch)
                    check_finite(dict(zip(self.loss_names, self.last_losses)), bool(finite.asnumpy()), epoch + 1,
                                 step_in_epoch, state.global_step)
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


def start_state(args, net: nn.Cell, ckpt_dir: str, steps_per_epoch: int, is_main: bool):
    """(TrainingState, ResumePoint or None): a resumed run restores the model; a new one may load --pre_trained."""
    resume_path = resolve_resume(args.resume, ckpt_dir)
    if resume_path:
        resume = load_resume_point(resume_path, steps_per_epoch)
        resume.restore_network(net)
        if is_main:
            unused = f" (--pre_trained {args.pre_trained} is not used)" if args.pre_trained else ""
            print(f"resumed from {resume_path} at global step {resume.state.global_step}{unused}", flush=True)
        return resume.state, resume
    if args.pre_trained:
        report = load_pretrained(args.pre_trained, net)
        if is_main:
            print(format_load_report(report), flush=True)
    return TrainingState(epoch=0, step_in_epoch=0, global_step=0, steps_per_epoch=steps_per_epoch), None


def train(args, cfg: Config, build_model: Optional[Callable[[Config], nn.Cell]] = None) -> int:
    """Run (or continue) training; `build_model` defaults to MaskRcnnResnet50 (tests pass small models)."""
    from src.dataset import create_maskrcnn_dataset
    from src.maskrcnn.mask_rcnn_r50 import LOSS_NAMES, MaskRcnnResnet50, model_summary
    from src.network_define import build_train_step, open_step_monitor
    from src.util import write_json_atomic

    tr = cfg.train
    rank, group_size = init_devices(cfg, args.run_distribute)
    ms.set_seed(tr.seed)
    is_main = rank == 0
    ckpt_dir = checkpoint_dir(cfg, args.output_dir)
    files = prepare_mindrecord(cfg, rank, group_size)

    def epoch_dataset(epoch: int):
        return create_maskrcnn_dataset(cfg, files, True, tr.batch_size, group_size, rank, epoch=epoch)

    steps_per_epoch = epoch_dataset(0).get_dataset_size()
    total_steps = tr.epoch_size * steps_per_epoch
    last_step = min(total_steps, args.max_steps) if args.max_steps else total_steps

    net = (build_model or MaskRcnnResnet50)(cfg)
    net.set_train(True)
    state, resume = start_state(args, net, ckpt_dir, steps_per_epoch, is_main)
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
    manager = CheckpointManager(ckpt_dir, tr.keep_checkpoint_max) if is_main and tr.save_checkpoint else None
    monitor = open_step_monitor(args.output_dir, rank, LOSS_NAMES, tr.log_interval, tr.epoch_size,
                                steps_per_epoch, last_step)
    loop = TrainingLoop(tr, epoch_dataset, train_cell, optimizer, net, lr_table, monitor, manager, LOSS_NAMES)

    run_start, first_step = time.perf_counter(), state.global_step
    state = loop.run(state, last_step, args.deadline)
    elapsed = time.perf_counter() - run_start
    summary = {"rank": rank, "group_size": group_size, "global_step": state.global_step,
               "epoch": state.epoch + 1, "step_in_epoch": state.step_in_epoch,
               "steps_this_run": state.global_step - first_step, "seconds_this_run": elapsed,
               "final_losses": dict(zip(LOSS_NAMES, loop.last_losses.tolist())),
               "parameter_sha256": parameter_fingerprint(net),
               "latest_checkpoint": manager.latest() if manager else None}
    write_json_atomic(os.path.join(args.output_dir, f"train_summary_{rank}.json"), summary)
    if is_main:
        print(f"done: {summary['steps_this_run']} steps in {elapsed:.1f} s, global step {state.global_step}",
              flush=True)
    return 0


def main(argv: Optional[Sequence[str]] = None,
         build_model: Optional[Callable[[Config], nn.Cell]] = None) -> int:
    from src.dataset import DatasetError
    from src.network_define import NonFiniteLossError

    if os.getenv("MS_ROLE") == "MS_SCHED" and os.getenv("MSRUN_NODE_RANK", "0") != "0":
        return 0    # msrun starts a scheduler wherever master_addr is local; the job's is node 0's
    args, cfg = parse_args(argv)
    print(resolved_paths(cfg), flush=True)
    os.makedirs(args.output_dir, exist_ok=True)
    try:
        return train(args, cfg, build_model)
    except NonFiniteLossError as err:
        latest = find_checkpoints(checkpoint_dir(cfg, args.output_dir))
        kept = f"last good checkpoint: {latest[-1]}" if latest else "no checkpoint was written before it"
        print(f"error: {err}. Training stopped; {kept}. Lower train.base_lr or check the data.", file=sys.stderr)
    except (CheckpointError, DatasetError) as err:
        print(f"error: {err}", file=sys.stderr)
    return EXIT_TRAINING_ERROR


if __name__ == "__main__":
    sys.exit(main())
