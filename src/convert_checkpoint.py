"""Convert an ImageNet ResNet50 checkpoint into this model's ``backbone.*`` names for --pre_trained.

Accepted sources:
  - a MindSpore ModelZoo resnet50 .ckpt: ``conv1.weight``, ``bn1.gamma``, ``layer1.0.conv1.weight``,
    ``layer1.0.down_sample_layer.0.weight``, ``layer1.0.down_sample_layer.1.moving_mean``, ...,
    classifier ``end_point.*`` and optimizer entries (dropped);
  - a torchvision state dict saved as .npz (or .pth when PyTorch is importable): ``bn1.weight``,
    ``bn1.running_var``, ``layer1.0.downsample.0.weight``, ..., classifier ``fc.*`` and
    ``num_batches_tracked`` (dropped).
Every backbone tensor must be found with the right shape; otherwise nothing is written and the error
names the missing, mismatched and unexpected tensors.

    python -m src.convert_checkpoint --src resnet50.ckpt --out resnet50_backbone.ckpt
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

if not __package__:                 # run as a file: python src/convert_checkpoint.py
    import _file_run  # noqa: F401

from src.config import Config, config_from_args, load_config

BACKBONE_PREFIX = "backbone."
# torchvision BatchNorm leaf -> MindSpore BatchNorm leaf
TORCH_BN_LEAVES = {"weight": "gamma", "bias": "beta", "running_mean": "moving_mean", "running_var": "moving_variance"}
MODELZOO_DOWNSAMPLE = "down_sample_layer"
DOWNSAMPLE = "downsample"
CLASSIFIER_MODULES = ("fc", "end_point")
DROPPED_LEAVES = ("num_batches_tracked",)
OPTIMIZER_ENTRIES = ("learning_rate", "global_step", "momentum")
OPTIMIZER_PREFIXES = ("moments.", "accum.", "stat.")
MAX_NAMES_IN_ERROR = 10


class ConversionError(ValueError):
    """The source does not hold a ResNet50 matching the backbone; the message names the tensors."""


@dataclass
class ConversionReport:
    converted: List[str] = field(default_factory=list)                   # target names written
    dropped: List[str] = field(default_factory=list)                     # classifier / optimizer / counters
    unexpected: List[str] = field(default_factory=list)                  # source names with no target
    missing: List[str] = field(default_factory=list)                     # target names with no source
    mismatched: List[Tuple[str, tuple, tuple]] = field(default_factory=list)   # (target, source, target shape)

    @property
    def ok(self) -> bool:
        return not (self.unexpected or self.missing or self.mismatched)

    def problems(self) -> str:
        def listing(names):
            more = f" ... (+{len(names) - MAX_NAMES_IN_ERROR})" if len(names) > MAX_NAMES_IN_ERROR else ""
            return ", ".join(names[:MAX_NAMES_IN_ERROR]) + more
        parts = []
        if self.missing:
            parts.append(f"missing {len(self.missing)}: {listing(self.missing)}")
        if self.mismatched:
            parts.append(f"shape mismatch {len(self.mismatched)}: " + listing(
                [f"{name} {src} in source vs {dst} in backbone" for name, src, dst in self.mismatched]))
        if self.unexpected:
            parts.append(f"unexpected {len(self.unexpected)}: {listing(self.unexpected)}")
        return "; ".join(parts)


# ---------------------------------------------------------------- reading sources

def _read_pth(path: str) -> Dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise ConversionError(
            f"reading '{path}' needs PyTorch, which is not installed here. Save the state dict as .npz where "
            f"PyTorch is available and convert that: python -c \"import numpy, torch; sd = torch.load('{path}', "
            f"map_location='cpu'); numpy.savez('resnet50.npz', **{{k: v.numpy() for k, v in sd.items()}})\"") from None
    state = torch.load(path, map_location="cpu")
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    return {name: value.detach().cpu().numpy() for name, value in state.items() if hasattr(value, "detach")}


def read_source(path: str) -> Dict[str, np.ndarray]:
    """name -> array from a .ckpt (MindSpore), .npz or .pth file."""
    if not os.path.isfile(path):
        raise ConversionError(f"source checkpoint '{path}' does not exist")
    extension = os.path.splitext(path)[1].lower()
    if extension == ".ckpt":
        from src.checkpoint import CheckpointError, read_checkpoint
        try:
            return {name: param.asnumpy() for name, param in read_checkpoint(path).items()}
        except CheckpointError as err:
            raise ConversionError(str(err)) from None
    if extension == ".npz":
        try:
            with np.load(path, allow_pickle=False) as archive:
                return {name: archive[name] for name in archive.files}
        except (ValueError, OSError) as err:
            raise ConversionError(f"'{path}' is not a readable .npz archive: {err}") from None
    if extension in (".pth", ".pt"):
        return _read_pth(path)
    raise ConversionError(f"'{path}': unknown checkpoint type '{extension}' (expected .ckpt, .npz or .pth)")


# ---------------------------------------------------------------- renaming

def _is_dropped(name: str) -> bool:
    return (name in OPTIMIZER_ENTRIES or name.startswith(OPTIMIZER_PREFIXES)
            or name.split(".", 1)[0] in CLASSIFIER_MODULES or name.rsplit(".", 1)[-1] in DROPPED_LEAVES)


def target_name(name: str, batch_norm_modules: set) -> str:
    """Source name -> backbone parameter name (ModelZoo and torchvision layouts)."""
    module, leaf = name.rsplit(".", 1)
    if module in batch_norm_modules:
        leaf = TORCH_BN_LEAVES.get(leaf, leaf)
    parts = [DOWNSAMPLE if part == MODELZOO_DOWNSAMPLE else part for part in module.split(".")]
    return BACKBONE_PREFIX + ".".join(parts + [leaf])


def convert_resnet50_state(source: Dict[str, np.ndarray], target_shapes: Dict[str, tuple]
                           ) -> Tuple[Dict[str, np.ndarray], ConversionReport]:
    """Rename and check `source` against the backbone's {name: shape}; float tensors become float32."""
    report = ConversionReport()
    # torchvision marks BatchNorm modules by their running statistics; their weight/bias are gamma/beta
    batch_norm_modules = {name.rsplit(".", 1)[0] for name in source if name.endswith(".running_mean")}
    converted: Dict[str, np.ndarray] = {}
    for name, value in source.items():
        if _is_dropped(name):
            report.dropped.append(name)
            continue
        target = target_name(name, batch_norm_modules) if "." in name else BACKBONE_PREFIX + name
        if target not in target_shapes:
            report.unexpected.append(name)
        elif tuple(value.shape) != tuple(target_shapes[target]):
            report.mismatched.append((target, tuple(value.shape), tuple(target_shapes[target])))
        else:
            converted[target] = value.astype(np.float32) if np.issubdtype(value.dtype, np.floating) else value
            report.converted.append(target)
    report.missing = [name for name in target_shapes if name not in converted
                      and name not in {m[0] for m in report.mismatched}]
    return converted, report


