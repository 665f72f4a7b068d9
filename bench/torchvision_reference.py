"""torchvision's Mask R-CNN tensors, stage by stage, on seeded weights: the fixture of our parity test.

    /work/main/.venv-bench/bin/python bench/torchvision_reference.py [--out tests/fixtures/torchvision_reference.npz]

Builds torchvision's maskrcnn_resnet50_fpn architecture exactly as its COCO weights use it (FrozenBatchNorm2d,
91 class slots) without downloading anything, fills it with `synthetic_state(SEED)` (NumPy only, so a test
without torch regenerates the same weights), runs it in eval mode at min_size MIN_SIZE / max_size MAX_SIZE
on SYNTHETIC_SIZES images, and saves what each stage computed (see `reference_tensors`). Large maps are
kept at a spatial stride and on every CHANNEL_STRIDE-th channel, with per-channel mean and mean square of
the whole map. The state dict's names and shapes go to tests/fixtures/torchvision_maskrcnn_shapes.json for
the conversion tests. torch/torchvision are bench-only dependencies (bench/requirements.txt).
"""
import argparse
import json
import os
import sys
import zlib

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(ROOT, "tests", "fixtures", "torchvision_reference.npz")
DEFAULT_SHAPES = os.path.join(ROOT, "tests", "fixtures", "torchvision_maskrcnn_shapes.json")

SEED = 15
MIN_SIZE, MAX_SIZE = 256, 384          # the batch pads to 256 x 384: all images are landscape, one fills it
# (height, width) of the source images: scale 1 (no resize), 2 (upsampled), 1.6 (256 x 320, padded)
SYNTHETIC_SIZES = ((256, 384), (128, 192), (160, 200))
NUM_SLOTS = 91                          # torchvision's COCO heads: slot = COCO category id
COCO_UNUSED_SLOTS = (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)   # category ids with no COCO 2017 category
UNUSED_SLOT_LOGIT = -30.0               # trained COCO heads never score these; exp(-30) vanishes in softmax
# The seeded RoI features are alike (all-positive ReLU outputs of one random net), so the classifier's rows
# are centred (only feature differences count) and scaled up, and the background slot is biased so that
# a few tens of (box, class) pairs per image pass the 0.05 score threshold, below the 100-detection cap.
CLASSIFIER_GAIN = 10.0
BACKGROUND_LOGIT = 26.0
CHANNEL_STRIDE = 32                     # FPN channels kept: 0, 32, ..., 224
MAX_SAMPLED_CELLS = 1536                # larger maps are kept at a spatial stride bringing them to this
ROIS_PER_IMAGE = 24                     # given RoIs for the box head, per image
MASK_ROIS_PER_IMAGE = 6                 # given RoIs for the mask head, per image
MASK_SLOTS = (0, 1, 2, 3, 44, 90)       # mask logit maps kept in full (every slot's map mean is kept too)
KEPT_MASK_PROBS = 20                    # 28 x 28 mask probabilities of the best detections per image
KEPT_PASTED_MASKS = 10                  # pasted (full image) masks of the best detections per image


# ---------------------------------------------------------------- seeded weights (NumPy only)

def _fan_in(name, shape):
    if "conv5_mask" in name:                        # ConvTranspose2d (in, out, k, k): k x k stride, one tap each
        return shape[0]
    return int(np.prod(shape[1:]))


def _weight_scale(name, shape):
    """Std of a seeded weight: He for layers followed by ReLU, smaller for outputs, so activations stay O(1)."""
    fan_in = _fan_in(name, shape)
    he = np.sqrt(2.0 / fan_in)
    if ".conv3." in name or "downsample.0" in name:         # residual branches and projections add up
        return 0.5 * he
    if "fpn." in name:
        return np.sqrt(1.0 / fan_in)
    if "rpn.head.cls_logits" in name:
        return 2.0 * np.sqrt(1.0 / fan_in)
    if "rpn.head.bbox_pred" in name or "box_predictor.bbox_pred" in name:
        return 0.2 * np.sqrt(1.0 / fan_in)
    if "box_predictor.cls_score" in name:
        return CLASSIFIER_GAIN * np.sqrt(1.0 / fan_in)
    if "mask_fcn_logits" in name:
        return 2.0 * np.sqrt(1.0 / fan_in)
    return he


