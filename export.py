"""Export a trained Mask R-CNN as a batch-1 inference graph: MINDIR, AIR (Ascend only) or ONNX.

    python export.py --ckpt_file CKPT --file_format MINDIR --device_target CPU [--file_name maskrcnn] [--config ...]

Graph inputs: image (1, 3, H, W) float32 and image_shape (1, 4) float32 at the configured input size;
outputs: boxes, scores, labels, valid, masks as in docs/architecture.md (K = test.test_max_per_img).
The file appears atomically as <file_name>.mindir / .air / .onnx. For ONNX the ops are built from operators
MindSpore's ONNX exporter converts (src/ops/backend.py `use_mindspore_kernels(onnx=True)`), with the same values.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time
from typing import Tuple

import numpy as np

from src import atomic_io
from src.cli import check_output_dirs, run_script
from src.config import Config, config_from_args
from src.inference import build_inference_net, setup_context
from src.ops import backend

FORMAT_SUFFIX = {"MINDIR": ".mindir", "AIR": ".air", "ONNX": ".onnx"}
EXPORT_BATCH = 1


def export_inputs(cfg: Config) -> Tuple[np.ndarray, np.ndarray]:
    """Example inputs fixing the exported shapes: a blank image that fills the whole input at scale 1."""
    height, width = cfg.data.img_height, cfg.data.img_width
    image = np.zeros((EXPORT_BATCH, 3, height, width), np.float32)
    image_shape = np.tile(np.array([[height, width, 1.0, 1.0]], np.float32), (EXPORT_BATCH, 1))
    return image, image_shape


def _unsupported_op(message: str) -> str:
    """The operator an exporter complained about, if its message names one."""
    for pattern in (r"Exporting (\w+) operator is not (?:yet )?supported",
                    r"Can ?not find key (\w+) in convert map",
                    r"[Oo]p(?:erator)? \[?(\w+)\]? is not supported"):
        match = re.search(pattern, message)
        if match:
            return match.group(1)
    return ""


def _onnx_failure_message(err: Exception) -> str:
    message = str(err).strip()
    op = _unsupported_op(message)
    return (f"ONNX export of the Mask R-CNN inference graph failed"
            f"{f': operator {op} is not supported by the ONNX exporter' if op else ''} "
            f"(MindSpore says: {message.splitlines()[0] if message else type(err).__name__}). Export MINDIR instead.")


def export_model(cfg: Config, ckpt_file: str, file_format: str, file_name: str, device_target: str) -> str:
    """Export and return the written path; raises ValueError before any work for an impossible request."""
    import mindspore as ms

    file_format = file_format.upper()
    if file_format not in FORMAT_SUFFIX:
        raise ValueError(f"--file_format must be one of {', '.join(FORMAT_SUFFIX)}, got '{file_format}'")
    device_target = setup_context(device_target)
    if file_format == "AIR" and device_target != "Ascend":
        raise ValueError(f"AIR export needs --device_target Ascend (the AIR graph is built by the Ascend "
                         f"backend), got '{device_target}'; export MINDIR here and convert on an Ascend host")
    suffix = FORMAT_SUFFIX[file_format]
    target = file_name if file_name.endswith(suffix) else file_name + suffix
    directory = os.path.dirname(os.path.abspath(target))
    check_output_dirs({"the directory of --file_name": directory})
    os.makedirs(directory, exist_ok=True)

    with backend.use_mindspore_kernels(onnx=file_format == "ONNX"):   # exported graphs hold standard operators
        net = build_inference_net(cfg, ckpt_file)
    inputs = [ms.Tensor(array) for array in export_inputs(cfg)]
    try:
        with atomic_io.staged_path(target, suffix) as staging:
            ms.export(net, *inputs, file_name=staging[:-len(suffix)], file_format=file_format)
    except BaseException as err:
        if file_format == "ONNX" and isinstance(err, (RuntimeError, TypeError, ValueError)):
            raise ValueError(_onnx_failure_message(err)) from None
        raise
    return target


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Export Mask R-CNN (batch 1) to MINDIR, AIR or ONNX.")
    parser.add_argument("--ckpt_file", required=True, help="trained checkpoint (.ckpt)")
    parser.add_argument("--file_format", default="MINDIR", help="MINDIR, AIR (Ascend only) or ONNX")
    parser.add_argument("--file_name", default="maskrcnn", help="output path without suffix")
    parser.add_argument("--device_target", default=None, help="auto, CPU, GPU or Ascend (default: train.device_target)")
    args, cfg = config_from_args(parser, argv)
    device_target = args.device_target or cfg.train.device_target
    start = time.time()
    path = export_model(cfg, args.ckpt_file, args.file_format, args.file_name, device_target)
    print(f"exported {path} ({os.path.getsize(path) / 2 ** 20:.1f} MiB) in {time.time() - start:.1f} s")


if __name__ == "__main__":
    run_script(main, sys.argv[1:])
