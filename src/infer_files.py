"""The binary file contract of offline (Ascend 310) inference, and a CPU stand-in for the C++ runner.

preprocess.py writes the network inputs, one pair of files per image:
    <input_dir>/image/<image_id>.bin        float32 (1, 3, H, W)  the eval pipeline's `image`
    <input_dir>/image_shape/<image_id>.bin  float32 (1, 4)        ori_h, ori_w, scale_h, scale_w
The runner (ascend310_infer/, or `run_mindir` here) writes, per image and per network output i, the
raw bytes of the rows whose `valid` flag is set, N >= 0 of the K rows:
    <result_dir>/<image_id>_0.bin  boxes   float32 (N, 4)   network-input pixels
    <result_dir>/<image_id>_1.bin  scores  float32 (N,)
    <result_dir>/<image_id>_2.bin  labels  int32   (N,)     1..C-1
    <result_dir>/<image_id>_3.bin  valid   bool    (N,)     all true
    <result_dir>/<image_id>_4.bin  masks   float32 (N, S, S) probabilities, S = rcnn.mask_shape
Only kept rows with 28x28 masks are stored (~3 KB per detection), not full-image masks.
postprocess.py reads both and scores them like eval.py. Byte order is the machine's (little endian).

    python -m src.infer_files --mindir_path M.mindir --input_dir PRE --result_dir RES [--config ...]
"""
from __future__ import annotations

import argparse
import os
import time
from typing import List, Sequence, Tuple

import numpy as np

if not __package__:                 # run as a file: python src/infer_files.py
    import _file_run  # noqa: F401

from src import cpu_kernels
from src.config import Config, config_from_args
from src import atomic_io
from src.inference import setup_context

IMAGE_DIR = "image"
IMAGE_SHAPE_DIR = "image_shape"
OUTPUT_NAMES = ("boxes", "scores", "labels", "valid", "masks")
VALID_OUTPUT = OUTPUT_NAMES.index("valid")


def input_shapes(cfg: Config) -> dict:
    return {IMAGE_DIR: (1, 3, cfg.data.img_height, cfg.data.img_width), IMAGE_SHAPE_DIR: (1, 4)}


def output_rows(cfg: Config) -> List[Tuple[type, tuple]]:
    """(dtype, shape of one row) of each network output, in OUTPUT_NAMES order."""
    size = cfg.rcnn.mask_shape
    return [(np.float32, (4,)), (np.float32, ()), (np.int32, ()), (np.bool_, ()), (np.float32, (size, size))]


def _input_path(input_dir: str, kind: str, image_id: int) -> str:
    return os.path.join(input_dir, kind, f"{image_id}.bin")


def output_path(result_dir: str, image_id: int, index: int) -> str:
    return os.path.join(result_dir, f"{image_id}_{index}.bin")


def write_inputs(input_dir: str, image_id: int, image: np.ndarray, image_shape: np.ndarray) -> None:
    atomic_io.write_bytes(_input_path(input_dir, IMAGE_DIR, image_id),
                          np.ascontiguousarray(image, np.float32).tobytes())
    atomic_io.write_bytes(_input_path(input_dir, IMAGE_SHAPE_DIR, image_id),
                          np.ascontiguousarray(image_shape, np.float32).tobytes())


def _read_array(path: str, dtype, shape: Sequence[int]) -> np.ndarray:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"offline inference file '{path}' does not exist")
    data = np.fromfile(path, dtype=dtype)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"'{path}' holds {data.size} {np.dtype(dtype).name} values, expected shape {tuple(shape)}; "
                         f"was it written with another config (image size)?")
    return data.reshape(shape)


def list_image_ids(input_dir: str) -> List[int]:
    """Image ids present in a preprocessed input directory, sorted; both files must exist for each."""
    shape_dir = os.path.join(input_dir, IMAGE_SHAPE_DIR)
    if not os.path.isdir(shape_dir):
        raise FileNotFoundError(f"'{shape_dir}' does not exist; run preprocess.py first")
    ids = []
    for name in sorted(os.listdir(shape_dir)):
        stem, ext = os.path.splitext(name)
        if ext != ".bin":
            continue
        if not stem.isdigit():
            raise ValueError(f"'{os.path.join(shape_dir, name)}': file names must be <image_id>.bin")
        if not os.path.isfile(_input_path(input_dir, IMAGE_DIR, int(stem))):
            raise FileNotFoundError(f"'{_input_path(input_dir, IMAGE_DIR, int(stem))}' is missing "
                                    f"(its image_shape file exists)")
        ids.append(int(stem))
    if not ids:
        raise ValueError(f"no <image_id>.bin files in '{shape_dir}'")
    return sorted(ids)


