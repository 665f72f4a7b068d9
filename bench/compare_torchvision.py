"""Our MaskRcnnResnet50 against torchvision's maskrcnn_resnet50_fpn on this CPU: train step, inference, memory.

    .venv/bin/python bench/compare_torchvision.py [--sizes 384x640 768x1280] [--steps 5] [--modes train infer]
        [--precisions fp32 bf16]

Each (framework, size, mode) runs in its own process, one after the other, so that peak resident memory
(ru_maxrss) belongs to that job alone and one framework's thread pools never compete with the other's.
Our model runs under this interpreter (needs MindSpore: .venv); torchvision under --torch_python
(.venv-bench, see bench/requirements.txt). Both get the same synthetic batch of 2 images with a few
elliptical objects (boxes, labels, masks), the same input size (torchvision's resize is disabled by
min_size/max_size = the input size), 2 CPU threads, and the recipe's SGD momentum and weight decay.

Training is timed at learning rate 0 (--lr): the whole SGD update still runs, but the weights stay, so every
timed step repeats the first one's work on finite numbers. At the recipe's lr 0.02, untrained torchvision
(frozen BatchNorm with identity statistics) diverges on its first step: the losses turn NaN, its RPN then
keeps no proposal and its heads run on the 10 GT boxes alone, which times a step with ~1 % of the box-head
work. The table shows each side's total loss after the last timed step, so a diverged run is visible.

torchvision is built with weights=None, weights_backbone=None, num_classes=81. Without weights it would
train every backbone layer with batch-statistics BatchNorm; by default (--torch_backbone recipe) it is
then matched to our recipe: frozen BatchNorm everywhere and stem + layer1 frozen. `stock` keeps it as built.

Timings: training = forward + backward + SGD step, inference = the whole detector on a batch of 2, reported
per image, with the number of detections each model made (untrained models differ there: see
EQUAL_WORK_OVERRIDES; ours is also timed with every detection slot valid). The first call (our graph
compilation; torchvision's allocator warm-up) is reported apart, then the median over --steps calls. Our
training graph is compiled as train.py compiles it on a cold cache (src/compile_cache.py): by a compile-only
run of the same job, then loaded from MindSpore's compile cache; that run's seconds count in the first call. The
table is printed and written between markers into --results.

Precisions: fp32 runs both in float32; bf16 runs ours at amp level O2 (on CPU: convolutions on bfloat16 inputs,
src/amp.py) and torchvision's forward under torch.autocast("cpu", torch.bfloat16) (backward follows the
autocast graph). Every row of ours is set against torchvision in both precisions, all from the same run.
"""
import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_TORCH_PYTHON = os.path.join(ROOT, ".venv-bench", "bin", "python")
DEFAULT_RESULTS = os.path.join(ROOT, "bench", "results.md")
BEGIN_MARK = "<!-- compare_torchvision: begin (generated, do not edit) -->"
END_MARK = "<!-- compare_torchvision: end -->"

BATCH = 2
THREADS = 2
NUM_CLASSES = 81                      # COCO: 80 classes + background, the recipe's head
OBJECTS_PER_IMAGE = 5
MIN_SIDE_FRACTION, MAX_SIDE_FRACTION = 0.1, 0.5
SEED = 0
PIXEL_MAX = 255.0
TORCH_FROZEN_STAGES = ("conv1", "layer1")     # our recipe: frozen_stages = 1 (stem + first stage)


# ---------------------------------------------------------------- shared synthetic batch

def synthetic_scene(height, width, max_instances, seed=SEED):
    """Images and annotations both models see, as NumPy arrays.

    Returns dict: pixels uint8 (B, H, W, 3); boxes float32 (B, n, 4) x1, y1, x2, y2; labels int64 (B, n) in
    1..80; masks uint8 (B, n, H, W), filled ellipses inside the boxes, also painted into the pixels.
    """
    rng = np.random.default_rng(seed)
    count = min(OBJECTS_PER_IMAGE, max_instances)
    pixels = rng.integers(0, 256, size=(BATCH, height, width, 3)).astype(np.uint8)
    boxes = np.zeros((BATCH, count, 4), np.float32)
    labels = rng.integers(1, NUM_CLASSES, size=(BATCH, count)).astype(np.int64)
    masks = np.zeros((BATCH, count, height, width), np.uint8)
    rows, cols = np.mgrid[0:height, 0:width]
    for b in range(BATCH):
        for i in range(count):
            h, w = (rng.uniform(MIN_SIDE_FRACTION, MAX_SIDE_FRACTION, 2) * (height, width)).astype(int)
            y, x = int(rng.integers(0, height - h)), int(rng.integers(0, width - w))
            boxes[b, i] = (x, y, x + w, y + h)
            inside = ((rows - (y + h / 2)) / (h / 2)) ** 2 + ((cols - (x + w / 2)) / (w / 2)) ** 2 <= 1.0
            masks[b, i] = inside
            pixels[b][inside] = rng.integers(0, 256, size=3)
    return {"pixels": pixels, "boxes": boxes, "labels": labels, "masks": masks}


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0          # Linux: KiB


