"""Write the offline (Ascend 310) inference inputs for every image of a COCO annotation file.

    python preprocess.py --data_path IMAGE_DIR --ann_file VAL_JSON --output_dir preprocess_result [--config ...]

Each image goes through the eval pipeline's own transform (src.dataset.EvalTransform), so the runner sees
exactly what eval.py feeds the network; files follow the contract in src/infer_files.py.
"""
from __future__ import annotations

import argparse
import os
import sys

from tqdm import tqdm

from src.config import Config, config_from_args
from src.infer_files import write_inputs
from src.cli import check_output_dirs, run_script
from src.coco_eval import load_coco
from src.image_input import read_image_input


def preprocess(cfg: Config, data_path: str, ann_file: str, output_dir: str) -> int:
    """Returns the number of images written."""
    from src.data.transforms import EvalTransform

    if not os.path.isdir(data_path):
        raise FileNotFoundError(f"image directory '{data_path}' does not exist")
    images = load_coco(ann_file).dataset["images"]
    if not images:
        raise ValueError(f"annotation file '{ann_file}' lists no images")
    transform = EvalTransform(cfg)
    for entry in tqdm(images, unit="img", desc="preprocess"):
        _, image, image_shape = read_image_input(os.path.join(data_path, entry["file_name"]), transform)
        write_inputs(output_dir, int(entry["id"]), image, image_shape)
    return len(images)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Write offline-inference input files (image, image_shape).")
    parser.add_argument("--data_path", required=True, help="directory of the images named in --ann_file")
    parser.add_argument("--ann_file", required=True, help="COCO instances JSON")
    parser.add_argument("--output_dir", default="preprocess_result")
    args, cfg = config_from_args(parser, argv)
    check_output_dirs({"--output_dir": args.output_dir})
    count = preprocess(cfg, args.data_path, args.ann_file, args.output_dir)
    print(f"wrote inputs of {count} images to {args.output_dir}")


if __name__ == "__main__":
    run_script(main, sys.argv[1:])