def synthetic_state(shapes, seed=SEED):
    """{name: float32 array} in torchvision's layout from {name: shape}; each tensor from its own stream
    (seed, crc32(name)), so the weights do not depend on the order or the set of names."""
    state = {}
    for name, shape in shapes.items():
        shape = tuple(shape)
        rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
        leaf = name.rsplit(".", 1)[1]
        is_norm = "bn" in name.rsplit(".", 2)[-2] or "downsample.1" in name
        if is_norm and leaf == "weight":
            value = rng.uniform(0.5, 1.0, shape)
        elif is_norm and leaf == "bias":
            value = rng.normal(0.0, 0.1, shape)
        elif leaf == "running_mean":
            value = rng.normal(0.0, 0.1, shape)
        elif leaf == "running_var":
            value = rng.uniform(0.5, 1.5, shape)
        elif leaf == "bias":
            value = rng.normal(0.0, 0.1, shape)
            if name.endswith("box_predictor.cls_score.bias"):
                if shape[0] == NUM_SLOTS:
                    value[list(COCO_UNUSED_SLOTS)] = UNUSED_SLOT_LOGIT
                value[0] = BACKGROUND_LOGIT
        else:
            value = rng.normal(0.0, _weight_scale(name, shape), shape)
            if name.endswith("box_predictor.cls_score.weight"):
                value -= value.mean(axis=1, keepdims=True)
        state[name] = value.astype(np.float32)
    return state


def synthetic_images(seed=SEED):
    """RGB uint8 images of SYNTHETIC_SIZES: a smooth background and a few flat ellipses and rectangles."""
    rng = np.random.default_rng(seed)
    images = []
    for height, width in SYNTHETIC_SIZES:
        ys, xs = np.mgrid[0:height, 0:width]
        image = np.stack([40 + 120 * xs / width, 60 + 100 * ys / height, np.full(xs.shape, 90.0)], axis=-1)
        for _ in range(4):
            cy, cx = rng.uniform(0.2, 0.8) * height, rng.uniform(0.2, 0.8) * width
            ry, rx = rng.uniform(0.1, 0.3) * height, rng.uniform(0.1, 0.3) * width
            colour = rng.integers(0, 256, 3)
            inside = ((ys - cy) / ry) ** 2 + ((xs - cx) / rx) ** 2 <= 1.0
            if rng.random() < 0.5:
                inside = (np.abs(ys - cy) <= ry) & (np.abs(xs - cx) <= rx)
            image[inside] = colour
        images.append(np.clip(np.round(image), 0, 255).astype(np.uint8))
    return images


