"""End-to-end parity with torchvision: the same Mask R-CNN checkpoint evaluated by torchvision and by our graph.

    # 1. (bench venv) train a torchvision maskrcnn_resnet50_fpn on the synthetic set for a few minutes
    .venv-bench/bin/python bench/torchvision_parity.py train --data DIR --out tv_synthetic.pth --minutes 12 [--steps N]
    # 2. (our venv) convert it, evaluate it with our eval.py and the preset, and with torchvision + pycocotools
    .venv/bin/python bench/torchvision_parity.py compare --checkpoint tv_synthetic.pth --data DIR --work WORK \
        [--bench_python .venv-bench/bin/python]

`compare` takes any torchvision Mask R-CNN state dict whose class slots match --classes (or the 91 COCO slots
with the COCO classes): it converts it (src.convert_checkpoint), writes the decoded validation images once
(so both sides see the same pixels, see docs/torchvision_differences.md 23), runs torchvision's own inference
in the bench venv on them and scores it with pycocotools, runs our eval.py with configs/torchvision.yaml (plus
the size overrides of --min_size / --max_size), and prints both APs and their difference.

torch/torchvision are bench-only (bench/requirements.txt); the training uses the standard architecture with
BatchNorm2d layers during training, folded into FrozenBatchNorm2d buffers (the same names) in the saved state
dict: the saved model is exactly torchvision's maskrcnn_resnet50_fpn with FrozenBatchNorm2d.
"""
import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_BENCH_PYTHON = os.path.join(ROOT, ".venv-bench", "bin", "python")
SYNTHETIC_CLASSES = ("rectangle", "ellipse", "triangle", "star")
MIN_SIZE, MAX_SIZE = 128, 192          # the small size both sides run at in the bench (torchvision's min/max_size)
BN_RECALIBRATION_BATCHES = 25          # batches whose mean statistics replace the running ones after training
SCORE_KEYS = ("AP", "AP50", "AP75")
FINEST_LEVEL, COARSEST_LEVEL = 2, 5    # the RoI poolers read P2..P5 (strides 4..32)


# ---------------------------------------------------------------- torchvision side (bench venv)

def build_torchvision(num_classes, min_size, max_size, frozen=True):
    """torchvision's maskrcnn_resnet50_fpn architecture without downloading anything."""
    import torch
    from torchvision.models import resnet50
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.ops import misc

    norm = misc.FrozenBatchNorm2d if frozen else torch.nn.BatchNorm2d
    body = resnet50(weights=None, norm_layer=norm)
    kwargs = {} if frozen else {"box_batch_size_per_image": 128}
    return MaskRCNN(_resnet_fpn_extractor(body, 5 if not frozen else 3), num_classes=num_classes,
                    min_size=min_size, max_size=max_size, **kwargs)


def _load_split(data_dir, split):
    """[(rgb uint8 HWC, target dict)] of one synthetic split, crowd regions dropped."""
    import torch
    from PIL import Image
    from pycocotools.coco import COCO

    coco = COCO(os.path.join(data_dir, "annotations", f"instances_{split}.json"))
    samples = []
    for image_id in sorted(coco.getImgIds()):
        info = coco.loadImgs(image_id)[0]
        rgb = np.asarray(Image.open(os.path.join(data_dir, split, info["file_name"])).convert("RGB"))
        anns = [a for a in coco.loadAnns(coco.getAnnIds(imgIds=image_id)) if not a.get("iscrowd", 0)]
        if not anns:
            continue
        boxes = np.array([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                          for a in anns], np.float32)
        target = {"boxes": torch.from_numpy(boxes),
                  "labels": torch.tensor([a["category_id"] for a in anns], dtype=torch.int64),
                  "masks": torch.from_numpy(np.stack([coco.annToMask(a) for a in anns]).astype(np.uint8))}
        samples.append((rgb, target))
    return samples


def _to_input(rgb):
    import torch
    return torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).float() / 255.0


def _frozen_state(model):
    """The trained state dict in FrozenBatchNorm2d's layout (BatchNorm2d's counters dropped)."""
    return {name: value.detach().clone() for name, value in model.state_dict().items()
            if not name.endswith("num_batches_tracked")}