def time_calls(run, steps):
    """First call timed alone, then `steps` calls; returns (first s, median ms, min ms)."""
    start = time.perf_counter()
    run()
    first = time.perf_counter() - start
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return first, 1000.0 * float(np.median(times)), 1000.0 * float(np.min(times))


# ---------------------------------------------------------------- workers (one per process)

def run_ours(job):
    sys.path.insert(0, ROOT)
    from src import amp, compile_cache
    from src.config import load_config              # importing src loads our CPU kernels (or caps oneDNN at AVX2)
    from src.data.mask_bits import pack_masks
    from src.maskrcnn.mask_rcnn_r50 import LOSS_NAMES, MaskRcnnResnet50
    from src.network_define import build_train_step

    import mindspore as ms
    from src.device import set_device

    set_device("CPU", announce=False)                 # as train.py: graph mode, src/device.py's memory pool
    ms.device_context.cpu.op_tuning.threads_num(THREADS)
    height, width = job["height"], job["width"]
    level = AMP_LEVELS[job["precision"]]
    cfg = load_config(None, {"data.img_height": height, "data.img_width": width, "train.amp_level": level,
                             "test.amp_level": level, "train.batch_size": BATCH, "test.test_batch_size": BATCH,
                             **job.get("overrides", {})})
    ms.set_seed(cfg.train.seed)
    scene = synthetic_scene(height, width, cfg.data.max_instance_count)
    mean = np.asarray(cfg.data.img_mean, np.float32)
    std = np.asarray(cfg.data.img_std, np.float32)
    image = ((scene["pixels"].astype(np.float32) - mean) / std).transpose(0, 3, 1, 2)      # (B, 3, H, W)
    image_shape = np.tile(np.array([[height, width, 1.0, 1.0]], np.float32), (BATCH, 1))
    net = amp.apply(MaskRcnnResnet50(cfg), level, "CPU")
    detections = []                                   # per inference call: valid detections per image
    final_loss = []                                   # per training call: total loss
    if job["mode"] == "train":
        slots = cfg.data.max_instance_count
        count = scene["boxes"].shape[1]
        box = np.zeros((BATCH, slots, 4), np.float32)
        label = np.zeros((BATCH, slots), np.int32)
        valid = np.zeros((BATCH, slots), np.bool_)
        mask = np.zeros((BATCH, slots, height, width), np.uint8)
        box[:, :count], label[:, :count], valid[:, :count] = scene["boxes"], scene["labels"], True
        mask[:, :count] = scene["masks"]
        inputs = [ms.Tensor(a) for a in (image, image_shape, box, label, valid, pack_masks(mask))]   # as train.py
        net.set_train(True)
        _, step = build_train_step(net, LOSS_NAMES, cfg.train, job["sgd"]["lr"])
        if compile_cache.compile_only():              # the child of run_job's compile apart (as train.py)
            step.compile(*inputs)
            return {"compiled": True}

        def run():
            losses, _ = step(*inputs)
            final_loss.append(float(losses[-1].asnumpy()))
    else:
        inputs = [ms.Tensor(image), ms.Tensor(image_shape)]
        net.set_train(False)

        def run():
            outputs = [out.asnumpy() for out in net(*inputs)]
            detections.append(float(outputs[3].sum()) / BATCH)
    first, median, fastest = time_calls(run, job["steps"])
    return {"first_s": first, "median_ms": median, "min_ms": fastest, "peak_rss_mb": peak_rss_mb(),
            "detections": detections[-1] if detections else None, "loss": final_loss[-1] if final_loss else None,
            "version": f"MindSpore {ms.__version__}"}


