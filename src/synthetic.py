"""A small synthetic COCO 2017 dataset of coloured shapes, for tests, benchmarks and the demo.

The images have textured backgrounds and 1..6 overlapping shapes. Later shapes occlude earlier ones, and
every annotation describes the VISIBLE pixels of its shape: polygons are traced from the visible mask,
and bbox/area are measured on the rasterised polygons (so they agree with ``COCO.annToMask`` exactly).
A shape that would punch a hole into an earlier one is re-drawn elsewhere, because a COCO polygon
cannot describe a hole. Some images also hold an ``iscrowd: 1`` cluster of small blobs stored as
uncompressed RLE, as in COCO. Output is byte-for-byte deterministic for a given seed.

That is the "cluttered" style (tests, benchmarks). The "simple" style (the demo's, see docs/demo_results.md)
keeps the shapes and image sizes but draws 1..4 upright shapes that do not touch and lie wholly inside the
image, in colours that stand out from a flat, lightly noisy background, without crowd regions: a task a
ResNet50 learns from scratch in minutes (cut-off and rotated shapes kept its classifier near chance).

    python -m src.synthetic --out data/synthetic_coco --train 64 --val 16 --seed 0 [--style simple]
"""
from __future__ import annotations

import argparse
import hashlib
import os
from dataclasses import dataclass
from typing import Dict, List, Tuple

import cv2
import numpy as np
from pycocotools import mask as mask_utils

if not __package__:                 # run as a file: python src/synthetic.py
    import _file_run  # noqa: F401

from src import atomic_io

CATEGORY_NAMES = ("rectangle", "ellipse", "triangle", "star")   # COCO ids 1..4, in this order

MAX_INSTANCES = 6
MIN_VISIBLE_PIXELS = 40            # instances with fewer visible pixels are dropped
SHAPE_SIZE_RANGE = (0.12, 0.45)    # shape radius as a fraction of the shorter image side
PLACEMENT_ATTEMPTS = 8             # re-draws of a shape that would cut a hole into an earlier one
CROWD_EVERY = 3                    # image i gets a crowd region when i % CROWD_EVERY == 1
CROWD_BLOBS = (4, 10)              # blobs per crowd cluster
CROWD_BLOB_RADIUS = (2, 5)
JPEG_QUALITY = 90
CONTOUR_UPSAMPLE = 2               # see mask_to_polygons
VAL_ID_OFFSET = 100000             # val image ids start here, so ids are unique across splits


@dataclass(frozen=True)
class SceneStyle:
    """How hard the scenes are."""
    max_instances: int
    textured_background: bool      # gradient + blotches (else one flat colour), both with pixel noise
    occlusion: bool                # shapes may overlap (else they keep SHAPE_GAP pixels apart)
    crowd_regions: bool            # every CROWD_EVERY-th image gets an iscrowd cluster
    min_contrast: float            # least RGB distance of a shape's colour from the background's mean
    whole_shapes: bool = False     # every shape lies wholly inside the image (else the border may cut it)
    upright: bool = False          # no random rotation: axis-aligned rectangles/ellipses, a vertex on top


STYLES = {
    "cluttered": SceneStyle(MAX_INSTANCES, textured_background=True, occlusion=True, crowd_regions=True,
                            min_contrast=0.0),
    "simple": SceneStyle(4, textured_background=False, occlusion=False, crowd_regions=False, min_contrast=120.0,
                         whole_shapes=True, upright=True),
}
UPRIGHT = -0.5 * np.pi             # rotation that puts a triangle's or star's first vertex on top
SHAPE_GAP = 3                      # pixels between shapes of a style without occlusion
COLOUR_ATTEMPTS = 32               # draws of a shape colour that must stand out from the background


@dataclass
class Instance:
    category_id: int
    visible: np.ndarray            # (h, w) bool, pixels of this instance not covered by later ones
    iscrowd: int


# ---------------------------------------------------------------- drawing

