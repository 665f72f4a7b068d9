"""Training checkpoints: atomic writes, retention, exact resume, and reported pre-trained loading.

A training checkpoint is one MindSpore .ckpt holding
  - every model parameter (trainable, frozen, BatchNorm statistics and the sampling step counter),
  - the optimizer state: SGD's momentum accumulators ``moments.<parameter name>``, Adam's
    ``moment1.<name>``, ``moment2.<name>``, ``beta1_power`` and ``beta2_power``, or AdamW's
    ``adam_m.<name>`` and ``adam_v.<name>``,
  - the position in training: ``training_state.{epoch, step_in_epoch, global_step, steps_per_epoch}``,
and ends with MindSpore's CRC trailer, so a truncated or damaged file is detected before use. Files are
written through src.atomic_io (a staging name in the same directory, moved into place), so a reader (or a
resumed run) never sees a partial checkpoint.
"""
from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Tuple

import numpy as np

import mindspore as ms
from mindspore import Tensor

from src import atomic_io

CHECKPOINT_PREFIX = "maskrcnn"
STATE_PREFIX = "training_state."
STATE_FIELDS = ("epoch", "step_in_epoch", "global_step", "steps_per_epoch")
OPTIMIZER_STATE_PREFIXES = ("moments.", "moment1.", "moment2.", "adam_m.", "adam_v.")
OPTIMIZER_SETTINGS = ("learning_rate", "global_step", "momentum")     # from the config and TrainingState
# Optimizer bookkeeping found in checkpoints written by MindSpore's own callbacks (e.g. the ModelZoo).
OPTIMIZER_BOOKKEEPING = OPTIMIZER_SETTINGS + ("beta1_power", "beta2_power")
CRC_TRAILER = b"crc_num"
CRC_TRAILER_BYTES = len(CRC_TRAILER) + 10           # the tag plus a 10-byte big-endian CRC32


class CheckpointError(RuntimeError):
    """A checkpoint is missing, damaged, foreign, or does not fit the run; the message names the file."""


@dataclass(frozen=True)
class TrainingState:
    """Where training stands after the last completed step."""
    epoch: int                  # 0-based epoch of the last completed step
    step_in_epoch: int          # completed steps of that epoch (1..steps_per_epoch)
    global_step: int            # completed steps since the start of training
    steps_per_epoch: int

    def next_position(self) -> Tuple[int, int]:
        """(epoch to run next, batches of it already consumed)."""
        if self.step_in_epoch >= self.steps_per_epoch:
            return self.epoch + 1, 0
        return self.epoch, self.step_in_epoch


def checkpoint_filename(state: TrainingState, prefix: str = CHECKPOINT_PREFIX) -> str:
    """Recipe naming: <prefix>-<1-based epoch>_<step in epoch>.ckpt."""
    return f"{prefix}-{state.epoch + 1}_{state.step_in_epoch}.ckpt"


# ---------------------------------------------------------------- file level

def write_checkpoint_atomic(path: str, entries: List[dict]) -> None:
    """Save [{"name", "data"}] to `path` with a CRC trailer; `path` is either absent, old, or complete."""
    with atomic_io.staged_path(path, ".ckpt") as partial:
        try:
            ms.save_checkpoint(entries, partial, crc_check=True)
        finally:
            own_staging = partial[:-len(".ckpt")] + ".tmp"      # MindSpore's own staging name
            if os.path.exists(own_staging):
                os.remove(own_staging)


def _has_crc_trailer(path: str) -> bool:
    size = os.path.getsize(path)
    if size < CRC_TRAILER_BYTES:
        return False
    with open(path, "rb") as handle:
        handle.seek(size - CRC_TRAILER_BYTES)
        return handle.read(len(CRC_TRAILER)) == CRC_TRAILER


