"""torchvision's Mask R-CNN training step on seeded weights, with the samples it drew: the fixture of our
training-parity test (tests/test_torchvision_train_parity.py).

    /work/main/.venv-bench/bin/python bench/torchvision_train_reference.py [--out tests/fixtures/torchvision_train_reference.npz]

Builds torchvision's Mask R-CNN at the sizes of TRAIN_OVERRIDES (our tiny preset's: 128 x 192 input, 5 classes,
8..128 px anchors, 64 anchors and 32 RoIs sampled per image), fills it with `train_state` (NumPy only, so the test
regenerates the same weights), runs one training forward and backward pass on `train_batch` and saves: the
anchors, the anchors its RPN sampler picked (the sampler is wrapped to record them), the RoIs its RoI sampler
picked with their labels (from select_training_samples), its mask targets, the five losses and the gradients of a few head tensors (GRAD_NAMES). torch/torchvision are bench-only.
"""
import argparse
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from bench.torchvision_reference import synthetic_state  # noqa: E402

DEFAULT_OUT = os.path.join(ROOT, "tests", "fixtures", "torchvision_train_reference.npz")

SEED = 21
HEIGHT, WIDTH = 128, 192               # no resize, no padding (both divisible by 32)
NUM_IMAGES, NUM_GTS = 2, 3
CLASSES = ["background", "rectangle", "ellipse", "triangle", "star"]
ANCHOR_SIZES = (8, 16, 32, 64, 128)    # stride 4..64 times anchor scale 2
RPN_SAMPLES, RPN_POS_FRACTION = 64, 0.5
ROI_SAMPLES, ROI_POS_FRACTION = 32, 0.25
PRE_NMS, POST_NMS = 200, 64
JITTERED_PER_GT = 6
THIN_GT = (1, 2)                       # (image, GT) drawn as a 40 x 3 px bar: its best anchor IoU is below 0.3
IMAGE_MEAN, IMAGE_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# Our config at the same sizes (the test loads configs/torchvision.yaml with these overrides).
TRAIN_OVERRIDES = {
    "data.img_height": HEIGHT, "data.img_width": WIDTH, "data.classes": CLASSES, "data.max_instance_count": NUM_GTS,
    "anchor.anchor_scales": [2.0], "rpn.num_expected_total": RPN_SAMPLES, "rpn.pos_fraction": RPN_POS_FRACTION,
    "proposal_train.nms_pre": PRE_NMS, "proposal_train.nms_post": POST_NMS, "proposal_train.max_num": POST_NMS,
    "rcnn.num_expected_total_stage2": ROI_SAMPLES, "rcnn.pos_fraction_stage2": ROI_POS_FRACTION,
}
GRAD_NAMES = ("rpn.head.conv.0.0.bias", "rpn.head.cls_logits.weight", "rpn.head.bbox_pred.weight",
              "roi_heads.box_head.fc7.bias", "roi_heads.box_predictor.cls_score.weight",
              "roi_heads.box_predictor.bbox_pred.weight", "roi_heads.mask_predictor.conv5_mask.bias",
              "roi_heads.mask_predictor.mask_fcn_logits.weight")
LOSS_KEYS = ("loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg", "loss_mask")


def train_state(shapes):
    """synthetic_state's weights with a classifier of moderate logits (no background bias, unit gain), so the
    classification loss and its gradients are not saturated."""
    state = synthetic_state(shapes, SEED)
    rng = np.random.default_rng(SEED)
    for name in state:
        if name.endswith("box_predictor.cls_score.weight"):
            state[name] = (rng.normal(0.0, 2.0 / np.sqrt(state[name].shape[1]), state[name].shape)).astype(np.float32)
        elif name.endswith("box_predictor.cls_score.bias"):
            state[name] = np.zeros_like(state[name])
    return state