def _background(rng: np.random.Generator, height: int, width: int, textured: bool) -> np.ndarray:
    """Gradient between two colours + blotchy low-frequency noise + pixel noise (textured), or one flat
    colour + pixel noise; (h, w, 3) float32."""
    if not textured:
        colour = rng.uniform(30, 225, size=3).astype(np.float32)
        return colour + rng.normal(0.0, 8.0, size=(height, width, 3)).astype(np.float32)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    angle = rng.uniform(0.0, 2.0 * np.pi)
    ramp = (np.cos(angle) * xx + np.sin(angle) * yy)
    ramp = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1.0)
    colour_a, colour_b = rng.uniform(30, 225, size=(2, 3)).astype(np.float32)
    image = colour_a + ramp[..., None] * (colour_b - colour_a)
    grid = rng.normal(0.0, 25.0, size=(rng.integers(3, 9), rng.integers(3, 9), 3)).astype(np.float32)
    image += cv2.resize(grid, (width, height), interpolation=cv2.INTER_CUBIC)
    image += rng.normal(0.0, 8.0, size=image.shape).astype(np.float32)
    return image


def _shape_polygon(rng: np.random.Generator, category: str, centre: np.ndarray, radius: float,
                   rotation: float) -> np.ndarray:
    """Outline of one shape as (K, 2) float x, y points."""
    if category == "rectangle":
        half = radius * rng.uniform(0.35, 1.0, size=2)
        corners = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], np.float64) * half
        angles = np.arctan2(corners[:, 1], corners[:, 0]) + rotation
        lengths = np.hypot(corners[:, 0], corners[:, 1])
    elif category == "ellipse":
        angles = np.linspace(0.0, 2.0 * np.pi, 48, endpoint=False)
        axes = radius * rng.uniform(0.4, 1.0, size=2)
        local = np.stack([axes[0] * np.cos(angles), axes[1] * np.sin(angles)], axis=1)
        angles = np.arctan2(local[:, 1], local[:, 0]) + rotation
        lengths = np.hypot(local[:, 0], local[:, 1])
    elif category == "triangle":
        angles = np.array([0.0, 2.0, 4.0]) * np.pi / 3.0 + rng.uniform(-0.4, 0.4, size=3) + rotation
        lengths = radius * rng.uniform(0.7, 1.0, size=3)
    elif category == "star":
        angles = np.arange(10) * np.pi / 5.0 + rotation
        lengths = np.where(np.arange(10) % 2 == 0, radius, radius * rng.uniform(0.38, 0.55))
    else:
        raise ValueError(f"unknown synthetic category '{category}'")
    return centre + np.stack([lengths * np.cos(angles), lengths * np.sin(angles)], axis=1)


def _fill(polygon: np.ndarray, height: int, width: int) -> np.ndarray:
    """Rasterise a float polygon (sub-pixel precise) to a (h, w) bool mask."""
    shift = 4
    mask = np.zeros((height, width), np.uint8)
    points = np.round(polygon * (1 << shift)).astype(np.int32)
    cv2.fillPoly(mask, [points], 1, lineType=cv2.LINE_8, shift=shift)
    return mask.astype(bool)


def _shape_colour(rng: np.random.Generator, background_mean: np.ndarray, min_contrast: float) -> np.ndarray:
    """A random RGB colour at least `min_contrast` away from the background's mean (best of the draws)."""
    best, best_distance = None, -1.0
    for _ in range(COLOUR_ATTEMPTS):
        colour = rng.uniform(0, 255, size=3).astype(np.float32)
        distance = float(np.linalg.norm(colour - background_mean))
        if distance > best_distance:
            best, best_distance = colour, distance
        if distance >= min_contrast:
            break
    return best


def _paint(rng: np.random.Generator, image: np.ndarray, mask: np.ndarray, colour: np.ndarray) -> None:
    """Paint a mask with `colour`, a soft shading ramp and some texture, in place."""
    height, width = mask.shape
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    direction = rng.normal(size=2)
    shade = (direction[0] * xx + direction[1] * yy) / max(height, width)
    texture = rng.normal(0.0, 6.0, size=(height, width, 3)).astype(np.float32)
    image[mask] = (colour + 40.0 * shade[..., None] + texture)[mask]


