"""Learning per step: ours (the demo preset) and torchvision trained N steps on the same synthetic set.

    .venv/bin/python bench/compare_learning.py --steps 1300 [--style simple|cluttered] [--seed 0]
        [--images 400] [--val_images 50] [--out bench_output/compare_learning] [--sides ours torchvision]

Both sides train from scratch on the same src.synthetic set at the demo's settings: ResNet50-FPN with
GroupNorm, batch 2, Adam (L2 weight decay as ours) with the same lr per step (our src.lr_schedule table for
`--steps`: 50 warmup steps then cosine), gradients clipped to global norm 10, anchors 8-128 px at 3 ratios,
64 RPN samples per image (half positive), 300 / 64 proposals per level / image, 32 RoIs per image (a quarter
positive), 30 detections, flip 0.5, inputs resized to fit 128x192 (torchvision resizes the short side to 128
up to a long side of 192; ours fits the image into 128x192). Ours runs as demo.py --steps N does (train.py
and eval.py as child processes) in the demo's precision: amp auto, i.e. bf16 convolutions on a CPU with
AVX512-BF16 / AMX (the row then says "ours bf16"; `--ours_options='--train.amp_level O0 --test.amp_level O0'`
trains in float32). torchvision (bench/compare_torchvision.build_torchvision) runs in float32 under
--torch_python (.venv-bench). Both are scored with pycocotools on the same val images.

Prints one row per side (steps, training wall time including compile, bbox AP, segm AP) and appends the
rows to the table in --results (bench/results.md; '' = do not write).
"""
import argparse
import dataclasses
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from compare_torchvision import build_torchvision  # noqa: E402  (bench/ sibling, torch imported lazily)

DEFAULT_TORCH_PYTHON = os.path.join(ROOT, ".venv-bench", "bin", "python")
DEFAULT_RESULTS = os.path.join(ROOT, "bench", "results.md")
TABLE_TITLE = "## Learning per step: ours and torchvision on the same synthetic set (bench/compare_learning.py)"
TABLE_HEADER = ("| date (UTC) | style, seed | train / val images | side | steps | train wall s | bbox AP | segm AP |\n"
                "|---|---|---|---|---|---|---|---|\n")
# rows of runs with --ours_options name the options after the side: "ours (--rcnn.x 1)"
THREADS = 2
SIDES = ("ours", "torchvision")


# ---------------------------------------------------------------- settings shared by both sides

def detector_options(cfg) -> dict:
    """Our config as torchvision MaskRCNN settings (plain values; the worker builds the anchor generator).

    torchvision's rpn_pre_nms_top_n is per level and rpn_post_nms_top_n per image, as our nms_pre / max_num.
    """
    strides = cfg.anchor.anchor_strides
    return {
        "anchor_sizes": [[scale * stride for scale in cfg.anchor.anchor_scales] for stride in strides],
        "aspect_ratios": list(cfg.anchor.anchor_ratios),
        "rpn_batch_size_per_image": cfg.rpn.num_expected_total,
        "rpn_positive_fraction": cfg.rpn.pos_fraction,
        "rpn_fg_iou_thresh": cfg.rpn.pos_iou_thr,
        "rpn_bg_iou_thresh": cfg.rpn.neg_iou_thr,
        "rpn_pre_nms_top_n_train": cfg.proposal_train.nms_pre,
        "rpn_post_nms_top_n_train": cfg.proposal_train.max_num,
        "rpn_pre_nms_top_n_test": cfg.proposal_test.nms_pre,
        "rpn_post_nms_top_n_test": cfg.proposal_test.max_num,
        "rpn_nms_thresh": cfg.proposal_train.nms_thr,
        "box_batch_size_per_image": cfg.rcnn.num_expected_total_stage2,
        "box_positive_fraction": cfg.rcnn.pos_fraction_stage2,
        "box_fg_iou_thresh": cfg.rcnn.pos_iou_thr_stage2,
        "box_bg_iou_thresh": cfg.rcnn.neg_iou_thr_stage2,
        "box_detections_per_img": cfg.test.test_max_per_img,
        "box_score_thresh": cfg.test.test_score_thr,
        "box_nms_thresh": cfg.test.test_iou_thr,
    }


