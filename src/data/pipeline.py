"""The MindSpore input pipeline: MindRecord shards -> shuffled, sharded, transformed batches."""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np

import mindspore.dataset as ds

from src.config import Config
from src.data.records import RECORD_COLUMNS, DatasetError
from src.data.transforms import EvalTransform, TrainTransform

TRAIN_COLUMNS = ["image", "image_shape", "box", "label", "valid_num", "mask"]
EVAL_COLUMNS = ["image", "image_shape", "image_id"]
SHUFFLE_STREAM = 0                           # separates the shuffle RNG stream from per-image streams
# Rows each operator's output queue may hold (MindSpore's prefetch size, 16 by default). A training row carries
# its M mask slots at input size (as bits, src/data/mask_bits.py), and behind a step that takes seconds every
# queue fills up (bench/results.md, "Training memory per stage"). Two rows keep the pipeline ahead.
QUEUE_ROWS = 2


def sample_order(num_records: int, is_training: bool, seed: int, epoch: int,
                 num_shards: int = 1, shard_id: int = 0) -> np.ndarray:
    """Record positions one shard reads in one epoch.

    Training: a (seed, epoch) permutation dealt round-robin to the shards, each cut to the same length
    (num_records // num_shards) so that every device runs the same number of steps; the few records cut
    change from epoch to epoch. Eval: every record once, in order, dealt round-robin.
    """
    if not 0 <= shard_id < num_shards:
        raise ValueError(f"shard_id must be in [0, {num_shards}), got {shard_id}")
    if not is_training:
        return np.arange(shard_id, num_records, num_shards)
    order = np.random.default_rng([seed, epoch, SHUFFLE_STREAM]).permutation(num_records)
    return order[shard_id::num_shards][:num_records // num_shards]


def create_maskrcnn_dataset(cfg: Config, files: Sequence[str], is_training: bool, batch_size: int,
                            num_shards: int = 1, shard_id: int = 0, epoch: int = 0):
    """Batched MindSpore dataset of one epoch; columns TRAIN_COLUMNS or EVAL_COLUMNS (docs/architecture.md).
    Sets MindSpore's prefetch size to QUEUE_ROWS.

    The same (cfg.train.seed, epoch) always yields the same batches, whatever the worker count, so a
    resumed run rebuilds epoch e and calls `.skip(k)` to continue after k finished batches.
    """
    files = list(files)
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        raise DatasetError(f"MindRecord files not found: {missing}")
    num_records = ds.MindDataset(files, columns_list=["image_id"], shuffle=False).get_dataset_size()
    order = sample_order(num_records, is_training, cfg.train.seed, epoch, num_shards, shard_id)
    if is_training and order.size < batch_size:
        raise DatasetError(f"shard {shard_id}/{num_shards} holds {order.size} training images, fewer than "
                           f"one batch of {batch_size}")
    workers = cfg.data.num_parallel_workers
    ds.config.set_prefetch_size(QUEUE_ROWS)                  # process-wide: read when the pipeline starts
    sampler = ds.SubsetSampler(order.tolist())
    if is_training:
        dataset = ds.MindDataset(files, columns_list=RECORD_COLUMNS, sampler=sampler)
        dataset = dataset.map(TrainTransform(cfg, epoch), input_columns=RECORD_COLUMNS,
                              output_columns=TRAIN_COLUMNS, num_parallel_workers=workers)
        columns = TRAIN_COLUMNS
    else:
        dataset = ds.MindDataset(files, columns_list=["image", "image_id"], sampler=sampler)
        dataset = dataset.map(EvalTransform(cfg), input_columns=["image", "image_id"],
                              output_columns=EVAL_COLUMNS, num_parallel_workers=workers)
        columns = EVAL_COLUMNS
    return dataset.project(columns).batch(batch_size, drop_remainder=is_training)