def _freeze_like_recipe(model):
    """Frozen BatchNorm (identity statistics, as our untrained model) and stem + layer1 without gradients."""
    import torch
    from torchvision.ops.misc import FrozenBatchNorm2d

    def swap(module):
        for name, child in module.named_children():
            if isinstance(child, torch.nn.BatchNorm2d):
                setattr(module, name, FrozenBatchNorm2d(child.num_features))
            else:
                swap(child)

    swap(model.backbone.body)
    for name, param in model.backbone.body.named_parameters():
        if name.split(".")[0] in TORCH_FROZEN_STAGES:
            param.requires_grad_(False)


def build_torchvision(num_classes, height, width, backbone="recipe", **detector_options):
    """torchvision Mask R-CNN R50-FPN without any weights, resizing to our input size.

    backbone: 'recipe' (frozen BatchNorm, stem + layer1 frozen, as our recipe), 'stock' (as built) or
    'group' (GroupNorm(32) in every BatchNorm's place, every layer trains: our demo preset, from scratch).
    detector_options go to MaskRCNN (anchor generator, sampling and proposal counts, detections).
    """
    import torch
    from torchvision.models.detection import MaskRCNN, maskrcnn_resnet50_fpn
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

    sizes = {"num_classes": num_classes, "min_size": min(height, width), "max_size": max(height, width)}
    if backbone == "group":
        body = resnet_fpn_backbone(backbone_name="resnet50", weights=None, trainable_layers=5,
                                   norm_layer=lambda channels: torch.nn.GroupNorm(32, channels))
        return MaskRCNN(body, **sizes, **detector_options)
    model = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, **sizes, **detector_options)
    if backbone == "recipe":
        _freeze_like_recipe(model)
    return model


def run_torchvision(job):
    import torch
    import torchvision

    torch.set_num_threads(THREADS)
    torch.manual_seed(SEED)
    height, width = job["height"], job["width"]
    model = build_torchvision(NUM_CLASSES, height, width, job["torch_backbone"])
    scene = synthetic_scene(height, width, OBJECTS_PER_IMAGE)
    images = [torch.from_numpy(p.transpose(2, 0, 1).astype(np.float32) / PIXEL_MAX) for p in scene["pixels"]]
    bf16 = job["precision"] == "bf16"

    def autocast():
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
    detections = []                                   # per inference call: detections per image
    final_loss = []                                   # per training call: total loss
    if job["mode"] == "train":
        targets = [{"boxes": torch.from_numpy(scene["boxes"][b]), "labels": torch.from_numpy(scene["labels"][b]),
                    "masks": torch.from_numpy(scene["masks"][b])} for b in range(BATCH)]
        sgd = job["sgd"]
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=sgd["lr"],
                                    momentum=sgd["momentum"], weight_decay=sgd["weight_decay"])
        model.train()

        def run():
            with autocast():
                losses = model(images, targets)
            total = sum(loss.float() for loss in losses.values())
            optimizer.zero_grad()
            total.backward()
            optimizer.step()
            final_loss.append(float(total.detach()))
    else:
        model.eval()

        def run():
            with torch.inference_mode(), autocast():
                outputs = model(images)
            detections.append(sum(len(out["boxes"]) for out in outputs) / BATCH)
    first, median, fastest = time_calls(run, job["steps"])
    return {"first_s": first, "median_ms": median, "min_ms": fastest, "peak_rss_mb": peak_rss_mb(),
            "detections": detections[-1] if detections else None, "loss": final_loss[-1] if final_loss else None,
            "version": f"torch {torch.__version__}, torchvision {torchvision.__version__}"}


WORKERS = {"ours": run_ours, "torchvision": run_torchvision}
# Untrained models differ in how many detections they make: torchvision's random weights give 100
# confident detections per image, ours (zero-start residual branches) almost none, and both skip the mask
# head for missing detections. So inference is also timed with our score threshold at 0, which makes
# every one of the K = 100 detection slots valid: at least torchvision's mask and box work.
EQUAL_WORK_OVERRIDES = {"test.test_score_thr": 0.0}
AMP_LEVELS = {"fp32": "O0", "bf16": "O2"}             # our amp level per --precisions value


# ---------------------------------------------------------------- driver

def parse_size(text):
    try:
        height, width = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 384x640 (height x width), got '{text}'") from None
    if height <= 0 or width <= 0 or height % 32 or width % 32:
        raise argparse.ArgumentTypeError(f"size {text}: height and width must be positive multiples of 32")
    return height, width


