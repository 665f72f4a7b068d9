"""Detect and segment objects in images; draw the results and save them with a JSON of the detections.

    python predict.py --checkpoint_path CKPT IMAGE_OR_DIR [--out predictions] [--score_thr 0.5] [--config ...]

Writes <out>/<image file name>.png (masks overlaid, boxes, class names and scores) per image and
<out>/predictions.json. Images go through the eval pipeline's transform and the model one at a time.
A file that cannot be read or decoded (an empty file too) is skipped with a message naming it; the exit
status is 1 only when no image could be read.
"""
from __future__ import annotations

import argparse
import colorsys
import os
import sys
from typing import List, Sequence

import cv2
import numpy as np

from src.config import Config, config_from_args
from src import atomic_io, compile_cache
from src.cli import check_output_dirs, run_script
from src.detections import Detections, detections_from_outputs
from src.image_input import read_image_input
from src.inference import build_inference_net, setup_context

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
PREDICTIONS_FILE = "predictions.json"
MASK_ALPHA = 0.45                  # weight of the class colour over masked pixels
FONT = cv2.FONT_HERSHEY_SIMPLEX
FONT_SCALE_PER_PIXEL = 1.0 / 800   # label text scale relative to the longer image side
MIN_FONT_SCALE = 0.35
LIGHT_BACKGROUND = 150             # label text is black on class colours brighter than this (luma), else white


def list_images(path: str) -> List[str]:
    """One image file, or the image files of a directory (sorted); clear errors for nothing to do."""
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise FileNotFoundError(f"'{path}' is neither an image file nor a directory")
    images = sorted(os.path.join(path, name) for name in os.listdir(path)
                    if name.lower().endswith(IMAGE_SUFFIXES) and os.path.isfile(os.path.join(path, name)))
    if not images:
        raise ValueError(f"directory '{path}' holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return images


def class_colour(label: int) -> tuple:
    """A fixed, well-spread BGR colour per class."""
    hue = (label * 0.618033988749895) % 1.0                 # golden-ratio steps spread any number of classes
    r, g, b = colorsys.hsv_to_rgb(hue, 0.85, 0.95)
    return int(b * 255), int(g * 255), int(r * 255)


def draw_detections(rgb: np.ndarray, detections: Detections, class_names: Sequence[str]) -> np.ndarray:
    """(h, w, 3) RGB -> BGR picture with every detection's mask, box and 'class score' label."""
    canvas = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR).astype(np.float32)
    colours = [class_colour(int(label)) for label in detections.labels]
    for mask, colour in zip(detections.masks, colours):
        region = mask.astype(bool)
        canvas[region] = (1.0 - MASK_ALPHA) * canvas[region] + MASK_ALPHA * np.array(colour, np.float32)
    canvas = canvas.round().astype(np.uint8)
    font_scale = max(MIN_FONT_SCALE, max(rgb.shape[:2]) * FONT_SCALE_PER_PIXEL)
    thickness = max(1, int(round(font_scale * 2)))
    for box, score, label, colour in zip(detections.boxes, detections.scores, detections.labels, colours):
        x1, y1, x2, y2 = (int(round(float(v))) for v in box)
        cv2.rectangle(canvas, (x1, y1), (x2, y2), colour, thickness)
        text = f"{class_names[int(label)]} {float(score):.2f}"
        (text_w, text_h), baseline = cv2.getTextSize(text, FONT, font_scale, thickness)
        top = max(y1 - text_h - baseline, 0)
        cv2.rectangle(canvas, (x1, top), (x1 + text_w, top + text_h + baseline), colour, cv2.FILLED)
        blue, green, red = colour
        ink = (0, 0, 0) if 0.299 * red + 0.587 * green + 0.114 * blue > LIGHT_BACKGROUND else (255, 255, 255)
        cv2.putText(canvas, text, (x1, top + text_h), FONT, font_scale, ink, thickness, cv2.LINE_AA)
    return canvas


def detections_json(detections: Detections, class_names: Sequence[str]) -> List[dict]:
    return [{"class": class_names[int(label)], "label": int(label), "score": float(score),
             "bbox": [float(v) for v in box], "mask_area": int(mask.sum())}
            for box, score, label, mask in zip(detections.boxes, detections.scores, detections.labels,
                                                detections.masks)]


def _filtered(detections: Detections, score_thr: float) -> Detections:
    keep = detections.scores >= score_thr
    return Detections(detections.boxes[keep], detections.scores[keep], detections.labels[keep],
                      detections.masks[keep])


def predict(cfg: Config, checkpoint_path: str, source: str, out_dir: str, score_thr: float) -> List[dict]:
    """Returns the per-image records written to predictions.json.

    Files that cannot be read or decoded are skipped with a message; it is an error only when none could.
    """
    from mindspore import Tensor
    from src.data.transforms import EvalTransform

    if not 0.0 <= score_thr <= 1.0:
        raise ValueError(f"--score_thr must be in [0, 1], got {score_thr}")
    images = list_images(source)                      # before the network is built: fail fast
    compile_cache.enable(cfg, setup_context(cfg.train.device_target), "predict")
    net = build_inference_net(cfg, checkpoint_path)
    transform = EvalTransform(cfg)
    records, skipped = [], []
    for path in images:
        try:
            rgb, image, image_shape = read_image_input(path, transform)
        except (FileNotFoundError, ValueError) as err:      # one bad file must not cost the others
            print(f"skipped: {err}", file=sys.stderr)
            skipped.append(str(err))
            continue
        outputs = [out.asnumpy()[0] for out in net(Tensor(image), Tensor(image_shape))]
        compile_cache.publish()
        detections = _filtered(detections_from_outputs(*outputs, image_shape[0], cfg.test.mask_thr_binary,
                                                       cfg.test.mask_paste),
                               score_thr)
        picture = os.path.join(out_dir, os.path.basename(path) + ".png")
        ok, encoded = cv2.imencode(".png", draw_detections(rgb, detections, cfg.data.classes))
        if not ok:
            raise ValueError(f"cannot encode the picture of '{path}'")
        atomic_io.write_bytes(picture, encoded.tobytes())
        records.append({"image": path, "picture": picture, "height": int(rgb.shape[0]), "width": int(rgb.shape[1]),
                        "detections": detections_json(detections, cfg.data.classes)})
        print(f"{path}: {len(detections)} detections -> {picture}")
    if not records:
        more = f" (and {len(skipped) - 1} more)" if len(skipped) > 1 else ""
        raise ValueError(f"no image could be read: {skipped[0]}{more}")
    atomic_io.write_json(os.path.join(out_dir, PREDICTIONS_FILE), records)
    if skipped:
        print(f"{len(records)} of {len(images)} images predicted, {len(skipped)} skipped (listed above)")
    return records


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Draw Mask R-CNN detections on images.")
    parser.add_argument("source", help="an image file or a directory of images")
    parser.add_argument("--checkpoint_path", required=True, help="trained checkpoint (.ckpt)")
    parser.add_argument("--out", default="predictions", help="output directory")
    parser.add_argument("--score_thr", type=float, default=0.5, help="draw and list detections scoring at least this")
    args, cfg = config_from_args(parser, argv)
    check_output_dirs({"--out": args.out})
    predict(cfg, args.checkpoint_path, args.source, args.out, args.score_thr)


if __name__ == "__main__":
    run_script(main, sys.argv[1:])
