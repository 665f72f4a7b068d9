"""Augmentation and normalisation of one sample: record columns -> network input columns.

Training augmentation follows the recipe: expand (probability expand_ratio * EXPAND_COIN, canvas filled
with the mean), keep-ratio rescale into img_height x img_width, horizontal flip, photometric distortion.
All geometric steps are folded into one affine map applied identically to image, boxes and masks.
`data.resize_mode: short_long` sizes images torchvision's way (short side min_size, long side at most max_size,
floor rounding); `data.resize_kernel: torch` resamples eval images with torch's bilinear rule (edge clamped)
instead of cv2.warpAffine (zero border, 1/32-px positions). docs/torchvision_differences.md 2-4.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence, Tuple

import cv2
import numpy as np
from pycocotools import mask as mask_utils

from src.config import Config
from src.data.mask_bits import pack_masks
from src.data.records import column_bytes, column_scalar, decode_image, decode_instances
from src.mask_paste import torch_bilinear_matrix

EXPAND_RATIO_RANGE = (1.0, 4.0)              # canvas side / image side for the expand augmentation (mmdet)
EXPAND_COIN = 0.5                            # the recipe's Expand flips its own coin: expand_ratio 1.0 -> 50 %
BRIGHTNESS_DELTA = 32.0                      # photometric distortion ranges (mmdet PhotoMetricDistortion)
CONTRAST_RANGE = (0.5, 1.5)
SATURATION_RANGE = (0.5, 1.5)
HUE_DELTA = 18.0                             # degrees
PHOTO_STEP_PROBABILITY = 0.5                 # each distortion step (and the channel shuffle) has this chance
SAMPLE_STREAM = 1                            # separates per-image RNG streams from the shuffle stream (pipeline)


@dataclass
class Geometry:
    """Continuous map from source pixels to input pixels: x' = scale_w * (x + left), optionally mirrored.

    The source is placed at (top, left) on a canvas of canvas_h x canvas_w (the expand augmentation;
    canvas = source without it), the canvas is scaled to out_h x out_w <= H x W, and mirrored if `flip`.
    Pixel i spans [i, i+1).
    """
    canvas_h: int
    canvas_w: int
    top: int
    left: int
    out_h: int
    out_w: int
    flip: bool = False

    @property
    def scale_h(self) -> float:
        return self.out_h / self.canvas_h

    @property
    def scale_w(self) -> float:
        return self.out_w / self.canvas_w

    def image_shape(self) -> np.ndarray:
        return np.array([self.canvas_h, self.canvas_w, self.scale_h, self.scale_w], np.float32)

    def _axis_maps(self) -> Tuple[Tuple[float, float], Tuple[float, float]]:
        """((a_x, b_x), (a_y, b_y)) with x' = a_x * x + b_x in continuous coordinates."""
        ax, bx = self.scale_w, self.scale_w * self.left
        if self.flip:
            ax, bx = -ax, self.out_w - bx
        return (ax, bx), (self.scale_h, self.scale_h * self.top)

    def pixel_matrix(self) -> np.ndarray:
        """2x3 matrix for cv2.warpAffine, which maps pixel indices (centres at i, not i + 0.5)."""
        (ax, bx), (ay, by) = self._axis_maps()
        return np.array([[ax, 0.0, bx + 0.5 * ax - 0.5], [0.0, ay, by + 0.5 * ay - 0.5]], np.float64)

    def boxes(self, boxes: np.ndarray) -> np.ndarray:
        """(n, 4) x1, y1, x2, y2 source pixels -> input pixels, clipped to the valid region."""
        (ax, bx), (ay, by) = self._axis_maps()
        xs, ys = boxes[:, [0, 2]] * ax + bx, boxes[:, [1, 3]] * ay + by
        out = np.stack([xs.min(1), ys.min(1), xs.max(1), ys.max(1)], axis=1)
        return np.clip(out, 0.0, [self.out_w, self.out_h, self.out_w, self.out_h]).astype(np.float32)