def run_job(job, python, timeout):
    """Run one worker process; returns its result dict, or {'error': ...}. Our training step compiles as train.py's
    does on a cold cache: apart, by a compile-only run of the same job, then loaded from the cache; its seconds
    count in the first call's."""
    command = [python, os.path.abspath(__file__), "--worker", json.dumps(job)]
    env = dict(os.environ, GLOG_v=os.environ.get("GLOG_v", "3"))
    from compiled_apart import compile_apart, with_cache      # imports src: the launcher's, never torch's worker

    apart = job["framework"] == "ours" and job["mode"] == "train"
    with tempfile.TemporaryDirectory() as cache:
        try:
            compile_s = 0.0
            if apart:
                env = with_cache(env, cache)
                compile_s = compile_apart(command, env, timeout)
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, check=False)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout} s"}
        except (OSError, RuntimeError) as err:
            return {"error": f"{python}: {err}"}
    for line in reversed(done.stdout.splitlines()):
        if line.startswith("{"):
            result = json.loads(line)
            if "first_s" in result:
                result["first_s"] += compile_s
            return result
    tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
    return {"error": f"exit code {done.returncode}: {tail}"}


def machine_description():
    model = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            model = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        with open("/proc/meminfo", encoding="utf-8") as info:
            memory = f"{int(info.readline().split()[1]) / 2 ** 20:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        memory = "unknown RAM"
    return f"{model}, {os.cpu_count()} cores, {memory}, Python {platform.python_version()}"


def format_ms(result, per_image):
    if "error" in result:
        return "failed"
    value = result["median_ms"] / (BATCH if per_image else 1)
    return f"{value:,.0f}"


def format_table(results, sizes, modes, precisions):
    """One row per (size, measure, our precision), set against torchvision in every precision that ran."""
    theirs = [f"torchvision {p}" for p in precisions]
    lines = ["| size (HxW) | measure | ours | ours ms | " + " | ".join(f"{t} ms" for t in theirs) + " | "
             + " | ".join(f"ours / {t}" for t in theirs) + " | ours first call s (compile + run) | "
             + " | ".join(f"{t} first call s" for t in theirs) + " | ours peak RSS MiB | "
             + " | ".join(f"{t} peak RSS MiB" for t in theirs)
             + " | detections per image / total loss after the last step (ours / " + " / ".join(theirs) + ") |",
             "|---" * (7 + 4 * len(precisions)) + "|"]
    labels = {"train": "train step (batch 2)", "infer": "inference per image (batch 2)",
              "infer_equal": "inference per image, ours with every detection slot valid"}

    def cell(result, text):
        return text(result) if "error" not in result else "-"
    for height, width in sizes:
        for mode in [m for mode in modes for m in ((mode, "infer_equal") if mode == "infer" else (mode,))]:
            for precision in precisions:
                ours = results.get(("ours", precision, height, width, mode), {"error": "not run"})
                others = [results.get(("torchvision", p, height, width, mode.split("_")[0]), {"error": "not run"})
                          for p in precisions]
                per_image = mode != "train"
                counts = [f"{r['detections']:.0f}" if r.get("detections") is not None
                          else f"{r['loss']:.2f}" if r.get("loss") is not None else "-" for r in [ours] + others]
                ratios = [f"{ours['median_ms'] / r['median_ms']:.2f}" if "error" not in ours and "error" not in r
                          else "-" for r in others]
                first = [cell(r, lambda r: f"{r['first_s']:.1f}") for r in [ours] + others]
                rss = [cell(r, lambda r: f"{r['peak_rss_mb']:,.0f}") for r in [ours] + others]
                lines.append(f"| {height}x{width} | {labels[mode]} | {precision} | {format_ms(ours, per_image)} | "
                             + " | ".join(format_ms(r, per_image) for r in others) + " | " + " | ".join(ratios)
                             + " | " + " | ".join(first) + " | " + " | ".join(rss) + " | " + " / ".join(counts)
                             + " |")
    return lines