def torch_job(args, cfg) -> dict:
    """Everything the torchvision worker needs, from our config: the same data, schedule and settings."""
    from demo import schedule_overrides
    from src.lr_schedule import dynamic_lr

    schedule = schedule_overrides(args.steps, 1, cfg.train.warmup_step)         # demo.py --steps: its schedule
    train = dataclasses.replace(cfg.train, base_step=schedule["train.base_step"], total_epoch=1,
                                warmup_step=schedule["train.warmup_step"])
    return {"coco_root": cfg.data.coco_root, "train_split": cfg.data.train_data_type,
            "val_split": cfg.data.val_data_type, "classes": list(cfg.data.classes),
            "height": cfg.data.img_height, "width": cfg.data.img_width, "steps": args.steps,
            "batch": cfg.train.batch_size, "flip_ratio": cfg.data.flip_ratio, "seed": args.seed,
            "lr": dynamic_lr(train).tolist(), "weight_decay": cfg.train.weight_decay,
            "clip": cfg.train.grad_clip_norm, "mask_thr": cfg.test.mask_thr_binary,
            "options": detector_options(cfg)}


# ---------------------------------------------------------------- ours

def run_ours(args, demo_argv):
    """demo.py's data, training (--steps) and eval stages; returns (result dict, demo config)."""
    import demo

    args_d, overrides, cfg = demo.parse_args(demo_argv)
    os.makedirs(args_d.out, exist_ok=True)
    demo.clear_previous_run(args_d.out)
    demo.make_dataset(args_d, cfg)
    begin = time.time()
    checkpoint = demo.train(args_d, overrides, cfg, begin, {})
    seconds = time.time() - begin
    metrics = demo.evaluate(args_d.out, checkpoint, cfg, overrides)
    return {"side": "ours", "steps": args.steps, "train_seconds": round(seconds, 1),
            "bbox_AP": metrics["bbox"]["AP"], "segm_AP": metrics["segm"]["AP"],
            "precision": training_precision(cfg)}, cfg


def training_precision(cfg) -> str:
    """'fp32' or 'bf16': what our side trains in on this CPU (amp auto: bf16 where the CPU has AVX512-BF16 / AMX)."""
    from src import amp

    return "fp32" if amp.resolve(cfg.train.amp_level, "CPU") == "O0" else "bf16"


# ---------------------------------------------------------------- torchvision (worker process)

def _load_split(coco, image_dir, classes):
    """[(path, boxes (n, 4) xyxy float32, labels (n,) int64, masks (n, H, W) uint8)] of non-crowd objects."""
    import numpy as np

    label_of = {cat["id"]: classes.index(cat["name"]) for cat in coco.loadCats(coco.getCatIds())}
    samples = []
    for image_id in sorted(coco.getImgIds()):
        info = coco.loadImgs(image_id)[0]
        anns = [a for a in coco.loadAnns(coco.getAnnIds(imgIds=image_id, iscrowd=False)) if a["bbox"][2] > 0]
        boxes = np.array([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                          for a in anns], np.float32).reshape(-1, 4)
        labels = np.array([label_of[a["category_id"]] for a in anns], np.int64)
        masks = np.array([coco.annToMask(a) for a in anns], np.uint8).reshape(-1, info["height"], info["width"])
        samples.append((image_id, os.path.join(image_dir, info["file_name"]), boxes, labels, masks))
    return samples


def _read_rgb(path):
    import cv2
    import numpy as np

    pixels = cv2.imread(path, cv2.IMREAD_COLOR)
    if pixels is None:
        raise RuntimeError(f"{path}: not a readable image")
    return np.ascontiguousarray(pixels[:, :, ::-1]).astype(np.float32) / 255.0


