"""Data throughput: COCO -> MindRecord conversion (images/s) and the training / eval pipelines (batches/s).

Runs on a synthetic COCO set generated into a temporary directory, so it needs no download:

    python bench/bench_data.py                                   # tiny preset (192x128)
    python bench/bench_data.py --config coco --images 48 --min-size 480 --max-size 640 --batches 12
    python bench/bench_data.py --config coco --max_instance_count 16 ...   # any config key can be overridden
    python bench/bench_data.py --config coco --images 64 --min-size 480 --max-size 640 --hold 2   # pipeline memory

--hold S also drains the training pipeline once more, waiting S seconds per batch as a training step would, and
reports the peak resident memory of that pass above the process's before it: behind a slow consumer every
queue of the pipeline fills up.
"""
import argparse
import os
import sys
import tempfile
import time

from memory_stages import reset_peak, status_mib

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from src.config import config_from_args                                  # noqa: E402
from src.dataset import create_maskrcnn_dataset, data_to_mindrecord       # noqa: E402
from src.synthetic import CATEGORY_NAMES, make_synthetic_coco             # noqa: E402


def _time_batches(dataset, num_batches: int):
    """Seconds for num_batches batches after one warm-up batch, and the batches actually timed."""
    iterator = dataset.create_tuple_iterator(output_numpy=True, num_epochs=1)
    next(iterator)
    start, timed = time.perf_counter(), 0
    for _ in iterator:
        timed += 1
        if timed == num_batches:
            break
    return time.perf_counter() - start, timed


def _peak_behind_slow_consumer(dataset, hold_s: float):
    """(RSS before, peak RSS while draining) in MiB, the consumer taking hold_s seconds per batch."""
    reset_peak()
    before = status_mib("VmRSS")
    for _ in dataset.create_tuple_iterator(num_epochs=1):
        time.sleep(hold_s)
    return before, status_mib("VmHWM")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=32, help="synthetic training images to generate")
    parser.add_argument("--min-size", type=int, default=100, help="smallest synthetic image side")
    parser.add_argument("--max-size", type=int, default=260, help="largest synthetic image side")
    parser.add_argument("--workers", type=int, default=None,
                        help="conversion and pipeline workers (default: the config's)")
    parser.add_argument("--batches", type=int, default=8, help="batches to time per pipeline")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hold", type=float, default=0.0,
                        help="also drain the training pipeline at S seconds per batch and report its peak memory")
    args, cfg = config_from_args(parser, argv, default_config="tiny")
    cfg.data.classes = ["background", *CATEGORY_NAMES]
    if args.workers:
        cfg.data.convert_workers = cfg.data.num_parallel_workers = args.workers
    batch_size = cfg.train.batch_size

    with tempfile.TemporaryDirectory(prefix="bench_data_") as root:
        start = time.perf_counter()
        make_synthetic_coco(os.path.join(root, "coco"), args.images, args.images, args.seed, args.min_size,
                            args.max_size)
        generated = time.perf_counter() - start
        cfg.data.coco_root = os.path.join(root, "coco")
        cfg.data.mindrecord_dir = os.path.join(root, "mindrecord")

        start = time.perf_counter()
        train_files = data_to_mindrecord(cfg, True)
        converted = time.perf_counter() - start
        val_files = data_to_mindrecord(cfg, False)
        disk_kib = sum(os.stat(f).st_blocks * 512 for f in train_files) / 1024    # shard files are sparse

        epochs = -(-(args.batches + 1) * batch_size // args.images)
        train_s, train_n = _time_batches(
            create_maskrcnn_dataset(cfg, train_files, True, batch_size).repeat(epochs), args.batches)
        eval_s, eval_n = _time_batches(
            create_maskrcnn_dataset(cfg, val_files, False, cfg.test.test_batch_size).repeat(epochs), args.batches)
        if args.hold:
            held = _peak_behind_slow_consumer(create_maskrcnn_dataset(cfg, train_files, True, batch_size), args.hold)

    print(f"input {cfg.data.img_width}x{cfg.data.img_height}, max_instance_count {cfg.data.max_instance_count}, "
          f"synthetic images {args.min_size}..{args.max_size} px, workers: convert {cfg.data.convert_workers}, "
          f"pipeline {cfg.data.num_parallel_workers}")
    print(f"generate  : {args.images / generated:8.1f} images/s")
    print(f"convert   : {args.images / converted:8.1f} images/s  ({disk_kib / args.images:.0f} KiB/image on disk)")
    print(f"train pipe: {train_n / train_s:8.2f} batches/s = {train_n * batch_size / train_s:.1f} images/s "
          f"(batch {batch_size}, {train_n} batches)")
    print(f"eval pipe : {eval_n / eval_s:8.2f} batches/s = {eval_n * cfg.test.test_batch_size / eval_s:.1f} "
          f"images/s (batch {cfg.test.test_batch_size}, {eval_n} batches)")
    if args.hold:
        print(f"train pipe behind a {args.hold:g} s consumer: RSS {held[0]:,.0f} MiB before, peak {held[1]:,.0f} MiB "
              f"(+{held[1] - held[0]:,.0f})")


if __name__ == "__main__":
    main()