def fitted_size(canvas_h: int, canvas_w: int, cfg: Config) -> Tuple[int, int]:
    """(out_h, out_w): keep-ratio fit inside img_height x img_width, or exactly that size; with resize_mode
    short_long, torchvision's size: scale = min(min_size / short side, max_size / long side) in float64,
    each side floor(side * scale)."""
    height, width = cfg.data.img_height, cfg.data.img_width
    if cfg.data.resize_mode == "short_long":
        scale = min(cfg.data.min_size / min(canvas_h, canvas_w), cfg.data.max_size / max(canvas_h, canvas_w))
        out_h, out_w = max(1, math.floor(canvas_h * scale)), max(1, math.floor(canvas_w * scale))
        if out_h > height or out_w > width:
            raise ValueError(f"a {canvas_h}x{canvas_w} image resized to {out_h}x{out_w} (data.min_size "
                             f"{cfg.data.min_size}, data.max_size {cfg.data.max_size}) does not fit the "
                             f"{height}x{width} canvas: set data.img_height and data.img_width to at least "
                             f"data.max_size rounded up to 32")
        return out_h, out_w
    if not cfg.data.keep_ratio:
        return height, width
    scale = min(height / canvas_h, width / canvas_w)
    return min(height, max(1, int(round(canvas_h * scale)))), min(width, max(1, int(round(canvas_w * scale))))


def _random_geometry(rng: np.random.Generator, height: int, width: int, cfg: Config) -> Geometry:
    canvas_h, canvas_w, top, left = height, width, 0, 0
    if rng.random() < cfg.data.expand_ratio * EXPAND_COIN:
        ratio = rng.uniform(*EXPAND_RATIO_RANGE)
        canvas_h, canvas_w = int(height * ratio), int(width * ratio)
        top, left = int(rng.integers(0, canvas_h - height + 1)), int(rng.integers(0, canvas_w - width + 1))
    out_h, out_w = fitted_size(canvas_h, canvas_w, cfg)
    return Geometry(canvas_h, canvas_w, top, left, out_h, out_w, flip=bool(rng.random() < cfg.data.flip_ratio))


def photometric_distortion(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """Random brightness, contrast, saturation, hue and channel order, each with PHOTO_STEP_PROBABILITY.

    (h, w, 3) RGB in, float32 in [0, 255] out. Same steps and ranges as the recipe (mmdet).
    """
    image = image.astype(np.float32)
    if rng.random() < PHOTO_STEP_PROBABILITY:
        image += rng.uniform(-BRIGHTNESS_DELTA, BRIGHTNESS_DELTA)
    contrast_first = rng.random() < 0.5          # contrast before or after the HSV steps, equally often
    contrast = rng.uniform(*CONTRAST_RANGE) if rng.random() < PHOTO_STEP_PROBABILITY else None
    if contrast is not None and contrast_first:
        image *= contrast
    saturation = rng.uniform(*SATURATION_RANGE) if rng.random() < PHOTO_STEP_PROBABILITY else None
    hue = rng.uniform(-HUE_DELTA, HUE_DELTA) if rng.random() < PHOTO_STEP_PROBABILITY else None
    if saturation is not None or hue is not None:
        hsv = cv2.cvtColor(np.clip(image, 0.0, 255.0) / 255.0, cv2.COLOR_RGB2HSV)   # H in degrees, S, V in [0, 1]
        if saturation is not None:
            hsv[..., 1] = np.clip(hsv[..., 1] * saturation, 0.0, 1.0)
        if hue is not None:
            hsv[..., 0] = np.mod(hsv[..., 0] + hue, 360.0)
        image = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB) * 255.0
    if contrast is not None and not contrast_first:
        image *= contrast
    if rng.random() < PHOTO_STEP_PROBABILITY:
        image = image[..., rng.permutation(3)]
    return np.clip(image, 0.0, 255.0)