def coco_results(image_id, boxes, labels, scores, masks, category_of):
    """One image's detections (boxes (n, 4) xyxy, labels (n,) class indices, scores (n,), binary masks
    (n, H, W) uint8) -> COCO result dicts with xywh boxes and RLE masks."""
    import numpy as np
    from pycocotools import mask as mask_utils

    results = []
    for box, label, score, mask in zip(boxes.tolist(), labels.tolist(), scores.tolist(), masks):
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        rle["counts"] = rle["counts"].decode("ascii")
        results.append({"image_id": image_id, "category_id": category_of[int(label)], "score": float(score),
                        "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]], "segmentation": rle})
    return results


def coco_ap(coco_gt, image_ids, results):
    """{'bbox': AP, 'segm': AP} (COCO AP @[.5:.95]) of `results` on `image_ids`; 0 without any result."""
    from pycocotools.cocoeval import COCOeval

    ap = {}
    for iou_type in ("bbox", "segm"):
        if not results:
            ap[iou_type] = 0.0
            continue
        evaluation = COCOeval(coco_gt, coco_gt.loadRes([dict(r) for r in results]), iou_type)
        evaluation.params.imgIds = list(image_ids)
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
        ap[iou_type] = float(evaluation.stats[0])
    return ap


def run_torchvision_worker(job):
    import numpy as np
    import torch
    import torchvision
    from pycocotools.coco import COCO
    from torchvision.models.detection.anchor_utils import AnchorGenerator

    torch.set_num_threads(THREADS)
    torch.manual_seed(job["seed"])
    rng = np.random.default_rng(job["seed"])
    options = dict(job["options"])
    anchors = AnchorGenerator(tuple(tuple(s) for s in options.pop("anchor_sizes")),
                              (tuple(options.pop("aspect_ratios")),) * len(job["options"]["anchor_sizes"]))
    model = build_torchvision(len(job["classes"]), job["height"], job["width"], "group",
                              rpn_anchor_generator=anchors, **options)
    root = job["coco_root"]
    train_gt = COCO(os.path.join(root, "annotations", f"instances_{job['train_split']}.json"))
    samples = [s for s in _load_split(train_gt, os.path.join(root, job["train_split"]), job["classes"]) if len(s[3])]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=job["lr"][0], weight_decay=job["weight_decay"])

    def batches():
        while True:
            order = rng.permutation(len(samples))
            for start in range(0, len(order) - job["batch"] + 1, job["batch"]):
                yield [samples[i] for i in order[start:start + job["batch"]]]

    model.train()
    begin = time.time()
    for step, batch in zip(range(job["steps"]), batches()):
        images, targets = [], []
        for _, path, boxes, labels, masks in batch:
            pixels = _read_rgb(path)
            if rng.random() < job["flip_ratio"]:
                width = pixels.shape[1]
                pixels, masks = pixels[:, ::-1], masks[:, :, ::-1]
                boxes = np.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], 1)
            images.append(torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1))))
            targets.append({"boxes": torch.from_numpy(np.ascontiguousarray(boxes)),
                            "labels": torch.from_numpy(labels),
                            "masks": torch.from_numpy(np.ascontiguousarray(masks))})
        for group in optimizer.param_groups:
            group["lr"] = job["lr"][min(step, len(job["lr"]) - 1)]
        losses = model(images, targets)
        total = sum(losses.values())
        if not torch.isfinite(total):
            raise RuntimeError(f"step {step + 1}: total loss {float(total)}")
        optimizer.zero_grad()
        total.backward()
        if job["clip"] > 0:
            torch.nn.utils.clip_grad_norm_(params, job["clip"])
        optimizer.step()
    seconds = time.time() - begin

    val_file = os.path.join(root, "annotations", f"instances_{job['val_split']}.json")
    val_gt = COCO(val_file)
    category_of = {job["classes"].index(cat["name"]): cat["id"] for cat in val_gt.loadCats(val_gt.getCatIds())}
    model.eval()
    results = []
    val = _load_split(val_gt, os.path.join(root, job["val_split"]), job["classes"])
    with torch.inference_mode():
        for image_id, path, _, _, _ in val:
            out = model([torch.from_numpy(np.ascontiguousarray(_read_rgb(path).transpose(2, 0, 1)))])[0]
            masks = (out["masks"][:, 0] > job["mask_thr"]).numpy().astype(np.uint8)
            results += coco_results(image_id, out["boxes"].numpy(), out["labels"].numpy(), out["scores"].numpy(),
                                    masks, category_of)
    ap = coco_ap(val_gt, [s[0] for s in val], results)
    return {"side": "torchvision", "steps": job["steps"], "train_seconds": round(seconds, 1),
            "bbox_AP": ap["bbox"], "segm_AP": ap["segm"],
            "version": f"torch {torch.__version__}, torchvision {torchvision.__version__}"}