def given_rois(image_sizes, count, seed):
    """(sum count, 5) RoIs (image index, x1, y1, x2, y2) of every size class: from a few pixels to larger than
    the image (sqrt(area) up to ~2x the image, so every pyramid level and the out-of-map sampling are hit)."""
    rng = np.random.default_rng(seed)
    rows = []
    for index, (height, width) in enumerate(image_sizes):
        side = np.exp(rng.uniform(np.log(4.0), np.log(2.0 * max(height, width)), count))
        aspect = np.exp(rng.uniform(-0.7, 0.7, count))
        w, h = side * aspect, side / aspect
        cx, cy = rng.uniform(0, width, count), rng.uniform(0, height, count)
        rows.append(np.stack([np.full(count, index), cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1))
    return np.concatenate(rows).astype(np.float32)


# ---------------------------------------------------------------- torchvision (bench venv only)

def build_model():
    """maskrcnn_resnet50_fpn as built for its COCO weights, without downloading them."""
    from torchvision.models import resnet50
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.ops import misc

    body = resnet50(weights=None, norm_layer=misc.FrozenBatchNorm2d)
    model = MaskRCNN(_resnet_fpn_extractor(body, 3), num_classes=NUM_SLOTS, min_size=MIN_SIZE, max_size=MAX_SIZE)
    return model.eval()


def _map_stride(height, width):
    stride = 1
    while (height // stride) * (width // stride) > MAX_SAMPLED_CELLS:
        stride *= 2
    return stride


def reference_tensors(model, images):
    """Every stage's outputs for `images` (list of HWC uint8) as {fixture key: array}."""
    import torch

    out = {}
    inputs = [torch.from_numpy(image).permute(2, 0, 1).float() / 255.0 for image in images]
    with torch.no_grad():
        batch, _ = model.transform(inputs)
        image_sizes = [tuple(size) for size in batch.image_sizes]
        out["batch"] = batch.tensors.numpy()
        out["image_sizes"] = np.array(image_sizes, np.int32)

        features = model.backbone(batch.tensors)
        feature_list = list(features.values())                          # P2..P5, pool (P6)
        strides = []
        for level, feat in enumerate(feature_list):
            f = feat.numpy()
            s = _map_stride(*f.shape[2:])
            strides.append(s)
            out[f"fpn{level}_sample"] = f[:, ::CHANNEL_STRIDE, ::s, ::s]
            out[f"fpn{level}_mean"] = f.mean(axis=(2, 3))
            out[f"fpn{level}_meansq"] = (f.astype(np.float64) ** 2).mean(axis=(2, 3)).astype(np.float32)
            out[f"fpn{level}_shape"] = np.array(f.shape, np.int32)
        out["map_strides"] = np.array(strides, np.int32)

        objectness, deltas = model.rpn.head(feature_list)
        for level, (obj, delta) in enumerate(zip(objectness, deltas)):
            s = strides[level]
            out[f"rpn_objectness{level}"] = obj.numpy()[:, :, ::s, ::s]        # (B, A, h/s, w/s)
            out[f"rpn_deltas{level}"] = delta.numpy()[:, :, ::s, ::s]          # (B, 4A, h/s, w/s)
        out["cell_anchors"] = np.stack([a.numpy() for a in model.rpn.anchor_generator.cell_anchors])  # (L, A, 4)

        captured = {}
        filter_proposals = model.rpn.filter_proposals

        def capture(*args, **kwargs):
            boxes, scores = filter_proposals(*args, **kwargs)
            captured["scores"] = scores
            return boxes, scores

        model.rpn.filter_proposals = capture
        proposals, _ = model.rpn(batch, features)
        model.rpn.filter_proposals = filter_proposals
        out["proposal_counts"] = np.array([len(p) for p in proposals], np.int32)
        out["proposals"] = torch.cat(proposals).numpy()
        out["proposal_scores"] = torch.cat(captured["scores"]).numpy()

        heads = model.roi_heads
        rois = given_rois(image_sizes, ROIS_PER_IMAGE, SEED + 1)
        roi_list = [torch.from_numpy(rois[rois[:, 0] == i, 1:]) for i in range(len(images))]
        box_feats = heads.box_head(heads.box_roi_pool(features, roi_list, image_sizes))
        logits, box_deltas = heads.box_predictor(box_feats)
        out["box_rois"], out["box_logits"], out["box_deltas"] = rois, logits.numpy(), box_deltas.numpy()

        mask_rois = given_rois(image_sizes, MASK_ROIS_PER_IMAGE, SEED + 2)
        mask_list = [torch.from_numpy(mask_rois[mask_rois[:, 0] == i, 1:]) for i in range(len(images))]
        mask_logits = heads.mask_predictor(heads.mask_head(heads.mask_roi_pool(features, mask_list, image_sizes)))
        mask_logits = mask_logits.numpy()
        out["mask_rois"], out["mask_slots"] = mask_rois, np.array(MASK_SLOTS, np.int32)
        out["mask_logits"] = mask_logits[:, list(MASK_SLOTS)]
        out["mask_logits_mean"] = mask_logits.mean(axis=(2, 3))

        detections, _ = heads(features, proposals, image_sizes)
        out["det_counts"] = np.array([len(d["boxes"]) for d in detections], np.int32)
        out["det_boxes_input"] = torch.cat([d["boxes"] for d in detections]).numpy()    # resized-image pixels
        out["det_scores"] = torch.cat([d["scores"] for d in detections]).numpy()
        out["det_labels"] = torch.cat([d["labels"] for d in detections]).numpy().astype(np.int32)   # slots
        out["det_mask_probs"] = np.concatenate(
            [d["masks"][:KEPT_MASK_PROBS, 0].numpy() for d in detections])             # (sum kept, 28, 28)
        original_sizes = [image.shape[:2] for image in images]
        final = model.transform.postprocess(detections, image_sizes, original_sizes)
        out["det_boxes"] = torch.cat([d["boxes"] for d in final]).numpy()               # source-image pixels
        for index, d in enumerate(final):
            pasted = d["masks"][:KEPT_PASTED_MASKS, 0].numpy() > 0.5
            out[f"det_masks_pasted{index}"] = np.packbits(pasted, axis=-1)              # (k, H, ceil(W / 8))

        whole = model(inputs)                       # the stages above are the model's own forward pass
        for d, w in zip(final, whole):
            assert torch.equal(d["boxes"], w["boxes"]) and torch.equal(d["scores"], w["scores"])
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=DEFAULT_OUT)
    parser.add_argument("--shapes", default=DEFAULT_SHAPES, help="state-dict names and shapes (JSON)")
    args = parser.parse_args(argv)

    import torch
    import torchvision

    torch.manual_seed(0)
    torch.set_num_threads(2)
    model = build_model()
    shapes = {name: list(value.shape) for name, value in model.state_dict().items()}
    state = synthetic_state(shapes)
    model.load_state_dict({name: torch.from_numpy(value) for name, value in state.items()})
    images = synthetic_images()
    tensors = reference_tensors(model, images)
    for index, image in enumerate(images):
        tensors[f"image{index}"] = image
    tensors["settings"] = np.array([SEED, MIN_SIZE, MAX_SIZE], np.int64)
    tensors["versions"] = np.array([f"torch {torch.__version__}", f"torchvision {torchvision.__version__}"])

    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    tmp = args.out + ".tmp.npz"
    np.savez_compressed(tmp, **tensors)
    os.replace(tmp, args.out)
    with open(args.shapes + ".tmp", "w", encoding="utf-8") as handle:
        json.dump(shapes, handle, indent=0)
    os.replace(args.shapes + ".tmp", args.shapes)
    print(f"wrote {args.out} ({os.path.getsize(args.out) / 1e6:.2f} MB): proposals per image "
          f"{tensors['proposal_counts'].tolist()}, detections {tensors['det_counts'].tolist()}, scores "
          f"{tensors['det_scores'].min():.3f}..{tensors['det_scores'].max():.3f}, "
          f"{len(np.unique(tensors['det_labels']))} classes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
