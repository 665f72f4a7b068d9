"""Evaluate a Mask R-CNN checkpoint on COCO: bbox and segm mAP with pycocotools.

    python eval.py --checkpoint_path CKPT --ann_file VAL_JSON [--output_dir eval] [--config coco] [--key value ...]

The images come from the eval MindRecord of `data.coco_root` / `data.val_data_type` (converted on first
use, reused afterwards) and must be exactly the images of VAL_JSON: this is checked before inference.
Writes <output_dir>/detections.json (COCO results) and <output_dir>/eval_metrics.json.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Callable, Dict, Iterable, List, Sequence, Tuple

import numpy as np
from tqdm import tqdm

from src import compile_cache
from src.config import Config, config_from_args, resolved_paths
from src.cli import check_output_dirs, run_script
from src.coco_eval import (check_image_coverage, detections_to_coco, label_to_category_ids, load_coco,
                           score_and_save)
from src.detections import detections_from_outputs
from src.inference import build_inference_net, setup_context

# detect(batch) -> (boxes, scores, labels, valid, masks), each with the batch as first axis
Detector = Callable[[Dict[str, np.ndarray]], Sequence[np.ndarray]]


def pad_batch(batch: Dict[str, np.ndarray], batch_size: int) -> Dict[str, np.ndarray]:
    """Repeat the last image of a short final batch, so the static-shape graph never recompiles."""
    missing = batch_size - len(batch["image_id"])
    if missing <= 0:
        return batch
    return {key: np.concatenate([value, np.repeat(value[-1:], missing, axis=0)]) for key, value in batch.items()}


def detect_dataset(detect: Detector, batches: Iterable[Dict[str, np.ndarray]], batch_size: int, total: int,
                   category_ids: np.ndarray, mask_threshold: float,
                   mask_paste: str = "centres") -> Tuple[List[dict], List[int], float]:
    """Run the detector over eval batches -> (COCO results, image ids in order, images/s).

    images/s leaves out the first batch, which includes graph compilation.
    """
    results: List[dict] = []
    image_ids: List[int] = []
    steady_start, steady_images = None, 0
    with tqdm(total=total, unit="img", desc="eval") as progress:
        for batch in batches:
            count = len(batch["image_id"])
            outputs = [np.asarray(out)[:count] for out in detect(pad_batch(batch, batch_size))]
            for i in range(count):
                image_id = int(batch["image_id"][i])
                detections = detections_from_outputs(*(out[i] for out in outputs), batch["image_shape"][i],
                                                      mask_threshold, mask_paste)
                results.extend(detections_to_coco(image_id, detections, category_ids))
                image_ids.append(image_id)
            progress.update(count)
            if steady_start is None:
                steady_start = time.time()
            else:
                steady_images += count
    elapsed = time.time() - steady_start if steady_start is not None else 0.0
    return results, image_ids, (steady_images / elapsed if steady_images and elapsed > 0 else float("nan"))


def network_detector(net) -> Detector:
    """The model in inference mode as a Detector over numpy batches."""
    from mindspore import Tensor

    def detect(batch):
        outputs = [out.asnumpy() for out in net(Tensor(batch["image"]), Tensor(batch["image_shape"]))]
        compile_cache.publish()
        return outputs
    return detect


def mindrecord_image_ids(files: Sequence[str]) -> List[int]:
    """Image ids stored in eval MindRecord files (reads only that column)."""
    import mindspore.dataset as ds

    dataset = ds.MindDataset(list(files), columns_list=["image_id"], shuffle=False)
    return [int(row[0]) for row in dataset.create_tuple_iterator(output_numpy=True, num_epochs=1)]


def coverage_fix(cfg: Config) -> str:
    """What makes --ann_file and the evaluated images agree: the eval MindRecord holds the images of
    data.coco_root's own annotation file for data.val_data_type, whatever --ann_file says."""
    source = os.path.join(cfg.data.coco_root, cfg.data.instance_set.format(cfg.data.val_data_type))
    return (f"The evaluated images are those of '{source}' (data.coco_root, data.val_data_type): pass that file "
            f"as --ann_file, or set --coco_root / --val_data_type to the set that --ann_file describes.")


def evaluate(cfg: Config, checkpoint_path: str, ann_file: str, output_dir: str) -> Dict[str, dict]:
    from src.data.conversion import data_to_mindrecord
    from src.data.pipeline import create_maskrcnn_dataset

    coco_gt = load_coco(ann_file)
    category_ids = label_to_category_ids(coco_gt.dataset["categories"], cfg.data.classes, ann_file)
    compile_cache.enable(cfg, setup_context(cfg.train.device_target), "eval")
    net = build_inference_net(cfg, checkpoint_path)
    files = data_to_mindrecord(cfg, is_training=False)
    stored_ids = mindrecord_image_ids(files)
    check_image_coverage(stored_ids, coco_gt, ann_file, coverage_fix(cfg))

    batch_size = cfg.test.test_batch_size
    dataset = create_maskrcnn_dataset(cfg, files, is_training=False, batch_size=batch_size)
    batches = dataset.create_dict_iterator(output_numpy=True, num_epochs=1)
    results, image_ids, images_per_second = detect_dataset(network_detector(net), batches, batch_size,
                                                           len(stored_ids), category_ids, cfg.test.mask_thr_binary,
                                                           cfg.test.mask_paste)
    print(f"evaluated {len(image_ids)} images, {len(results)} detections, {images_per_second:.2f} images/s "
          f"(batch {batch_size}, after the first batch)")
    return score_and_save(coco_gt, ann_file, image_ids, results, output_dir,
                          extra={"images": len(image_ids), "detections": len(results),
                                 "images_per_second": images_per_second, "checkpoint": checkpoint_path,
                                 "ann_file": ann_file}, fix=coverage_fix(cfg))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Evaluate a Mask R-CNN checkpoint on COCO (bbox + segm mAP).")
    parser.add_argument("--checkpoint_path", required=True, help="checkpoint to evaluate (.ckpt)")
    parser.add_argument("--ann_file", required=True, help="COCO instances JSON of the eval images")
    parser.add_argument("--output_dir", default="eval", help="where detections.json and eval_metrics.json go")
    args, cfg = config_from_args(parser, argv)
    print(resolved_paths(cfg), flush=True)
    check_output_dirs({"--output_dir": args.output_dir, "data.mindrecord_dir": cfg.data.mindrecord_dir})
    evaluate(cfg, args.checkpoint_path, args.ann_file, args.output_dir)


if __name__ == "__main__":
    run_script(main, sys.argv[1:])