def read_checkpoint(path: str, require_integrity: bool = False) -> Dict[str, ms.Parameter]:
    """name -> Parameter. With require_integrity the file must carry a matching CRC (our own checkpoints)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint '{path}' does not exist")
    if require_integrity and not _has_crc_trailer(path):
        raise CheckpointError(f"checkpoint '{path}' is truncated or was not written by this trainer "
                              f"(no CRC trailer); resume from an earlier checkpoint")
    try:
        params = ms.load_checkpoint(path, crc_check=require_integrity)
    except (ValueError, RuntimeError, TypeError, OSError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"checkpoint '{path}' cannot be read (damaged or not a MindSpore "
                              f"checkpoint): {first_line}") from None
    if not params:
        raise CheckpointError(f"checkpoint '{path}' holds no parameters")
    return params


# ---------------------------------------------------------------- training checkpoints

def read_training_state(params: Dict[str, ms.Parameter], path: str) -> TrainingState:
    missing = [name for name in STATE_FIELDS if STATE_PREFIX + name not in params]
    if missing:
        raise CheckpointError(f"checkpoint '{path}' is not a training checkpoint of this trainer (no "
                              f"'{STATE_PREFIX}{missing[0]}'); to start from its weights use --pre_trained")
    values = {name: int(params[STATE_PREFIX + name].asnumpy().reshape(-1)[0]) for name in STATE_FIELDS}
    return TrainingState(**values)


def _state_entries(state: TrainingState) -> List[dict]:
    return [{"name": STATE_PREFIX + name, "data": Tensor(np.array(getattr(state, name), np.int64))}
            for name in STATE_FIELDS]


def optimizer_state(optimizer) -> List[ms.Parameter]:
    """The optimizer tensors a resumed run needs, whatever the optimizer: all it keeps besides the weights it
    updates and the values the run's config sets (OPTIMIZER_SETTINGS) - SGD's momenta, Adam's moments and
    bias-correction powers, AdamW's moments."""
    weights = {p.name for p in optimizer.parameters}
    return [p for p in optimizer.get_parameters() if p.name not in weights and p.name not in OPTIMIZER_SETTINGS]


def _assign_strict(targets: Iterable[ms.Parameter], params: Dict[str, ms.Parameter], path: str, what: str) -> None:
    """Copy every target's value from the checkpoint; all names must be present with equal shapes."""
    targets = list(targets)
    missing = [p.name for p in targets if p.name not in params]
    wrong = [f"{p.name}: {tuple(params[p.name].shape)} in checkpoint, {tuple(p.shape)} here"
             for p in targets if p.name in params and tuple(params[p.name].shape) != tuple(p.shape)]
    if missing or wrong:
        details = (f"{len(missing)} missing (e.g. '{missing[0]}')" if missing else "") + \
                  ("; " if missing and wrong else "") + ("; ".join(wrong[:3]) if wrong else "")
        raise CheckpointError(f"checkpoint '{path}' does not fit this {what}: {details}. Was it written "
                              f"with another config (classes, image size, model)?")
    for param in targets:
        value = params[param.name].asnumpy().astype(ms.dtype_to_nptype(param.dtype), copy=False)
        param.set_data(Tensor(value))


@dataclass
class ResumePoint:
    """A training checkpoint read from disk, ready to be applied once the network and optimizer exist."""
    path: str
    state: TrainingState
    params: Dict[str, ms.Parameter]

    def restore_network(self, network) -> None:
        _assign_strict(network.get_parameters(), self.params, self.path, "model")

    def restore_optimizer(self, optimizer) -> None:
        _assign_strict(optimizer_state(optimizer), self.params, self.path, "optimizer")


def load_resume_point(path: str, steps_per_epoch: int) -> ResumePoint:
    """Read and check a training checkpoint for continuing a run with `steps_per_epoch` steps per epoch."""
    params = read_checkpoint(path, require_integrity=True)
    state = read_training_state(params, path)
    if state.steps_per_epoch != steps_per_epoch:
        raise CheckpointError(f"checkpoint '{path}' was written with {state.steps_per_epoch} steps per epoch, "
                              f"this run has {steps_per_epoch} (different data, batch size or device count); "
                              f"the data position cannot be restored")
    if state.global_step != state.epoch * steps_per_epoch + state.step_in_epoch:
        raise CheckpointError(f"checkpoint '{path}' has an inconsistent training state {state}")
    return ResumePoint(path, state, params)


_CHECKPOINT_NAME = re.compile(r"^(?P<prefix>.+)-(?P<epoch>\d+)_(?P<step>\d+)\.ckpt$")


def find_checkpoints(directory: str, prefix: str = CHECKPOINT_PREFIX) -> List[str]:
    """Paths of the training checkpoints in `directory`, oldest first (by epoch, then step)."""
    if not os.path.isdir(directory):
        return []
    found = []
    for name in os.listdir(directory):
        match = _CHECKPOINT_NAME.match(name)
        if match and match.group("prefix") == prefix:
            found.append(((int(match.group("epoch")), int(match.group("step"))), name))
    return [os.path.join(directory, name) for _, name in sorted(found)]