def _has_hole(visible: np.ndarray) -> bool:
    """True if the mask has an enclosed hole (a contour with a parent), which polygons cannot express."""
    _, hierarchy = cv2.findContours(visible.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    return hierarchy is not None and bool((hierarchy[0][:, 3] >= 0).any())


def _crowd_mask(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A cluster of small round blobs around a random centre; (h, w) bool."""
    mask = np.zeros((height, width), np.uint8)
    centre = rng.uniform([0.2 * width, 0.2 * height], [0.8 * width, 0.8 * height])
    spread = 0.12 * min(height, width)
    for _ in range(rng.integers(*CROWD_BLOBS, endpoint=True)):
        x, y = centre + rng.normal(0.0, spread, size=2)
        cv2.circle(mask, (int(round(x)), int(round(y))), int(rng.integers(*CROWD_BLOB_RADIUS, endpoint=True)), 1, -1)
    return mask.astype(bool)


def _fits(shape: np.ndarray, owner: np.ndarray, instances: List[Instance], occlusion: bool) -> bool:
    """Whether a new shape may be drawn: it is not empty, cuts no hole into an earlier shape and, without
    occlusion, stays SHAPE_GAP pixels away from every earlier one."""
    if not shape.any():
        return False
    if not occlusion:
        gap = cv2.dilate(shape.astype(np.uint8), np.ones((2 * SHAPE_GAP + 1,) * 2, np.uint8)).astype(bool)
        return not (owner[gap] >= 0).any()
    candidate = np.where(shape, len(instances), owner)
    return not any(_has_hole(candidate == i) for i, inst in enumerate(instances) if not inst.iscrowd)


def _inside(polygon: np.ndarray, height: int, width: int) -> bool:
    return bool(polygon.min() >= 0.0 and polygon[:, 0].max() <= width and polygon[:, 1].max() <= height)


def render_image(rng: np.random.Generator, height: int, width: int, with_crowd: bool,
                 style: SceneStyle = STYLES["cluttered"]) -> Tuple[np.ndarray, List[Instance]]:
    """One image (h, w, 3) uint8 RGB and its instances with visible masks, in drawing order."""
    image = _background(rng, height, width, style.textured_background)
    background_mean = image.reshape(-1, 3).mean(axis=0)
    owner = np.full((height, width), -1, np.int32)     # index of the instance that shows at each pixel
    instances: List[Instance] = []
    if with_crowd and style.crowd_regions:
        crowd = _crowd_mask(rng, height, width)
        _paint(rng, image, crowd, _shape_colour(rng, background_mean, style.min_contrast))
        owner[crowd] = 0
        instances.append(Instance(int(rng.integers(1, len(CATEGORY_NAMES) + 1)), crowd, iscrowd=1))
    for _ in range(rng.integers(1, style.max_instances + 1)):
        category_id = int(rng.integers(1, len(CATEGORY_NAMES) + 1))
        for _attempt in range(PLACEMENT_ATTEMPTS):
            radius = rng.uniform(*SHAPE_SIZE_RANGE) * min(height, width)
            margin = radius if style.whole_shapes else 0.0
            centre = rng.uniform([margin, margin], [width - margin, height - margin])
            rotation = UPRIGHT if style.upright else rng.uniform(0.0, 2.0 * np.pi)
            polygon = _shape_polygon(rng, CATEGORY_NAMES[category_id - 1], centre, radius, rotation)
            if style.whole_shapes and not _inside(polygon, height, width):
                continue
            shape = _fill(polygon, height, width)
            if not _fits(shape, owner, instances, style.occlusion):
                continue
            _paint(rng, image, shape, _shape_colour(rng, background_mean, style.min_contrast))
            owner = np.where(shape, len(instances), owner)
            instances.append(Instance(category_id, shape, iscrowd=0))
            break
    for index, inst in enumerate(instances):
        inst.visible = owner == index
    kept = [inst for inst in instances if inst.visible.sum() >= MIN_VISIBLE_PIXELS]
    return np.clip(image, 0, 255).astype(np.uint8), kept


# ---------------------------------------------------------------- COCO encoding

def mask_to_polygons(visible: np.ndarray) -> List[List[float]]:
    """Outer contours of a mask as COCO polygons [x0, y0, x1, y1, ...] that rasterise back to the mask.

    Contours traced on the pixel grid pass through boundary pixel centres and would lose half a pixel
    all round; tracing a 2x upsampled mask puts the outline between pixel centres instead.
    """
    upsampled = cv2.resize(visible.astype(np.uint8), None, fx=CONTOUR_UPSAMPLE, fy=CONTOUR_UPSAMPLE,
                           interpolation=cv2.INTER_NEAREST)
    contours, _ = cv2.findContours(upsampled, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    return [[round(float(v), 2) for v in ((contour.reshape(-1, 2) + 0.5) / CONTOUR_UPSAMPLE).ravel()]
            for contour in contours if len(contour) >= 3]


def uncompressed_rle(visible: np.ndarray) -> Dict:
    """COCO uncompressed RLE: run lengths over the column-major flattened mask, starting with zeros."""
    flat = visible.T.ravel().astype(np.int8)
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0] == 1:
        counts = [0] + counts
    return {"counts": counts, "size": list(visible.shape)}


def _annotation(inst: Instance, ann_id: int, image_id: int, height: int, width: int):
    """COCO annotation dict with bbox/area measured on the encoded segmentation, or None if empty."""
    if inst.iscrowd:
        segmentation = uncompressed_rle(inst.visible)
        rle = mask_utils.frPyObjects(segmentation, height, width)
    else:
        segmentation = mask_to_polygons(inst.visible)
        if not segmentation:
            return None
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    area = float(mask_utils.area(rle))
    if area < MIN_VISIBLE_PIXELS:
        return None
    return {"id": ann_id, "image_id": image_id, "category_id": inst.category_id,
            "segmentation": segmentation, "area": area,
            "bbox": [float(v) for v in mask_utils.toBbox(rle)], "iscrowd": inst.iscrowd}


def _write_split(out_dir: str, split: str, num_images: int, seed: int, split_index: int,
                 min_size: int, max_size: int, style: SceneStyle) -> None:
    image_dir = os.path.join(out_dir, split)
    os.makedirs(image_dir, exist_ok=True)
    images, annotations = [], []
    for index in range(num_images):
        rng = np.random.default_rng([seed, split_index, index])
        height, width = (int(v) for v in rng.integers(min_size, max_size, size=2, endpoint=True))
        image, instances = render_image(rng, height, width, index % CROWD_EVERY == 1, style)
        image_id = split_index * VAL_ID_OFFSET + index + 1
        file_name = f"{image_id:012d}.jpg"
        ok, encoded = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR),
                                   [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
        if not ok:
            raise RuntimeError(f"JPEG encoding failed for {file_name}")
        atomic_io.write_bytes(os.path.join(image_dir, file_name), encoded.tobytes())
        images.append({"id": image_id, "file_name": file_name, "height": height, "width": width})
        for inst in instances:
            ann = _annotation(inst, len(annotations) + 1, image_id, height, width)
            if ann is not None:
                annotations.append(ann)
    coco = {"info": {"description": "synthetic shapes", "version": "1.0"}, "licenses": [],
            "images": images, "annotations": annotations,
            "categories": [{"id": i + 1, "name": name, "supercategory": "shape"}
                           for i, name in enumerate(CATEGORY_NAMES)]}
    atomic_io.write_json(os.path.join(out_dir, "annotations", f"instances_{split}.json"), coco,
                         separators=(",", ":"))


def generator_fingerprint() -> str:
    """Hash of this module's code: a set cached by an older generator (e.g. before a style changed) differs."""
    with open(os.path.abspath(__file__), "rb") as handle:
        return hashlib.sha256(handle.read()).hexdigest()[:16]


def make_synthetic_coco(out_dir: str, num_train: int = 8, num_val: int = 4, seed: int = 0,
                        min_size: int = 100, max_size: int = 260, style: str = "cluttered") -> str:
    """Write train2017/, val2017/ and annotations/instances_{train,val}2017.json under out_dir."""
    if style not in STYLES:
        raise ValueError(f"unknown style '{style}', expected one of {sorted(STYLES)}")
    if not 0 < min_size <= max_size:
        raise ValueError(f"need 0 < min_size <= max_size, got {min_size}, {max_size}")
    if num_train < 0 or num_val < 0:
        raise ValueError(f"image counts must be >= 0, got train={num_train}, val={num_val}")
    for split_index, (split, count) in enumerate((("train2017", num_train), ("val2017", num_val))):
        _write_split(out_dir, split, count, seed, split_index, min_size, max_size, STYLES[style])
    return out_dir


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output directory (COCO 2017 layout)")
    parser.add_argument("--train", type=int, default=64, help="number of training images")
    parser.add_argument("--val", type=int, default=16, help="number of validation images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-size", type=int, default=100, help="smallest image side in pixels")
    parser.add_argument("--max-size", type=int, default=260, help="largest image side in pixels")
    parser.add_argument("--style", choices=sorted(STYLES), default="cluttered", help="scene difficulty")
    args = parser.parse_args(argv)
    make_synthetic_coco(args.out, args.train, args.val, args.seed, args.min_size, args.max_size, args.style)
    print(f"wrote {args.train} train + {args.val} val images to {args.out}")


if __name__ == "__main__":
    main()
