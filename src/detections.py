"""Network outputs -> per-image detections in original image coordinates.

eval.py, postprocess.py (Ascend 310 outputs) and predict.py all turn the fixed-size network outputs (boxes
in network-input pixels, 28x28 mask probabilities) into detections through this module, so the three paths
cannot drift apart.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from src.mask_paste import PASTE_RULES


@dataclass
class Detections:
    """Kept detections of one image in original image coordinates (N of them)."""
    boxes: np.ndarray    # (N, 4) float32 x1, y1, x2, y2
    scores: np.ndarray   # (N,) float32
    labels: np.ndarray   # (N,) int32 in 1..C-1
    masks: np.ndarray    # (N, ori_h, ori_w) uint8 0/1

    def __len__(self) -> int:
        return len(self.scores)


def boxes_to_original(boxes: np.ndarray, image_shape: Sequence[float]) -> np.ndarray:
    """Network-input boxes (K, 4) -> original image boxes, clipped to the image.

    image_shape = (ori_h, ori_w, scale_h, scale_w) as produced by the eval pipeline.
    """
    ori_h, ori_w, scale_h, scale_w = (float(v) for v in image_shape)
    scale = np.array([scale_w, scale_h, scale_w, scale_h], dtype=np.float32)
    limit = np.array([ori_w, ori_h, ori_w, ori_h], dtype=np.float32)
    return np.clip(np.asarray(boxes, np.float32) / scale, 0.0, limit)



def detections_from_outputs(boxes, scores, labels, valid, masks, image_shape,
                            mask_threshold: float, mask_paste: str = "centres") -> Detections:
    """One image's fixed-size outputs (K rows; masks (K, S, S)) -> its valid detections, original frame;
    masks pasted by the `mask_paste` rule (test.mask_paste: centres | torchvision)."""
    keep = np.asarray(valid, bool).reshape(-1)
    ori_h, ori_w = int(round(float(image_shape[0]))), int(round(float(image_shape[1])))
    kept_boxes = boxes_to_original(np.asarray(boxes)[keep], image_shape)
    return Detections(
        boxes=kept_boxes,
        scores=np.asarray(scores, np.float32)[keep],
        labels=np.asarray(labels, np.int32)[keep],
        masks=PASTE_RULES[mask_paste](np.asarray(masks)[keep], kept_boxes, ori_h, ori_w, mask_threshold),
    )


