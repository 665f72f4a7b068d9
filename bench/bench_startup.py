"""Start-up of predict.py: seconds from the command to the first picture written, without the compile cache,
with a fresh one (cold) and with the one that run left (warm), each run in its own process, side by side.

A randomly initialised model (start-up does not depend on the weights) and one synthetic 640x480 image:

    python bench/bench_startup.py                          # demo preset and the recipe (coco)
    python bench/bench_startup.py --configs demo --repeats 2

The machine is shared: the 1-minute load average is printed before every run.
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

IMAGE_SHAPE = (480, 640, 3)
MODES = ("off", "cold", "warm")


def make_inputs(config: str, work: str):
    """(checkpoint, image) for a preset, in a child process so that this one compiles nothing."""
    ckpt, image = os.path.join(work, f"{config}.ckpt"), os.path.join(work, "image.png")
    code = ("import sys, cv2, numpy as np, mindspore as ms\n"
            "from src.config import load_config\n"
            "from src.inference import setup_context\n"
            "from src.maskrcnn.mask_rcnn_r50 import MaskRcnnResnet50\n"
            "setup_context('CPU')\n"
            "ms.set_seed(0)\n"
            f"ms.save_checkpoint(MaskRcnnResnet50(load_config({config!r})), {ckpt!r})\n"
            f"cv2.imwrite({image!r}, np.random.default_rng(0).integers(0, 255, {IMAGE_SHAPE}, dtype=np.uint8))\n")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=dict(os.environ, GLOG_v="3"), check=True,
                   capture_output=True)
    return ckpt, image


def timed_predict(config: str, ckpt: str, image: str, out: str, cache_dir: str, cache: bool):
    """(seconds to the first picture, seconds in all) of one predict.py process."""
    env = dict(os.environ, GLOG_v="3", MASKRCNN_COMPILE_CACHE="1" if cache else "0",
               MASKRCNN_COMPILE_CACHE_DIR=cache_dir)
    command = [sys.executable, "predict.py", "--config", config, "--checkpoint_path", ckpt, image, "--out", out]
    start = time.time()
    first = None
    with subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True) as proc:
        for line in proc.stdout:
            if first is None and "detections ->" in line:
                first = time.time() - start
        stderr = proc.stderr.read()
    if proc.returncode != 0:
        raise RuntimeError(f"predict.py failed:\n{stderr[-2000:]}")
    return first, time.time() - start


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", nargs="+", default=["demo", "coco"])
    parser.add_argument("--repeats", type=int, default=1, help="rounds of off / cold / warm per config")
    args = parser.parse_args(argv)
    work = tempfile.mkdtemp(prefix="bench_startup_")
    try:
        print("| config | cache | load (1 min) | to first picture s | total s |")
        print("|---|---|---|---|---|")
        for config in args.configs:
            ckpt, image = make_inputs(config, work)
            for round_ in range(args.repeats):
                cache_dir = os.path.join(work, f"cache-{config}-{round_}")
                for mode in MODES:
                    load = os.getloadavg()[0]
                    first, total = timed_predict(config, ckpt, image, os.path.join(work, f"out-{mode}"),
                                                 cache_dir, cache=mode != "off")
                    print(f"| {config} | {mode} | {load:.1f} | {first:.1f} | {total:.1f} |", flush=True)
            os.remove(ckpt)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