def train_batch(seed=SEED):
    """(images (B, H, W, 3) uint8, boxes (B, M, 4) float32, labels (B, M) int32 (1 rectangle, 2 ellipse),
    masks (B, M, H, W) uint8): flat rectangles and ellipses on a smooth background, the boxes tight around the
    masks, one GT (THIN_GT) a thin bar that only a low-quality match gives a positive anchor."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:HEIGHT, 0:WIDTH]
    images = np.zeros((NUM_IMAGES, HEIGHT, WIDTH, 3), np.uint8)
    boxes = np.zeros((NUM_IMAGES, NUM_GTS, 4), np.float32)
    labels = np.zeros((NUM_IMAGES, NUM_GTS), np.int32)
    masks = np.zeros((NUM_IMAGES, NUM_GTS, HEIGHT, WIDTH), np.uint8)
    for b in range(NUM_IMAGES):
        image = np.stack([40 + 120 * xs / WIDTH, 60 + 100 * ys / HEIGHT, np.full(xs.shape, 90.0)], axis=-1)
        for m in range(NUM_GTS):
            cy, cx = rng.uniform(0.25, 0.75) * HEIGHT, rng.uniform(0.2, 0.8) * WIDTH
            ry, rx = rng.uniform(8, 30), rng.uniform(8, 40)
            label = int(rng.integers(1, 3))
            if (b, m) == THIN_GT:
                ry, rx, label = 1.5, 20.0, 1
            if label == 1:
                inside = (np.abs(ys + 0.5 - cy) <= ry) & (np.abs(xs + 0.5 - cx) <= rx)
            else:
                inside = ((ys + 0.5 - cy) / ry) ** 2 + ((xs + 0.5 - cx) / rx) ** 2 <= 1.0
            image[inside] = rng.integers(0, 256, 3)
            rows, cols = np.nonzero(inside)
            boxes[b, m] = (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1)
            labels[b, m], masks[b, m] = label, inside
        images[b] = np.clip(np.round(image), 0, 255).astype(np.uint8)
    return images, boxes, labels, masks


def normalised(images):
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float32 as torchvision's transform normalises (no resize here)."""
    x = images.transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255.0)
    mean = np.array(IMAGE_MEAN, np.float32)[:, None, None]
    std = np.array(IMAGE_STD, np.float32)[:, None, None]
    return (x - mean) / std


# ---------------------------------------------------------------- torchvision (bench venv only)

def build_model():
    from torchvision.models import resnet50
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.ops import misc

    body = resnet50(weights=None, norm_layer=misc.FrozenBatchNorm2d)
    anchors = AnchorGenerator(tuple((s,) for s in ANCHOR_SIZES), ((0.5, 1.0, 2.0),) * len(ANCHOR_SIZES))
    return MaskRCNN(_resnet_fpn_extractor(body, 3), num_classes=len(CLASSES), min_size=HEIGHT, max_size=WIDTH,
                    image_mean=list(IMAGE_MEAN), image_std=list(IMAGE_STD), rpn_anchor_generator=anchors,
                    rpn_pre_nms_top_n_train=PRE_NMS, rpn_post_nms_top_n_train=POST_NMS,
                    rpn_batch_size_per_image=RPN_SAMPLES, rpn_positive_fraction=RPN_POS_FRACTION,
                    box_batch_size_per_image=ROI_SAMPLES, box_positive_fraction=ROI_POS_FRACTION)


class _RecordingSampler:
    """A BalancedPositiveNegativeSampler that appends its (positives, negatives) index arrays per image to `picks`."""

    def __init__(self, sampler, picks):
        self.sampler, self.picks = sampler, picks

    def __call__(self, labels):
        pos, neg = self.sampler(labels)
        self.picks.append([(p.nonzero()[:, 0].numpy(), n.nonzero()[:, 0].numpy()) for p, n in zip(pos, neg)])
        return pos, neg


