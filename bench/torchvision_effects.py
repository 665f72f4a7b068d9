"""How much each of our conventions would change torchvision's own outputs (docs/torchvision_differences.md).

    /work/main/.venv-bench/bin/python bench/torchvision_effects.py

Runs the seeded torchvision model of bench/torchvision_reference.py on its synthetic images, switching one
convention at a time to ours: anchors centred on the cell and not rounded, aligned RoIAlign, a larger
zero canvas; and pastes the fixture's masks with our rule (src/mask_paste.py) against torchvision's. The
weights are random, so these are sizes of stage-level changes, not AP changes.
"""
import functools
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torchvision_reference as ref  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOP_PROPOSALS = 300           # best proposals per image compared between variants
LARGE_CANVAS = (512, 512)     # our fixed-canvas situation: more zero padding than torchvision's 256 x 384


def _box_iou(a, b):
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area = lambda x: np.prod(np.clip(x[:, 2:] - x[:, :2], 0, None), axis=1)   # noqa: E731
    return inter / np.maximum(area(a)[:, None] + area(b)[None, :] - inter, 1e-9)


def _run(model, images, canvas=None):
    """Proposals, detections (boxes, scores, labels) and P2 of `images`, optionally padded to `canvas`."""
    import torch
    from torchvision.models.detection.image_list import ImageList

    inputs = [torch.from_numpy(image).permute(2, 0, 1).float() / 255.0 for image in images]
    with torch.no_grad():
        batch, _ = model.transform(inputs)
        if canvas is not None:
            padded = batch.tensors.new_zeros(batch.tensors.shape[:2] + canvas)
            padded[:, :, :batch.tensors.shape[2], :batch.tensors.shape[3]] = batch.tensors
            batch = ImageList(padded, batch.image_sizes)
        features = model.backbone(batch.tensors)
        proposals, _ = model.rpn(batch, features)
        detections, _ = model.roi_heads(features, proposals, batch.image_sizes)
    p2 = features["0"].numpy()
    return [p.numpy() for p in proposals], detections, p2


def _proposal_change(base, other):
    """Median best IoU of each of the TOP_PROPOSALS best base proposals with the other run's, and the share
    below 0.9, over all images."""
    best = np.concatenate([_box_iou(b[:TOP_PROPOSALS], o).max(axis=1) for b, o in zip(base, other)])
    return float(np.median(best)), float(np.mean(best < 0.9))


def _detection_change(base, other):
    """Share of base detections without a same-label detection of IoU >= 0.9 in the other run."""
    lost = total = 0
    for b, o in zip(base, other):
        bb, ob = b["boxes"].numpy(), o["boxes"].numpy()
        total += len(bb)
        if len(bb) and len(ob):
            iou = _box_iou(bb, ob) * (b["labels"].numpy()[:, None] == o["labels"].numpy()[None, :])
            lost += int(np.sum(iou.max(axis=1) < 0.9))
        else:
            lost += len(bb)
    return lost / max(total, 1)


def centred_unrounded_anchors(model):
    """Our anchors (src/maskrcnn/anchor_generator.py) in torchvision's generator: centre offset, no rounding."""
    import torch

    generator = model.rpn.anchor_generator

    def generate_anchors(scales, aspect_ratios, dtype=torch.float32, device=torch.device("cpu")):
        scales = torch.as_tensor(scales, dtype=dtype, device=device)
        ratios = torch.as_tensor(aspect_ratios, dtype=dtype, device=device)
        h_ratios = torch.sqrt(ratios)
        ws = (1 / h_ratios[:, None] * scales[None, :]).view(-1)
        hs = (h_ratios[:, None] * scales[None, :]).view(-1)
        return torch.stack([-ws, -hs, ws, hs], dim=1) / 2

    original_grid = generator.grid_anchors

    def grid_anchors(grid_sizes, strides):
        anchors = original_grid(grid_sizes, strides)
        return [a + torch.tensor([s[1] / 2, s[0] / 2, s[1] / 2, s[0] / 2], dtype=a.dtype)
                for a, s in zip(anchors, [[float(v) for v in st] for st in strides])]

    generator.cell_anchors = [generate_anchors(s, r) for s, r in zip(generator.sizes, generator.aspect_ratios)]
    generator.set_cell_anchors = lambda dtype, device: None
    generator.grid_anchors = grid_anchors