def train(args):
    import torch

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    samples = _load_split(args.data, "train2017")
    num_classes = len(SYNTHETIC_CLASSES) + 1
    model = build_torchvision(num_classes, args.min_size, args.max_size, frozen=False)
    model.train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    rng = np.random.default_rng(args.seed)
    start, step, losses = time.time(), 0, []
    while (step < args.steps) if args.steps else (time.time() - start < args.minutes * 60.0):
        batch = [samples[i] for i in rng.choice(len(samples), args.batch_size, replace=False)]
        inputs, targets = [], []
        for rgb, target in batch:
            if rng.random() < 0.5:                                   # horizontal flip
                width = rgb.shape[1]
                rgb = rgb[:, ::-1]
                boxes = target["boxes"].clone()
                boxes[:, [0, 2]] = width - target["boxes"][:, [2, 0]]
                target = {"boxes": boxes, "labels": target["labels"], "masks": target["masks"].flip(-1)}
            inputs.append(_to_input(rgb))
            targets.append(target)
        loss_dict = model(inputs, targets)
        loss = sum(loss_dict.values())
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        optimizer.step()
        step += 1
        losses.append(loss.item())
        if step % 20 == 0 or step <= 3:
            print(f"step {step} {time.time() - start:.0f}s loss {np.mean(losses[-20:]):.3f} "
                  + " ".join(f"{k} {float(v):.3f}" for k, v in loss_dict.items()), flush=True)

    # BatchNorm's running averages lag the last weights: replace them by the mean statistics of training
    # batches under the final weights, which FrozenBatchNorm2d then applies at inference.
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None
    with torch.no_grad():
        for _ in range(BN_RECALIBRATION_BATCHES):
            batch = [samples[i] for i in rng.choice(len(samples), args.batch_size, replace=False)]
            images, _ = model.transform([_to_input(rgb) for rgb, _ in batch])
            model.backbone(images.tensors)
    state = _frozen_state(model)
    frozen = build_torchvision(num_classes, args.min_size, args.max_size, frozen=True)
    frozen.load_state_dict(state, strict=True)                     # the standard architecture takes it as is
    tmp = args.out + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, args.out)
    summary = {"steps": step, "minutes": (time.time() - start) / 60.0, "final_loss": float(np.mean(losses[-20:])),
               "batch_size": args.batch_size, "lr": args.lr, "train_images": len(samples)}
    print("trained: " + json.dumps(summary), flush=True)
    with open(args.out + ".json.tmp", "w", encoding="utf-8") as handle:
        json.dump(summary, handle, indent=1)
    os.replace(args.out + ".json.tmp", args.out + ".json")
    return 0


def _fix_roi_pool_strides(model):
    """Give the RoI poolers P2..P5's strides. MultiScaleRoIAlign infers them on its first call from the feature
    sizes against the largest unpadded image and keeps them: on a canvas much larger than the image (a 128 x 169
    image on 192 x 192) it infers strides 2..16 instead of 4..32."""
    from torchvision.ops.poolers import initLevelMapper

    for pool in (model.roi_heads.box_roi_pool, model.roi_heads.mask_roi_pool):
        pool.scales = [2.0 ** -level for level in range(FINEST_LEVEL, COARSEST_LEVEL + 1)]
        pool.map_levels = initLevelMapper(FINEST_LEVEL, COARSEST_LEVEL, canonical_scale=pool.canonical_scale,
                                          canonical_level=pool.canonical_level)