def read_image_shape(input_dir: str, image_id: int) -> np.ndarray:
    return _read_array(_input_path(input_dir, IMAGE_SHAPE_DIR, image_id), np.float32, (1, 4))


def read_inputs(input_dir: str, image_id: int, cfg: Config) -> Tuple[np.ndarray, np.ndarray]:
    shapes = input_shapes(cfg)
    image = _read_array(_input_path(input_dir, IMAGE_DIR, image_id), np.float32, shapes[IMAGE_DIR])
    return image, read_image_shape(input_dir, image_id)


def keep_valid_rows(outputs: Sequence[np.ndarray]) -> List[np.ndarray]:
    """Batch-1 outputs (1, K, ...) -> the rows flagged valid, (N, ...), as the C++ runner stores them."""
    valid = np.asarray(outputs[VALID_OUTPUT]).reshape(-1).astype(bool)
    return [np.asarray(out)[0][valid] for out in outputs]


def write_outputs(result_dir: str, image_id: int, outputs: Sequence[np.ndarray]) -> None:
    for index, rows in enumerate(keep_valid_rows(outputs)):
        atomic_io.write_bytes(output_path(result_dir, image_id, index), np.ascontiguousarray(rows).tobytes())


def read_outputs(result_dir: str, image_id: int, cfg: Config) -> List[np.ndarray]:
    """The kept rows of one image: [boxes (N,4), scores (N,), labels (N,), valid (N,), masks (N,S,S)]."""
    arrays, counts = [], []
    for index, (dtype, row_shape) in enumerate(output_rows(cfg)):
        path = output_path(result_dir, image_id, index)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"runner output '{path}' does not exist (did inference finish for "
                                    f"image {image_id}?)")
        data = np.fromfile(path, dtype=dtype)
        row_size = int(np.prod(row_shape))
        if data.size % row_size:
            raise ValueError(f"'{path}' holds {data.size} {np.dtype(dtype).name} values, not a multiple of the "
                             f"row size {row_size} of output '{OUTPUT_NAMES[index]}'")
        counts.append(data.size // row_size)
        arrays.append(data.reshape((-1,) + tuple(row_shape)))
    if len(set(counts)) != 1:
        raise ValueError(f"runner outputs of image {image_id} in '{result_dir}' disagree on the number of "
                         f"detections: {dict(zip(OUTPUT_NAMES, counts))}")
    return arrays


def run_mindir(mindir_path: str, input_dir: str, result_dir: str, cfg: Config) -> Tuple[int, float]:
    """CPU stand-in for the C++ runner: same inputs, same output files. Returns (images, seconds)."""
    import mindspore as ms
    from mindspore import nn

    if not os.path.isfile(mindir_path):
        raise FileNotFoundError(f"MINDIR '{mindir_path}' does not exist")
    net = nn.GraphCell(ms.load(mindir_path))
    image_ids = list_image_ids(input_dir)
    os.makedirs(result_dir, exist_ok=True)
    start = time.time()
    for image_id in image_ids:
        image, image_shape = read_inputs(input_dir, image_id, cfg)
        outputs = net(ms.Tensor(image), ms.Tensor(image_shape))
        write_outputs(result_dir, image_id, [out.asnumpy() for out in outputs])
    return len(image_ids), time.time() - start


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mindir_path", required=True)
    parser.add_argument("--input_dir", required=True, help="preprocess.py output")
    parser.add_argument("--result_dir", required=True)
    args, cfg = config_from_args(parser, argv)
    # The exported graph holds MindSpore's own Conv2D. Set here, not in run_mindir: the cap is per process, and
    # in a caller's process it would leak into the environment of the processes it starts.
    cpu_kernels.cap_isa_for_mindspore_kernels()
    setup_context("CPU")
    count, seconds = run_mindir(args.mindir_path, args.input_dir, args.result_dir, cfg)
    print(f"inferred {count} images in {seconds:.1f} s ({count / max(seconds, 1e-9):.2f} images/s)")


if __name__ == "__main__":
    main()