def _load_paste():
    """src/mask_paste.py's paste_masks (NumPy only) without importing the MindSpore package."""
    namespace = {}
    path = os.path.join(ROOT, "src", "mask_paste.py")
    if not os.path.exists(path):                      # before the src/util.py split
        path = os.path.join(ROOT, "src", "util.py")
        source = open(path, encoding="utf-8").read()
        start = source.index("def _interpolation_matrix")
        end = source.index("def detections_from_outputs")
        source = "import numpy as np\n" + source[start:end]
    else:
        source = open(path, encoding="utf-8").read()
    exec(compile(source, path, "exec"), namespace)    # noqa: S102 - our own file
    return namespace["paste_masks"]


def mask_paste_change():
    """Pixels where our paste of the fixture's detections differs from torchvision's, per mask pixel."""
    fixture = np.load(os.path.join(ROOT, "tests", "fixtures", "torchvision_reference.npz"))
    paste = _load_paste()
    counts, probs, boxes = fixture["det_counts"], fixture["det_mask_probs"], fixture["det_boxes"]
    differing = area = 0
    ious = []
    kept_start, det_start = 0, 0
    for index, count in enumerate(counts):
        image = fixture[f"image{index}"]
        kept = min(count, ref.KEPT_MASK_PROBS, ref.KEPT_PASTED_MASKS)
        theirs = np.unpackbits(fixture[f"det_masks_pasted{index}"], axis=-1)[:kept, :, :image.shape[1]].astype(bool)
        ours = paste(probs[kept_start:kept_start + kept], boxes[det_start:det_start + kept],
                     image.shape[0], image.shape[1], 0.5).astype(bool)
        differing += int(np.sum(ours != theirs))
        area += int(np.sum(theirs))
        for a, b in zip(ours, theirs):
            ious.append(np.sum(a & b) / max(np.sum(a | b), 1))
        kept_start += min(count, ref.KEPT_MASK_PROBS)
        det_start += count
    return differing / max(area, 1), float(np.mean(ious)), float(np.min(ious))


def main():
    import torch
    import torchvision.ops.poolers as poolers

    torch.set_num_threads(2)
    images = ref.synthetic_images()

    def fresh():
        model = ref.build_model()
        shapes = {name: list(value.shape) for name, value in model.state_dict().items()}
        model.load_state_dict({k: torch.from_numpy(v) for k, v in ref.synthetic_state(shapes).items()})
        return model

    base_props, base_dets, base_p2 = _run(fresh(), images)

    model = fresh()
    centred_unrounded_anchors(model)
    props, dets, _ = _run(model, images)
    print("anchors centred + unrounded: proposals median best IoU %.3f, share < 0.9 %.2f; detections changed %.2f"
          % (*_proposal_change(base_props, props), _detection_change(base_dets, dets)))

    original = poolers.roi_align
    poolers.roi_align = functools.partial(original, aligned=True)
    try:
        props, dets, _ = _run(fresh(), images)
    finally:
        poolers.roi_align = original
    print("RoIAlign aligned=True: detections changed %.2f" % _detection_change(base_dets, dets))

    props, dets, p2 = _run(fresh(), images, LARGE_CANVAS)
    h, w = base_p2.shape[2:]
    rel = np.abs(p2[:, :, :h, :w] - base_p2) / (np.abs(base_p2).mean() + 1e-12)
    print("canvas %s instead of 256x384: P2 mean rel. change %.2e (last 4 rows/cols %.2e); proposals median best "
          "IoU %.3f, share < 0.9 %.2f; detections changed %.2f"
          % (LARGE_CANVAS, rel.mean(), max(rel[:, :, -4:].mean(), rel[:, :, :, -4:].mean()),
             *_proposal_change(base_props, props), _detection_change(base_dets, dets)))

    share, mean_iou, min_iou = mask_paste_change()
    print("mask paste, ours vs torchvision on the fixture: differing pixels / mask area %.3f, mask IoU mean %.3f "
          "min %.3f" % (share, mean_iou, min_iou))
    return 0


if __name__ == "__main__":
    sys.exit(main())
