"""A fake detector that answers with the ground truth, for testing the eval and offline-inference paths."""
import cv2
import numpy as np


def roi_mask(mask: np.ndarray, box, size: int) -> np.ndarray:
    """(S, S) bilinear samples of a full-image mask at the cell centres of `box` (what RoIAlign targets see)."""
    x1, y1, x2, y2 = box
    step_x, step_y = (x2 - x1) / size, (y2 - y1) / size
    # output cell j centre -> source x1 + (j + 0.5) * step; cv2 pixel centres sit at integer coordinates
    to_source = np.array([[step_x, 0, x1 + 0.5 * step_x - 0.5], [0, step_y, y1 + 0.5 * step_y - 0.5]])
    return cv2.warpAffine(mask.astype(np.float32), to_source, (size, size),
                          flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_CONSTANT)


class GroundTruthDetector:
    """Returns the annotations of each image as detections, in network-input pixels (box * scale).

    shift_px moves every box (and its mask) right by that many ORIGINAL pixels; drop_every_other drops all
    detections of every second image. Records the batch sizes it was called with.
    """

    def __init__(self, coco_gt, classes, max_per_image, mask_size, shift_px=0.0, drop_every_other=False):
        self.coco_gt, self.max_per_image, self.mask_size = coco_gt, max_per_image, mask_size
        self.label_of_category = {c["id"]: classes.index(c["name"]) for c in coco_gt.dataset["categories"]}
        self.shift_px, self.drop_every_other = shift_px, drop_every_other
        self.batch_sizes = []

    def _one_image(self, image_id, image_shape):
        k, size = self.max_per_image, self.mask_size
        boxes, scores = np.zeros((k, 4), np.float32), np.zeros(k, np.float32)
        labels, valid = np.zeros(k, np.int32), np.zeros(k, bool)
        masks = np.zeros((k, size, size), np.float32)
        anns = [a for a in self.coco_gt.imgToAnns[image_id] if not a["iscrowd"]]
        if self.drop_every_other and image_id % 2:
            anns = []
        ori_h, ori_w, scale_h, scale_w = image_shape
        for row, ann in enumerate(anns[:k]):
            x, y, w, h = ann["bbox"]
            box = np.array([x + self.shift_px, y, x + w + self.shift_px, y + h])
            full = np.roll(self.coco_gt.annToMask(ann), int(round(self.shift_px)), axis=1)
            masks[row] = roi_mask(full, box, size)
            boxes[row] = box * [scale_w, scale_h, scale_w, scale_h]
            scores[row], labels[row], valid[row] = 0.9, self.label_of_category[ann["category_id"]], True
        return boxes, scores, labels, valid, masks

    def __call__(self, batch):
        self.batch_sizes.append(len(batch["image_id"]))
        per_image = [self._one_image(int(i), s) for i, s in zip(batch["image_id"], batch["image_shape"])]
        return [np.stack(column) for column in zip(*per_image)]