class CheckpointManager:
    """Writes training checkpoints into one directory and keeps the newest `keep_max` of them."""

    def __init__(self, directory: str, keep_max: int, prefix: str = CHECKPOINT_PREFIX):
        if keep_max < 1:
            raise ValueError(f"keep_max must be >= 1, got {keep_max}")
        self.directory = directory
        self.keep_max = keep_max
        self.prefix = prefix
        self._remove_partials()

    def _remove_partials(self) -> None:
        """Drop staging files left by a save that was killed (they never carry a checkpoint name)."""
        if not os.path.isdir(self.directory):
            return
        for name in os.listdir(self.directory):
            if name.startswith(f".{self.prefix}-") and atomic_io.PARTIAL_MARK in name:
                os.remove(os.path.join(self.directory, name))

    def checkpoints(self) -> List[str]:
        return find_checkpoints(self.directory, self.prefix)

    def latest(self) -> Optional[str]:
        paths = self.checkpoints()
        return paths[-1] if paths else None

    def save(self, network, optimizer, state: TrainingState) -> str:
        entries = [{"name": p.name, "data": p} for p in network.get_parameters()]
        entries += [{"name": p.name, "data": p} for p in optimizer_state(optimizer)]
        entries += _state_entries(state)
        path = os.path.join(self.directory, checkpoint_filename(state, self.prefix))
        write_checkpoint_atomic(path, entries)
        for old in self.checkpoints()[:-self.keep_max]:
            os.remove(old)
        return path


# ---------------------------------------------------------------- pre-trained weights

def _is_training_bookkeeping(name: str) -> bool:
    return name.startswith(OPTIMIZER_STATE_PREFIXES + (STATE_PREFIX,)) or name in OPTIMIZER_BOOKKEEPING


@dataclass
class LoadReport:
    """What a pre-trained checkpoint contributed to the model."""
    path: str
    loaded: List[str] = field(default_factory=list)
    skipped: List[Tuple[str, str]] = field(default_factory=list)     # (checkpoint name, reason)
    left_at_init: List[str] = field(default_factory=list)
    ignored_training_state: int = 0


def _by_module(names: List[str]) -> str:
    counts = Counter(name.split(".", 1)[0] for name in names)
    return ", ".join(f"{module}: {count}" for module, count in sorted(counts.items()))


def format_load_report(report: LoadReport) -> str:
    lines = [f"pre-trained weights from {report.path}",
             f"  loaded {len(report.loaded)} tensors ({_by_module(report.loaded)})"]
    if report.skipped:
        lines.append(f"  skipped {len(report.skipped)}:")
        lines += [f"    {name}: {reason}" for name, reason in report.skipped]
    if report.ignored_training_state:
        lines.append(f"  ignored {report.ignored_training_state} optimizer/training-state entries")
    if report.left_at_init:
        lines.append(f"  left at initialisation {len(report.left_at_init)} tensors "
                     f"({_by_module(report.left_at_init)})")
    return "\n".join(lines)


def load_pretrained(path: str, network) -> LoadReport:
    """Load every checkpoint tensor whose name and shape match the model; report the rest.

    Works for a converted ResNet50 backbone (``backbone.*``) and for a full Mask R-CNN checkpoint; a model
    with another class count keeps its own class-specific head layers (their shapes differ).
    """
    params = read_checkpoint(path)
    model = {p.name: p for p in network.get_parameters()}
    report = LoadReport(path)
    for name, saved in params.items():
        if _is_training_bookkeeping(name):
            report.ignored_training_state += 1
        elif name not in model:
            report.skipped.append((name, "not in the model"))
        elif tuple(saved.shape) != tuple(model[name].shape):
            report.skipped.append((name, f"shape {tuple(saved.shape)} in checkpoint, "
                                         f"{tuple(model[name].shape)} in the model"))
        else:
            target = model[name]
            target.set_data(Tensor(saved.asnumpy().astype(ms.dtype_to_nptype(target.dtype), copy=False)))
            report.loaded.append(name)
    if not report.loaded:
        prefixed = sum(f"backbone.{name}" in model for name in params)
        hint = (" Its names look like a plain ResNet50: convert it first with "
                "`python -m src.convert_checkpoint --src <ckpt> --out <backbone.ckpt>`.") if prefixed else ""
        raise CheckpointError(f"no tensor of '{path}' matches the model by name and shape.{hint}")
    loaded = set(report.loaded)
    report.left_at_init = [name for name in model if name not in loaded]
    return report


# ---------------------------------------------------------------- inference weights

def load_model_weights(path: str, network) -> None:
    """Every model parameter from a checkpoint (eval, export, predict); names and shapes must all match."""
    _assign_strict(network.get_parameters(), read_checkpoint(path), path, "model")