def run_torchvision(job, python):
    """The worker under `python`; its last stdout line is the result JSON."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
        json.dump(job, handle)
    try:
        done = subprocess.run([python, os.path.abspath(__file__), "--worker", handle.name], capture_output=True,
                              text=True, check=False)
    finally:
        os.remove(handle.name)
    for line in reversed(done.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
    raise RuntimeError(f"torchvision worker ({python}) failed with exit code {done.returncode}: {tail}")


# ---------------------------------------------------------------- table

def table_rows(results, args) -> str:
    date = time.strftime("%Y-%m-%d", time.gmtime())
    def side(result):
        options = " ".join(args.ours_options) if result["side"] == "ours" else ""
        name = result["side"] + ("" if result.get("precision", "fp32") == "fp32" else f" {result['precision']}")
        return f"{name} (`{options}`)" if options else name

    return "".join(f"| {date} | {args.style}, {args.seed} | {args.images} / {args.val_images} | {side(r)} | "
                   f"{r['steps']} | {r['train_seconds']:.0f} | {r['bbox_AP']:.3f} | {r['segm_AP']:.3f} |\n"
                   for r in results)


def append_rows(path: str, rows: str) -> None:
    """Append rows to the table under TABLE_TITLE in `path` (the section is created at the end if missing)."""
    from src import atomic_io

    text = open(path, "r", encoding="utf-8").read() if os.path.exists(path) else ""
    if TABLE_TITLE not in text:
        text = text.rstrip("\n") + ("\n\n" if text else "") + TABLE_TITLE + "\n\n" + TABLE_HEADER
        text += rows
    else:
        start = text.index(TABLE_TITLE)
        end = text.find("\n## ", start + len(TABLE_TITLE))
        end = len(text) if end < 0 else end + 1
        section = text[start:end].rstrip("\n") + "\n" + rows
        text = text[:start] + section + ("\n" + text[end:] if end < len(text) else "")
    atomic_io.write_bytes(path, text.encode("utf-8"))


# ---------------------------------------------------------------- driver

def build_parser():
    from src.synthetic import STYLES

    def positive(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got '{text}'") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=positive, required=True, help="training steps of each side")
    parser.add_argument("--style", choices=sorted(STYLES), default="simple", help="synthetic scene style")
    parser.add_argument("--seed", type=int, default=0, help="synthetic data seed (also the torchvision seed)")
    parser.add_argument("--images", type=positive, default=400, help="synthetic training images")
    parser.add_argument("--val_images", type=positive, default=50, help="synthetic val images (scored by both)")
    parser.add_argument("--out", default=os.path.join(ROOT, "bench_output", "compare_learning"), help="work folder")
    parser.add_argument("--sides", nargs="+", choices=SIDES, default=list(SIDES))
    parser.add_argument("--torch_python", default=DEFAULT_TORCH_PYTHON, help="python with torch and torchvision")
    parser.add_argument("--ours_options", type=shlex.split, default=[], metavar="'OPTIONS'",
                        help="config overrides of our side as demo.py takes them, in one argument, e.g. "
                             "--ours_options='--rcnn.rcnn_smooth_l1_beta 0.111' (they also reach its eval stage)")
    parser.add_argument("--results", default=DEFAULT_RESULTS, help="markdown file to append to ('' = do not write)")
    return parser


def demo_argv(args) -> list:
    """demo.py options for our side (its --steps path: warmup min(50, steps / 10), cosine over the steps)."""
    return ["--steps", str(args.steps), "--images", str(args.images), "--val_images", str(args.val_images),
            "--style", args.style, "--seed", str(args.seed), "--out", os.path.abspath(args.out)] + args.ours_options


def main(argv=None) -> int:
    if argv is None and len(sys.argv) == 3 and sys.argv[1] == "--worker":
        with open(sys.argv[2], "r", encoding="utf-8") as handle:
            print(json.dumps(run_torchvision_worker(json.load(handle))), flush=True)
        return 0
    parser = build_parser()
    args = parser.parse_args(argv)
    if "torchvision" in args.sides and not os.access(args.torch_python, os.X_OK):
        parser.error(f"--torch_python {args.torch_python}: not an executable; point it to the python of a venv with "
                     f"torch and torchvision (bench/requirements.txt)")
    import demo

    _, _, cfg = demo.parse_args(demo_argv(args))
    results = []

    def report(result):
        results.append(result)
        print(f"{result['side']:12s} steps {result['steps']:5d}  train {result['train_seconds']:7.1f} s  "
              f"bbox AP {result['bbox_AP']:.3f}  segm AP {result['segm_AP']:.3f}", flush=True)

    if "ours" in args.sides:
        report(run_ours(args, demo_argv(args))[0])
    if "torchvision" in args.sides:
        if "ours" not in args.sides:
            demo.make_dataset(demo.parse_args(demo_argv(args))[0], cfg)
        report(run_torchvision(torch_job(args, cfg), args.torch_python))
    rows = table_rows(results, args)
    print(rows, end="")
    if args.results:
        append_rows(args.results, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
