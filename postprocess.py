"""Score offline (Ascend 310) inference outputs on COCO: bbox and segm mAP, exactly as eval.py does.

    python postprocess.py --result_dir result_files --input_dir preprocess_result --ann_file VAL_JSON
                          [--output_dir .] [--config ...]

Reads the runner's kept detections and the preprocessed image_shape files (contract: src/infer_files.py),
maps boxes to the original images, pastes the 28x28 masks and runs pycocotools; prints the 12-line
summaries (scripts/run_infer_310.sh keeps them in acc.log) and writes detections.json / eval_metrics.json.
"""
from __future__ import annotations

import argparse
import sys
from typing import Dict

from tqdm import tqdm

from src.cli import check_output_dirs, run_script
from src.coco_eval import check_image_coverage, detections_to_coco, label_to_category_ids, load_coco, score_and_save
from src.config import Config, config_from_args
from src.detections import detections_from_outputs
from src.infer_files import list_image_ids, read_image_shape, read_outputs

# the result files are inferences of the images preprocess.py wrote from its own --ann_file
COVERAGE_FIX = "Pass the --ann_file given to preprocess.py, or rerun preprocess.py and inference with this one."


def postprocess(cfg: Config, result_dir: str, input_dir: str, ann_file: str, output_dir: str) -> Dict[str, dict]:
    coco_gt = load_coco(ann_file)
    category_ids = label_to_category_ids(coco_gt.dataset["categories"], cfg.data.classes, ann_file)
    image_ids = list_image_ids(input_dir)
    check_image_coverage(image_ids, coco_gt, ann_file, COVERAGE_FIX)
    results = []
    for image_id in tqdm(image_ids, unit="img", desc="postprocess"):
        detections = detections_from_outputs(*read_outputs(result_dir, image_id, cfg),
                                             read_image_shape(input_dir, image_id)[0], cfg.test.mask_thr_binary,
                                             cfg.test.mask_paste)
        results.extend(detections_to_coco(image_id, detections, category_ids))
    print(f"scored {len(image_ids)} images, {len(results)} detections")
    return score_and_save(coco_gt, ann_file, image_ids, results, output_dir,
                          extra={"images": len(image_ids), "detections": len(results), "result_dir": result_dir,
                                 "ann_file": ann_file}, fix=COVERAGE_FIX)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="COCO bbox/segm mAP of offline-inference outputs.")
    parser.add_argument("--result_dir", required=True, help="runner outputs <image_id>_<i>.bin")
    parser.add_argument("--input_dir", required=True, help="preprocess.py output (image_shape files)")
    parser.add_argument("--ann_file", required=True, help="COCO instances JSON of the images")
    parser.add_argument("--output_dir", default=".", help="where detections.json and eval_metrics.json go")
    args, cfg = config_from_args(parser, argv)
    check_output_dirs({"--output_dir": args.output_dir})
    postprocess(cfg, args.result_dir, args.input_dir, args.ann_file, args.output_dir)


if __name__ == "__main__":
    run_script(main, sys.argv[1:])
