"""Training speed on this machine: ms per training step (the config's optimizer), after compilation.

    python bench/bench_train.py [--sizes tiny demo recipe] [--steps 3] [--batch_size B] [--device_target CPU]

"tiny" is configs/tiny.yaml (128x192), "demo" configs/demo.yaml (128x192, GroupNorm, Adam with gradient
clipping: the step of scripts/run_demo.sh), "recipe" the ModelZoo size (768x1280, 81 classes, 128 instances).
Each size gets one fixed synthetic batch (random image, a few boxes with filled masks) so that only the
step is timed, not data loading: one warm-up step (graph compilation) then --steps timed steps.
On CPU the recipe size needs about 11 GB of RAM per image in the batch (peak RSS 11.2 GB at batch 1).
"""
import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import mindspore as ms  # noqa: E402
from mindspore import Tensor  # noqa: E402

from src.config import load_config  # noqa: E402
from src.data.mask_bits import pack_masks  # noqa: E402
from src.maskrcnn.mask_rcnn_r50 import LOSS_NAMES, MaskRcnnResnet50, model_summary  # noqa: E402
from src.network_define import build_train_step  # noqa: E402

SIZES = {"tiny": "tiny", "demo": "demo", "recipe": None}   # preset per size name (None = recipe defaults)
INSTANCES_PER_IMAGE = 4                           # objects in the synthetic batch
MIN_BOX_FRACTION, MAX_BOX_FRACTION = 0.1, 0.4     # box side as a fraction of the image side


def synthetic_batch(cfg, seed=0):
    """One training batch in the dataset's column layout (docs/architecture.md; the masks as bits, as train.py
    feeds them)."""
    rng = np.random.default_rng(seed)
    d, batch = cfg.data, cfg.train.batch_size
    height, width, slots = d.img_height, d.img_width, d.max_instance_count
    image = rng.normal(size=(batch, 3, height, width)).astype(np.float32)
    image_shape = np.tile(np.array([[height, width, 1.0, 1.0]], np.float32), (batch, 1))
    box = np.zeros((batch, slots, 4), np.float32)
    label = np.zeros((batch, slots), np.int32)
    valid = np.zeros((batch, slots), np.bool_)
    mask = np.zeros((batch, slots, height, width), np.uint8)
    count = min(INSTANCES_PER_IMAGE, slots)
    for b in range(batch):
        for i in range(count):
            h, w = (rng.uniform(MIN_BOX_FRACTION, MAX_BOX_FRACTION, 2) * (height, width)).astype(int)
            y, x = rng.integers(0, height - h), rng.integers(0, width - w)
            box[b, i] = (x, y, x + w, y + h)
            label[b, i] = rng.integers(1, cfg.num_classes)
            valid[b, i] = True
            mask[b, i, y:y + h, x:x + w] = 1
    return [Tensor(a) for a in (image, image_shape, box, label, valid, pack_masks(mask))]


def bench(name, steps, batch_size=None):
    cfg = load_config(SIZES[name], {"train.batch_size": batch_size} if batch_size else None)
    ms.set_seed(cfg.train.seed)
    net = MaskRcnnResnet50(cfg)
    net.set_train(True)
    _, cell = build_train_step(net, LOSS_NAMES, cfg.train, cfg.train.base_lr)
    batch = synthetic_batch(cfg)
    start = time.perf_counter()
    losses, _ = cell(*batch)
    losses[-1].asnumpy()
    compile_and_first = time.perf_counter() - start
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        losses, _ = cell(*batch)
        losses[-1].asnumpy()
        times.append(time.perf_counter() - start)
    print(f"{name}: {model_summary(net, cfg)}, batch {cfg.train.batch_size}", flush=True)
    print(f"{name}: first step (compile + run) {compile_and_first:.1f} s; {steps} steps: "
          f"mean {1000 * np.mean(times):.0f} ms/step, median {1000 * np.median(times):.0f}, "
          f"min {1000 * np.min(times):.0f}, "
          f"total_loss {float(losses[-1].asnumpy()):.4f}", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", choices=sorted(SIZES), default=["tiny", "recipe"])
    parser.add_argument("--steps", type=int, default=3, help="timed steps after the warm-up step")
    parser.add_argument("--batch_size", type=int, help="images per step (default: the config's, 2)")
    parser.add_argument("--device_target", default="CPU", choices=("CPU", "GPU", "Ascend"))
    args = parser.parse_args()
    ms.set_context(mode=ms.GRAPH_MODE)
    ms.set_device(args.device_target)
    print(f"MindSpore {ms.__version__}, {os.cpu_count()} CPU cores, GRAPH_MODE on {args.device_target}", flush=True)
    for name in args.sizes:
        bench(name, args.steps, args.batch_size)


if __name__ == "__main__":
    main()