def write_block(path, block):
    """Replace the generated block of `path` (or append it), atomically."""
    text = ""
    if os.path.exists(path):
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    generated = BEGIN_MARK + "\n" + block.rstrip("\n") + "\n" + END_MARK
    if BEGIN_MARK in text and END_MARK in text:
        before, rest = text.split(BEGIN_MARK, 1)
        text = before + generated + rest.split(END_MARK, 1)[1]
    else:
        text = text.rstrip("\n") + ("\n\n" if text else "") + generated + "\n"
    directory = os.path.dirname(os.path.abspath(path))
    with tempfile.NamedTemporaryFile("w", dir=directory, delete=False, encoding="utf-8", suffix=".tmp") as out:
        out.write(text)
    os.replace(out.name, path)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", type=parse_size, default=[(384, 640), (768, 1280)],
                        help="input sizes HxW (multiples of 32); default 384x640 768x1280")
    parser.add_argument("--modes", nargs="+", choices=("train", "infer"), default=["train", "infer"])
    parser.add_argument("--frameworks", nargs="+", choices=sorted(WORKERS), default=["ours", "torchvision"])
    parser.add_argument("--precisions", nargs="+", choices=sorted(AMP_LEVELS), default=["fp32", "bf16"],
                        help="fp32: both float32; bf16: ours at amp O2, torchvision under autocast bfloat16")
    parser.add_argument("--steps", type=int, default=5, help="timed calls after the first one (median)")
    parser.add_argument("--lr", type=float, default=0.0,
                        help="SGD learning rate of the timed training steps (0: the weights stay, see above)")
    parser.add_argument("--torch_python", default=DEFAULT_TORCH_PYTHON,
                        help="interpreter with torch and torchvision (bench/requirements.txt)")
    parser.add_argument("--torch_backbone", choices=("recipe", "stock"), default="recipe",
                        help="recipe: frozen BN, stem + layer1 frozen like ours; stock: as built without weights")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per worker process")
    parser.add_argument("--results", default=DEFAULT_RESULTS, help="markdown file to update ('' = do not write)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        job = json.loads(args.worker)
        print(json.dumps(WORKERS[job["framework"]](job)), flush=True)
        return
    if args.steps < 1:
        parser.error("--steps must be >= 1")

    sys.path.insert(0, ROOT)
    from src.config import load_config

    train_cfg = load_config().train
    sgd = {"lr": args.lr, "momentum": train_cfg.momentum, "weight_decay": train_cfg.weight_decay}
    pythons = {"ours": sys.executable, "torchvision": args.torch_python}
    load_before = os.getloadavg()
    results, versions = {}, {}
    jobs = []
    for height, width in args.sizes:
        for mode in args.modes:
            for precision in args.precisions:
                for framework in args.frameworks:
                    job = {"framework": framework, "mode": mode, "height": height, "width": width,
                           "steps": args.steps, "sgd": sgd, "torch_backbone": args.torch_backbone,
                           "precision": precision}
                    jobs.append((mode, job))
                    if framework == "ours" and mode == "infer":
                        jobs.append(("infer_equal", dict(job, overrides=EQUAL_WORK_OVERRIDES)))
    for label, job in jobs:
        framework, height, width, precision = job["framework"], job["height"], job["width"], job["precision"]
        result = run_job(job, pythons[framework], args.timeout)
        results[(framework, precision, height, width, label)] = result
        versions.setdefault(framework, result.get("version"))
        shown = (f"median {result['median_ms']:.0f} ms, first {result['first_s']:.1f} s, "
                 f"peak RSS {result['peak_rss_mb']:.0f} MiB, detections/img {result.get('detections')}, "
                 f"loss {result.get('loss')}"
                 if "error" not in result else result["error"])
        print(f"{framework:11s} {precision} {height}x{width} {label:11s}: {shown}  (load {os.getloadavg()[0]:.1f})",
              flush=True)
    load_after = os.getloadavg()
    header = [f"Machine: {machine_description()}.",
              f"Software: {'; '.join(v for v in versions.values() if v)}.",
              f"Run: {time.strftime('%Y-%m-%d %H:%M')}, {args.steps} timed calls after the first, median; "
              f"batch {BATCH}, {THREADS} threads each; training at lr {args.lr:g}; torchvision backbone "
              f"'{args.torch_backbone}'; "
              f"1-minute load average {load_before[0]:.1f} before, {load_after[0]:.1f} after "
              f"(other jobs shared the {os.cpu_count()} cores).", ""]
    table = format_table(results, args.sizes, args.modes, args.precisions)
    print("\n".join(header + table))
    if args.results:
        write_block(args.results, "\n".join(header + table) + "\n")
        print(f"table written to {args.results}")


if __name__ == "__main__":
    main()