def backbone_shapes(cfg: Config) -> Dict[str, tuple]:
    """{backbone.<name>: shape} of the model's ResNet50 for this config."""
    from src.maskrcnn.resnet50 import ResNet50
    return {BACKBONE_PREFIX + p.name: tuple(p.shape) for p in ResNet50(cfg).get_parameters()}


def convert_checkpoint(src: str, out: str, cfg: Optional[Config] = None) -> ConversionReport:
    """Convert `src` and write `out` atomically; raise ConversionError (writing nothing) on any problem."""
    from mindspore import Tensor
    from src.checkpoint import write_checkpoint_atomic

    cfg = cfg or load_config()
    converted, report = convert_resnet50_state(read_source(src), backbone_shapes(cfg))
    if not report.ok:
        raise ConversionError(f"'{src}' does not match the ResNet50 backbone: {report.problems()}")
    write_checkpoint_atomic(out, [{"name": name, "data": Tensor(value)} for name, value in converted.items()])
    return report


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", required=True, help="ResNet50 checkpoint: ModelZoo .ckpt, torchvision .npz/.pth")
    parser.add_argument("--out", required=True, help="output .ckpt with backbone.* names")
    args, cfg = config_from_args(parser, argv)
    try:
        report = convert_checkpoint(args.src, args.out, cfg)
    except ConversionError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {args.out}: {len(report.converted)} backbone tensors "
          f"(dropped {len(report.dropped)} classifier/optimizer/counter entries)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