def warp_planes(planes: Sequence[np.ndarray], geometry: Geometry, out: np.ndarray) -> np.ndarray:
    """Warp each (h, w) source plane into out[i] (H, W) in place, bilinearly; outside the source is 0.

    Warping plane by plane straight into the (n, H, W) output avoids an HWC -> CHW copy of the largest
    arrays of the pipeline. uint8 planes round at 0.5, so 0/1 masks stay 0/1.
    """
    matrix = geometry.pixel_matrix()
    height, width = out.shape[1:]
    for plane, target in zip(planes, out):
        cv2.warpAffine(np.ascontiguousarray(plane), matrix, (width, height), dst=target, flags=cv2.INTER_LINEAR,
                       borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return out


class _Normaliser:
    """Normalise an RGB image and warp it into the zero-padded (3, H, W) float32 input."""

    def __init__(self, cfg: Config, kernel: str = "warp"):
        self.height, self.width = cfg.data.img_height, cfg.data.img_width
        self.mean = np.asarray(cfg.data.img_mean, np.float32)
        self.inv_std = 1.0 / np.asarray(cfg.data.img_std, np.float32)
        self.kernel = kernel

    def __call__(self, image: np.ndarray, geometry: Geometry) -> np.ndarray:
        # normalising first (at source size) makes the warp's zero border the mean colour: expand canvas
        normalised = (image.astype(np.float32) - self.mean) * self.inv_std                  # (h, w, 3)
        if self.kernel == "torch":
            return self._torch_resize(normalised, geometry)
        out = warp_planes(cv2.split(normalised), geometry, np.empty((3, self.height, self.width), np.float32))
        out[:, geometry.out_h:] = 0.0            # bilinear taps can reach half a pixel past the valid region
        out[:, :, geometry.out_w:] = 0.0
        return out

    def _torch_resize(self, normalised: np.ndarray, geometry: Geometry) -> np.ndarray:
        """torch's F.interpolate(bilinear, align_corners=False) of the whole image to out_h x out_w, zero-padded."""
        if geometry.flip or geometry.top or geometry.left or (geometry.canvas_h, geometry.canvas_w) != \
                normalised.shape[:2]:
            raise ValueError("resize_kernel 'torch' resizes whole images only (no expand or flip: eval inputs)")
        rows = torch_bilinear_matrix(geometry.out_h, geometry.canvas_h)                   # (out_h, h)
        cols = torch_bilinear_matrix(geometry.out_w, geometry.canvas_w)                   # (out_w, w)
        out = np.zeros((3, self.height, self.width), np.float32)
        for channel in range(3):
            out[channel, :geometry.out_h, :geometry.out_w] = rows @ normalised[..., channel] @ cols.T
        return out


class TrainTransform:
    """Record columns -> training columns (the masks as bits, src/data/mask_bits.py); every random decision comes
    from (seed, epoch, image_id)."""

    def __init__(self, cfg: Config, epoch: int):
        self.cfg, self.epoch = cfg, epoch
        self.normalise = _Normaliser(cfg)
        self.max_instances = cfg.data.max_instance_count

    def __call__(self, image, image_id, num_instances, annotation, masks):
        d = self.cfg.data
        rng = np.random.default_rng([self.cfg.train.seed, self.epoch, SAMPLE_STREAM, column_scalar(image_id)])
        rgb = decode_image(column_bytes(image))
        height, width = rgb.shape[:2]
        rows, rles = decode_instances(num_instances, annotation, masks)
        targets = np.flatnonzero(rows[:, 5] == 0)[:self.max_instances]       # crowd regions are not targets
        n = targets.size

        geometry = _random_geometry(rng, height, width, self.cfg)
        if rng.random() < d.photo_ratio:
            rgb = photometric_distortion(rng, rgb)
        out_image = self.normalise(rgb, geometry)                              # (3, H, W)

        box = np.zeros((self.max_instances, 4), np.float32)
        label = np.zeros(self.max_instances, np.int32)
        valid = np.zeros(self.max_instances, np.bool_)
        mask = np.zeros((self.max_instances, d.img_height, d.img_width), np.uint8)
        if n:
            box[:n] = geometry.boxes(rows[targets, :4])
            label[:n] = rows[targets, 4].astype(np.int32)
            valid[:n] = True
            source_masks = mask_utils.decode([{"size": [height, width], "counts": rles[i]} for i in targets])
            warp_planes(source_masks.transpose(2, 0, 1), geometry, mask[:n])          # (h, w, n) -> (n, H, W)
        return out_image, geometry.image_shape(), box, label, valid, pack_masks(mask)


class EvalTransform:
    """Record columns -> eval columns: keep-ratio rescale (data.resize_mode, data.resize_kernel), normalise, pad;
    no randomness."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.normalise = _Normaliser(cfg, cfg.data.resize_kernel)

    def __call__(self, image, image_id):
        rgb = decode_image(column_bytes(image))
        height, width = rgb.shape[:2]
        geometry = Geometry(height, width, 0, 0, *fitted_size(height, width, self.cfg))
        return self.normalise(rgb, geometry), geometry.image_shape(), np.int32(column_scalar(image_id))
