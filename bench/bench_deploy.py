"""After-training speed and sizes: eval images/s, MINDIR/ONNX export time and size, offline runner images/s.

A randomly initialised model (speed does not depend on the weights) on a synthetic COCO val set:

    python bench/bench_deploy.py                                  # tiny preset (192x128)
    python bench/bench_deploy.py --val-images 8 --fpn.fpn_out_channels 32 ...   # any config key
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from src.config import config_from_args                                   # noqa: E402
from src.synthetic import make_synthetic_coco                             # noqa: E402

SYNTHETIC_SIZE_RANGE = (100, 260)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--val-images", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args, cfg = config_from_args(parser, argv, default_config="tiny")

    import mindspore as ms
    from eval import evaluate
    from export import export_model
    from preprocess import preprocess
    from src.maskrcnn.mask_rcnn_r50 import MaskRcnnResnet50
    from src.coco_eval import METRICS_FILE
    from src.inference import setup_context

    work = tempfile.mkdtemp(prefix="bench_deploy_")
    root = make_synthetic_coco(os.path.join(work, "coco"), 1, args.val_images, args.seed, *SYNTHETIC_SIZE_RANGE)
    cfg.data.coco_root, cfg.data.mindrecord_dir = root, os.path.join(work, "mindrecord")
    ann_file = os.path.join(root, cfg.data.instance_set.format(cfg.data.val_data_type))
    setup_context("CPU")
    ckpt = os.path.join(work, "model.ckpt")
    net = MaskRcnnResnet50(cfg)
    ms.save_checkpoint(net, ckpt)
    params = sum(p.size for p in net.get_parameters())
    print(f"model: {params / 1e6:.2f}M parameters, input {cfg.data.img_height}x{cfg.data.img_width}, "
          f"checkpoint {os.path.getsize(ckpt) / 2 ** 20:.1f} MiB", flush=True)

    start = time.time()
    evaluate(cfg, ckpt, ann_file, os.path.join(work, "eval"))
    with open(os.path.join(work, "eval", METRICS_FILE), encoding="utf-8") as handle:
        speed = json.load(handle)["images_per_second"]
    print(f"eval: {args.val_images} images in {time.time() - start:.1f} s incl. compile; {speed:.3f} images/s "
          f"after the first batch (batch {cfg.test.test_batch_size})", flush=True)

    for file_format in ("MINDIR", "ONNX"):
        start = time.time()
        try:
            path = export_model(cfg, ckpt, file_format, os.path.join(work, "maskrcnn"), "CPU")
            print(f"export {file_format}: {time.time() - start:.1f} s, {os.path.getsize(path) / 2 ** 20:.1f} MiB",
                  flush=True)
        except ValueError as err:
            print(f"export {file_format}: failed after {time.time() - start:.1f} s: {err}", flush=True)

    inputs = os.path.join(work, "preprocess_result")
    preprocess(cfg, os.path.join(root, cfg.data.val_data_type), ann_file, inputs)
    # Its own process, as scripts/run_infer_310.sh runs it: the exported graph holds MindSpore's Conv2D, which
    # needs oneDNN capped at AVX2 before the process's first oneDNN call (src/cpu_kernels.py).
    config_file = os.path.join(work, "config.yaml")
    with open(config_file, "w", encoding="utf-8") as handle:
        yaml.safe_dump(cfg.to_dict(), handle)
    start = time.time()
    runner = subprocess.run([sys.executable, "-m", "src.infer_files", "--mindir_path",
                             os.path.join(work, "maskrcnn.mindir"), "--input_dir", inputs, "--result_dir",
                             os.path.join(work, "results"), "--config", config_file],
                            cwd=ROOT, capture_output=True, text=True, check=True)
    outputs = sum(os.path.getsize(os.path.join(work, "results", f)) for f in os.listdir(os.path.join(work, "results")))
    print(f"offline runner (MINDIR on CPU, batch 1): {runner.stdout.strip()}; {time.time() - start:.1f} s with "
          f"start-up and compile; result files {outputs / 1024:.1f} KiB", flush=True)


if __name__ == "__main__":
    main()