def training_step(model, batch):
    """One training forward/backward pass recording the samples; returns {fixture key: array}."""
    import torch
    from torchvision.models.detection import roi_heads as roi_heads_module

    images, boxes, labels, masks = batch
    inputs = [torch.from_numpy(image).permute(2, 0, 1).float() / 255.0 for image in images]
    targets = [{"boxes": torch.from_numpy(boxes[b]), "labels": torch.from_numpy(labels[b]).long(),
                "masks": torch.from_numpy(masks[b])} for b in range(len(images))]
    out = {}
    rpn_picks, mask_targets, samples = [], [], {}
    assign = model.rpn.assign_targets_to_anchors

    def recording_assign(anchors, targets):
        labels, matched_boxes = assign(anchors, targets)
        samples["rpn_labels"], samples["rpn_matched_boxes"] = labels, matched_boxes
        return labels, matched_boxes
    model.rpn.assign_targets_to_anchors = recording_assign
    model.rpn.fg_bg_sampler = _RecordingSampler(model.rpn.fg_bg_sampler, rpn_picks)
    select = model.roi_heads.select_training_samples

    def recording_select(proposals, targets):
        result = select(proposals, targets)
        samples["rois"], samples["matched"], samples["labels"] = (list(result[0]), list(result[1]), list(result[2]))
        return result
    model.roi_heads.select_training_samples = recording_select
    filter_proposals = model.rpn.filter_proposals
    jitter = np.random.default_rng(SEED + 1)

    def with_jittered_gts(*args, **kwargs):
        """The RPN's proposals plus JITTERED_PER_GT shifted copies of each GT (seeded weights propose few
        boxes near the objects, so the RoI sample would hold only the GT boxes as positives)."""
        proposals, scores = filter_proposals(*args, **kwargs)
        for b in range(len(proposals)):
            gt = np.repeat(boxes[b], JITTERED_PER_GT, axis=0)
            size = np.tile(gt[:, 2:] - gt[:, :2], 2)
            extra = torch.from_numpy((gt + jitter.uniform(-0.25, 0.25, gt.shape) * size).astype(np.float32))
            proposals[b] = torch.cat([proposals[b], extra])
            scores[b] = torch.cat([scores[b], torch.zeros(len(extra))])
        return proposals, scores
    model.rpn.filter_proposals = with_jittered_gts
    mask_loss = roi_heads_module.maskrcnn_loss

    def recording_mask_loss(mask_logits, proposals, gt_masks, gt_labels, matched_idxs):
        for m, p, i in zip(gt_masks, proposals, matched_idxs):
            mask_targets.append(roi_heads_module.project_masks_on_boxes(m, p, i, mask_logits.shape[-1]))
        return mask_loss(mask_logits, proposals, gt_masks, gt_labels, matched_idxs)
    roi_heads_module.maskrcnn_loss = recording_mask_loss
    try:
        model.train()
        batch_images, _ = model.transform(inputs, None)
        assert np.array_equal(batch_images.tensors.numpy(), normalised(images)), "transform is not a pure normalise"
        losses = model(inputs, targets)
    finally:
        roi_heads_module.maskrcnn_loss = mask_loss
    sum(losses.values()).backward()

    out["losses"] = np.array([losses[k].item() for k in LOSS_KEYS], np.float64)
    images_anchors = model.rpn.anchor_generator(batch_images, list(model.backbone(batch_images.tensors).values()))
    out["anchors"] = images_anchors[0].numpy()
    for b, (pos, neg) in enumerate(rpn_picks[0]):
        out[f"rpn_pos{b}"], out[f"rpn_neg{b}"] = pos.astype(np.int32), neg.astype(np.int32)
        # every anchor's label (1 object, 0 background, -1 ignored) and, on objects, the index of its GT
        out[f"rpn_labels{b}"] = samples["rpn_labels"][b].numpy().astype(np.int8)
        matched = samples["rpn_matched_boxes"][b].numpy()
        out[f"rpn_matched{b}"] = np.abs(matched[:, None, :] - boxes[b][None]).sum(-1).argmin(1).astype(np.int8)
    for b in range(len(images)):
        rois, roi_labels = samples["rois"][b].detach().numpy(), samples["labels"][b].numpy()
        out[f"roi_boxes{b}"], out[f"roi_labels{b}"] = rois, roi_labels.astype(np.int32)
        out[f"roi_matched{b}"] = samples["matched"][b].numpy().astype(np.int32)
        out[f"mask_targets{b}"] = mask_targets[b].detach().numpy()       # rows: the positives of roi_boxes{b}
    params = dict(model.named_parameters())
    for name in GRAD_NAMES:
        out["grad:" + name] = params[name].grad.numpy()
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=DEFAULT_OUT)
    args = parser.parse_args(argv)

    import torch
    import torchvision

    torch.manual_seed(SEED)
    torch.set_num_threads(2)
    model = build_model()
    state = train_state({name: tuple(value.shape) for name, value in model.state_dict().items()})
    model.load_state_dict({name: torch.from_numpy(value) for name, value in state.items()})
    batch = train_batch()
    tensors = training_step(model, batch)
    tensors["images"], tensors["boxes"], tensors["labels"], tensors["masks"] = batch
    tensors["versions"] = np.array([f"torch {torch.__version__}", f"torchvision {torchvision.__version__}"])

    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    tmp = args.out + ".tmp.npz"
    np.savez_compressed(tmp, **tensors)
    os.replace(tmp, args.out)
    counts = [(len(tensors[f"rpn_pos{b}"]), len(tensors[f"rpn_neg{b}"]), int((tensors[f"roi_labels{b}"] > 0).sum()),
               len(tensors[f"roi_labels{b}"])) for b in range(NUM_IMAGES)]
    print(f"wrote {args.out} ({os.path.getsize(args.out) / 1e3:.0f} kB): losses "
          + ", ".join(f"{k} {v:.6f}" for k, v in zip(LOSS_KEYS, tensors["losses"]))
          + f"; per image (rpn pos, rpn neg, roi pos, rois) {counts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