def torchvision_eval(args):
    """torchvision's inference on the decoded images of --images, scored by pycocotools -> JSON on stdout."""
    import torch
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    torch.set_num_threads(args.threads)
    state = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
    state = state.get("model", state)
    num_classes = state["roi_heads.box_predictor.cls_score.weight"].shape[0]
    model = build_torchvision(num_classes, args.min_size, args.max_size, frozen=True)
    model.load_state_dict({k: v for k, v in state.items() if not k.endswith("num_batches_tracked")})
    model.eval()
    if args.canvas:              # pad every image to one canvas x canvas input, as our fixed-canvas graph does
        model.transform.size_divisible = args.canvas
        _fix_roi_pool_strides(model)
    coco_gt = COCO(args.ann_file)
    slot_to_category = {i + 1: c["id"] for i, c in enumerate(sorted(coco_gt.dataset["categories"],
                                                                     key=lambda c: c["id"]))}
    if num_classes == 91:
        slot_to_category = {i: i for i in range(91)}
    images = np.load(args.images)
    results, pairs_above = [], []
    with torch.no_grad():
        for key in images.files:
            image_id = int(key)
            out = model([_to_input(images[key])])[0]
            boxes, scores, labels = out["boxes"].numpy(), out["scores"].numpy(), out["labels"].numpy()
            masks = (out["masks"][:, 0] > 0.5).numpy()
            for box, score, label, mask in zip(boxes, scores, labels, masks):
                rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
                rle["counts"] = rle["counts"].decode("ascii")
                x1, y1, x2, y2 = (float(v) for v in box)
                results.append({"image_id": image_id, "category_id": slot_to_category[int(label)],
                                "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(score), "segmentation": rle})
    metrics = {}
    for iou_type in ("bbox", "segm"):
        coco_dt = coco_gt.loadRes(results) if results else None
        if coco_dt is None:
            metrics[iou_type] = {key: 0.0 for key in SCORE_KEYS}
            continue
        evaluator = COCOeval(coco_gt, coco_dt, iou_type)
        evaluator.params.imgIds = [int(k) for k in images.files]
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
        metrics[iou_type] = dict(zip(SCORE_KEYS, (float(v) for v in evaluator.stats[:3])))
    metrics["detections"] = len(results)
    with open(args.out + ".tmp", "w", encoding="utf-8") as handle:
        json.dump({"metrics": metrics, "results": results}, handle)
    os.replace(args.out + ".tmp", args.out)
    return 0


def to_npz(args):
    """A .pth state dict -> .npz (for the converter in a venv without torch)."""
    import torch

    state = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
    state = state.get("model", state)
    np.savez(args.out + ".tmp.npz", **{name: value.numpy() for name, value in state.items()})
    os.replace(args.out + ".tmp.npz", args.out)
    return 0


# ---------------------------------------------------------------- orchestration (our venv)

def _run(command, log):
    print("$ " + " ".join(command), flush=True)
    with open(log, "w", encoding="utf-8") as handle:
        completed = subprocess.run(command, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT,
                                   env={**os.environ, "GLOG_v": "3"})
    if completed.returncode:
        raise SystemExit(f"command failed ({completed.returncode}), see {log}: {' '.join(command)}")


def _decoded_val_images(data_dir, out):
    """{image id: RGB array} of the val split as our data pipeline decodes them (cv2), saved as .npz."""
    sys.path.insert(0, ROOT)
    from src.data.records import decode_image

    with open(os.path.join(data_dir, "annotations", "instances_val2017.json"), encoding="utf-8") as handle:
        infos = json.load(handle)["images"]
    arrays = {}
    for info in infos:
        with open(os.path.join(data_dir, "val2017", info["file_name"]), "rb") as handle:
            arrays[str(info["id"])] = decode_image(handle.read())
    np.savez(out + ".tmp.npz", **arrays)
    os.replace(out + ".tmp.npz", out)


def preset_canvas(max_size):
    """Side of our fixed square canvas for the bench's size (a multiple of 64, see docs/architecture.md 8)."""
    return -(-max_size // 64) * 64


def preset_overrides(min_size, max_size, classes):
    """Command-line overrides of configs/torchvision.yaml for the bench's size and classes."""
    canvas = preset_canvas(max_size)
    return ["--data.min_size", str(min_size), "--data.max_size", str(max_size),
            "--data.img_height", str(canvas), "--data.img_width", str(canvas),
            "--data.classes", json.dumps(["background", *classes]), "--test.test_batch_size", "1"]


def detection_agreement(theirs, ours, min_iou=0.9, score_tol=0.01):
    """Share of torchvision's detections (COCO results) that have one of ours in the same image with the same
    category, box IoU >= min_iou and score within score_tol (greedy, best score first)."""
    def by_image(results):
        grouped = {}
        for r in results:
            grouped.setdefault(r["image_id"], []).append(r)
        return grouped

    ours_by_image, matched, total = by_image(ours), 0, 0
    for image_id, dets in by_image(theirs).items():
        candidates = sorted(ours_by_image.get(image_id, []), key=lambda r: -r["score"])
        used = set()
        for det in sorted(dets, key=lambda r: -r["score"]):
            total += 1
            x, y, w, h = det["bbox"]
            for index, cand in enumerate(candidates):
                if index in used or cand["category_id"] != det["category_id"] \
                        or abs(cand["score"] - det["score"]) > score_tol:
                    continue
                cx, cy, cw, ch = cand["bbox"]
                iw = max(0.0, min(x + w, cx + cw) - max(x, cx))
                ih = max(0.0, min(y + h, cy + ch) - max(y, cy))
                union = w * h + cw * ch - iw * ih
                if union > 0 and iw * ih / union >= min_iou:
                    used.add(index)
                    matched += 1
                    break
    return matched / max(total, 1)


def compare(args):
    os.makedirs(args.work, exist_ok=True)
    ann_file = os.path.join(args.data, "annotations", "instances_val2017.json")
    overrides = preset_overrides(args.min_size, args.max_size, SYNTHETIC_CLASSES)
    converted = os.path.join(args.work, "converted.ckpt")
    images = os.path.join(args.work, "val_images.npz")
    _decoded_val_images(args.data, images)
    source = args.checkpoint
    if source.endswith(".pth"):                      # our venv has no torch: hand the converter an .npz
        source = os.path.join(args.work, "torchvision_state.npz")
        _run([args.bench_python, os.path.abspath(__file__), "to-npz", "--checkpoint", args.checkpoint, "--out", source],
             os.path.join(args.work, "to_npz.log"))
    _run([sys.executable, "-m", "src.convert_checkpoint", "--src", source, "--out", converted,
          "--config", "torchvision", *overrides], os.path.join(args.work, "convert.log"))
    tv_eval = [args.bench_python, os.path.abspath(__file__), "tv-eval", "--checkpoint", args.checkpoint, "--images",
               images, "--ann_file", ann_file, "--min_size", str(args.min_size), "--max_size", str(args.max_size)]
    tv_out = os.path.join(args.work, "torchvision_eval.json")
    _run(tv_eval + ["--out", tv_out], os.path.join(args.work, "torchvision_eval.log"))
    # torchvision padded as our graph is (docs/architecture.md 5): what remains between the two is the rest
    tv_canvas_out = os.path.join(args.work, "torchvision_eval_canvas.json")
    _run(tv_eval + ["--out", tv_canvas_out, "--canvas", str(preset_canvas(args.max_size))],
         os.path.join(args.work, "torchvision_eval_canvas.log"))
    ours_dir = os.path.join(args.work, "ours")
    _run([sys.executable, "eval.py", "--config", "torchvision", "--checkpoint_path", converted, "--ann_file", ann_file,
          "--output_dir", ours_dir, "--data.coco_root", args.data,
          "--data.mindrecord_dir", os.path.join(args.work, "mindrecord"), *overrides],
         os.path.join(args.work, "eval.log"))
    with open(os.path.join(ours_dir, "eval_metrics.json"), encoding="utf-8") as handle:
        ours = json.load(handle)
    with open(os.path.join(ours_dir, "detections.json"), encoding="utf-8") as handle:
        ours_results = json.load(handle)
    report = {"ours": {k: ours[k] for k in ("bbox", "segm", "detections") if k in ours}}
    for name, path, padding in (("torchvision", tv_out, "its own padding (multiple of 32)"),
                                ("torchvision_at_our_canvas", tv_canvas_out, "padded to our canvas")):
        with open(path, encoding="utf-8") as handle:
            tv = json.load(handle)
        theirs = tv["metrics"]
        row = {"metrics": theirs, "matched_share": detection_agreement(tv["results"], ours_results)}
        print(f"torchvision, {padding}: {theirs['detections']} detections, ours {ours['detections']}; share of "
              f"torchvision's matched by ours (same class, IoU >= 0.9, score within 0.01): {row['matched_share']:.3f}")
        for iou_type in ("bbox", "segm"):
            row[f"{iou_type}_AP_difference"] = ours[iou_type]["AP"] - theirs[iou_type]["AP"]
            print(f"  {iou_type}: torchvision AP {theirs[iou_type]['AP']:.4f}, ours {ours[iou_type]['AP']:.4f}, "
                  f"difference {row[f'{iou_type}_AP_difference']:+.4f}")
        report[name] = row
    with open(os.path.join(args.work, "parity.json"), "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=1)
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("train", "tv-eval", "to-npz", "compare"):
        p = sub.add_parser(name)
        p.add_argument("--min_size", type=int, default=MIN_SIZE)
        p.add_argument("--max_size", type=int, default=MAX_SIZE)
        p.add_argument("--threads", type=int, default=2)
    t = sub.choices["train"]
    t.add_argument("--data", required=True, help="synthetic COCO directory (python -m src.synthetic)")
    t.add_argument("--out", required=True, help="state dict to write (.pth)")
    t.add_argument("--minutes", type=float, default=12.0)
    t.add_argument("--steps", type=int, default=0, help="train exactly this many steps (0: as many as --minutes allow)")
    t.add_argument("--batch_size", type=int, default=4)
    t.add_argument("--lr", type=float, default=3e-4)
    t.add_argument("--seed", type=int, default=0)
    e = sub.choices["tv-eval"]
    e.add_argument("--checkpoint", required=True)
    e.add_argument("--images", required=True, help="decoded images (.npz keyed by image id)")
    e.add_argument("--ann_file", required=True)
    e.add_argument("--out", required=True)
    e.add_argument("--canvas", type=int, default=0,
                   help="pad to canvas x canvas instead of each image's own multiple of 32 (measures row 5)")
    n = sub.choices["to-npz"]
    n.add_argument("--checkpoint", required=True)
    n.add_argument("--out", required=True)
    c = sub.choices["compare"]
    c.add_argument("--checkpoint", required=True, help="torchvision Mask R-CNN state dict (.pth or .npz)")
    c.add_argument("--data", required=True, help="synthetic COCO directory")
    c.add_argument("--work", required=True, help="output directory")
    c.add_argument("--bench_python", default=DEFAULT_BENCH_PYTHON, help="python of the torch/torchvision venv")
    args = parser.parse_args(argv)
    return {"train": train, "tv-eval": torchvision_eval, "to-npz": to_npz, "compare": compare}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
