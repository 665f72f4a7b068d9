"""Convolution FLOPs of one Mask R-CNN training step and one inference call (batch 2), counted on torchvision's
maskrcnn_resnet50_fpn (the same ResNet50-FPN layers as ours) on compare_torchvision.py's scene:

    .venv-bench/bin/python bench/conv_flops.py [--size 384x640]

A convolution costs 2 * C_in * k_h * k_w * C_out * H_out * W_out FLOPs per image (multiply + add). Training
runs each trainable layer three times (forward, data gradient, weight gradient); the frozen stem and layer1
(our recipe) run forward only: nothing below them needs a gradient. Divide by a measured step time and by the
CPU's bf16 peak (1963 GFLOP/s measured with torch at 2 threads, issue 18) for the share of the limit reached.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.compare_torchvision import (BATCH, NUM_CLASSES, OBJECTS_PER_IMAGE, PIXEL_MAX, TORCH_FROZEN_STAGES,  # noqa
                                       parse_size, synthetic_scene)


def count(height, width):
    import numpy as np
    import torch
    from torchvision.models.detection import maskrcnn_resnet50_fpn

    torch.manual_seed(0)
    model = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=NUM_CLASSES,
                                  min_size=min(height, width), max_size=max(height, width))
    totals = {"frozen": 0.0, "trainable": 0.0}
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
            frozen = name.startswith("backbone.body.") and name.split(".")[2] in TORCH_FROZEN_STAGES

            def hook(module, inputs, output, frozen=frozen):
                kh, kw = module.kernel_size
                # a transposed convolution's MACs: each input pixel scattered over k x k outputs
                pixels = inputs[0].shape[-2] * inputs[0].shape[-1] if isinstance(
                    module, torch.nn.ConvTranspose2d) else output.shape[-2] * output.shape[-1]
                flops = 2.0 * module.in_channels * module.out_channels * kh * kw * pixels * output.shape[0]
                totals["frozen" if frozen else "trainable"] += flops
            module.register_forward_hook(hook)
    scene = synthetic_scene(height, width, OBJECTS_PER_IMAGE)
    images = [torch.from_numpy(p.transpose(2, 0, 1).astype(np.float32) / PIXEL_MAX) for p in scene["pixels"]]
    targets = [{"boxes": torch.from_numpy(scene["boxes"][b]), "labels": torch.from_numpy(scene["labels"][b]),
                "masks": torch.from_numpy(scene["masks"][b])} for b in range(BATCH)]
    model.train()
    with torch.no_grad():
        model(images, targets)
    train = totals["frozen"] + 3 * totals["trainable"]
    totals.update(frozen=0.0, trainable=0.0)
    model.eval()
    with torch.no_grad():
        model(images)
    return train, totals["frozen"] + totals["trainable"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=parse_size, default=(384, 640))
    args = parser.parse_args()
    train, infer = count(*args.size)
    print(f"{args.size[0]}x{args.size[1]}, batch {BATCH}: convolution GFLOP per training step {train / 1e9:.0f}, "
          f"per inference call {infer / 1e9:.0f} (torchvision's detections: the mask head runs on them)")


if __name__ == "__main__":
    main()
