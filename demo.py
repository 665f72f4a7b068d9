"""The whole product in one command, on the embedded synthetic shapes dataset, within a wall-clock budget.

    python demo.py [--minutes 30] [--images 400] [--size 128x192] [--out demo_output] [--key value ...]

Stages: synthetic COCO set (src.synthetic) -> MindRecord -> training with configs/demo.yaml -> loss curve
-> COCO bbox/segm mAP (eval.py) -> MINDIR (export.py) -> pictures of predictions on a few val images
(predict.py). Training, eval, export and predict run as their own command lines in child processes, so
the demo exercises exactly what a user runs, and each stage starts with a clean MindSpore context.

The schedule is sized to the budget: a short calibration run (in the warmup, whose rates do not depend
on the schedule length) measures the compile time and the steady step time; training then resumes from
its checkpoint with a warmup + cosine schedule that ends at the last step that still leaves time for
eval, export and predict. Other jobs on the machine change the step time, so the run stops at 1/3 and
2/3 of the planned steps, re-times and re-sizes the rest of the schedule (one compile each).
`--steps N` trains exactly N steps instead (tests, reproductions).
Any `--key value` pair is a config override passed to every stage (see src/config.py).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence

from src import atomic_io
from src.cli import output_dir_problem
from src.config import ConfigError, load_config, parse_overrides
from src.synthetic import STYLES

ROOT = os.path.dirname(os.path.abspath(__file__))
PRESET = "demo"
DEFAULT_SIZE = "128x192"
DEFAULT_STYLE = "simple"           # scenes a from-scratch ResNet50 learns within the budget (docs/demo_results.md)
VAL_IMAGES = 50
PREDICT_IMAGES = 4
PREDICT_SCORE_THR = 0.25           # low enough that short runs show detections too (docs/demo_results.md)
CALIBRATION_STEPS = 6              # first step compiles; the median of the rest is the step time
MIN_WARMUP_FRACTION = 10           # warmup <= 1/10 of the schedule: the cosine then ends below 3 % of base_lr
# Time kept for what follows training, in units measured by the calibration run:
INFERENCE_COMPILE_RATIO = 0.4      # compile of one inference graph / compile of the training graph
INFERENCE_COMPILES = 3             # eval (batch test_batch_size), export and predict (batch 1)
EVAL_IMAGE_STEP_RATIO = 0.2        # inference time of one image / one training step (batch 2, fwd+bwd)
PROCESS_OVERHEAD_S = 15.0          # one child's start (imports, network build) and checkpoint I/O
TRAIN_SEGMENTS = 3                 # after calibration: re-time and re-size twice (the machine load changes)
STEP_TIME_MARGIN = 1.1             # plan with a 10 % slower step than measured: the load tends to grow
SYNTHETIC_STAMP = "synthetic.json"
SUMMARY_FILE = "demo_summary.json"
COCO_SUMMARY_TEXT = "coco_summary.txt"
SUMMARY_LINE = re.compile(r"^\s*Average (Precision|Recall)")
TRAINING_OUTPUTS = ("checkpoint", "loss_0.log", "metrics.jsonl", "train_summary_0.json", "eval",
                    "predictions", "predict_inputs", "maskrcnn.mindir", "loss_curve.png", SUMMARY_FILE)


class DemoError(RuntimeError):
    """A stage failed; the message names it."""


# ---------------------------------------------------------------- options

def parse_size(text: str) -> tuple:
    """'128x192' -> (128, 192): height x width, positive multiples of 32."""
    match = re.fullmatch(r"(\d+)[xX](\d+)", text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"expected HEIGHTxWIDTH, e.g. {DEFAULT_SIZE}, got '{text}'")
    height, width = int(match.group(1)), int(match.group(2))
    if height <= 0 or width <= 0 or height % 32 or width % 32:
        raise argparse.ArgumentTypeError(f"height and width must be positive multiples of 32, got '{text}'")
    return height, width


def _positive(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got '{text}'") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=_positive(float), default=30.0,
                        help="wall-clock budget of the whole run, data generation to predictions")
    parser.add_argument("--images", type=_positive(int), default=400, help="synthetic training images")
    parser.add_argument("--val_images", type=_positive(int), default=VAL_IMAGES, help="synthetic val images")
    parser.add_argument("--size", type=parse_size, default=DEFAULT_SIZE, help="network input HEIGHTxWIDTH")
    parser.add_argument("--out", default="demo_output", help="output folder")
    parser.add_argument("--steps", type=_positive(int), default=None,
                        help="train exactly this many steps instead of sizing the schedule to --minutes")
    parser.add_argument("--seed", type=int, default=0, help="synthetic data seed")
    parser.add_argument("--style", choices=sorted(STYLES), default=DEFAULT_STYLE,
                        help="synthetic scene style (src/synthetic.py)")
    return parser


def parse_args(argv: Optional[Sequence[str]] = None):
    """(args, config override dict, Config); every value is checked before any work starts."""
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    out = os.path.abspath(args.out)
    try:
        overrides = parse_overrides(rest)
        overrides.update({"data.img_height": args.size[0], "data.img_width": args.size[1],
                          "data.coco_root": os.path.join(out, "synthetic_coco"),
                          "data.mindrecord_dir": os.path.join(out, "mindrecord")})
        cfg = load_config(PRESET, overrides)
    except ConfigError as err:
        parser.error(str(err))
    if args.images < cfg.train.batch_size:
        parser.error(f"--images must be at least one batch ({cfg.train.batch_size}), got {args.images}")
    args.out = out
    return args, overrides, cfg


def config_args(overrides: Dict[str, object]) -> List[str]:
    """--config demo plus every override as a `--key value` pair for a child's command line."""
    args = ["--config", PRESET]
    for key, value in overrides.items():
        args += [f"--{key}", json.dumps(value) if isinstance(value, list) else str(value)]
    return args


# ---------------------------------------------------------------- schedule

def schedule_overrides(total_steps: int, steps_per_epoch: int, warmup_step: int) -> Dict[str, object]:
    """Config keys making src.lr_schedule's warmup + cosine span exactly `total_steps` steps."""
    return {"train.base_step": total_steps - 1, "train.total_epoch": 1,     # schedule length = base_step + 1
            "train.warmup_step": min(warmup_step, total_steps // MIN_WARMUP_FRACTION),
            "train.epoch_size": -(-total_steps // steps_per_epoch)}


def segment_timing(metrics_path: str, after_step: int) -> tuple:
    """(compile seconds, steady seconds per step) of the training process that started after `after_step`.

    Its first logged step includes the graph compile; the median of the others is the step time.
    """
    with open(metrics_path, "r", encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    times = [row["step_time_ms"] / 1000.0 for row in rows if row["global_step"] > after_step]
    if len(times) < 2:
        raise DemoError(f"{metrics_path}: {len(times)} step(s) logged after step {after_step}, need 2 to time them")
    step_seconds = statistics.median(times[1:])
    return max(times[0] - step_seconds, 0.0), step_seconds


def after_training_seconds(compile_seconds: float, step_seconds: float, val_images: int) -> float:
    """Expected time of everything after training: eval, export and predict, each a process that compiles."""
    return (compile_seconds * INFERENCE_COMPILES * INFERENCE_COMPILE_RATIO
            + val_images * step_seconds * EVAL_IMAGE_STEP_RATIO + INFERENCE_COMPILES * PROCESS_OVERHEAD_S)


def steps_for_budget(seconds_left: float, compile_seconds: float, step_seconds: float, val_images: int,
                     training_compiles: int) -> int:
    """Training steps that fit in `seconds_left` after `training_compiles` more training-process starts and
    everything after training (eval, export, predict)."""
    reserve = (training_compiles * (compile_seconds + PROCESS_OVERHEAD_S)
               + after_training_seconds(compile_seconds, step_seconds, val_images))
    return max(int((seconds_left - reserve) // step_seconds), 0)


# ---------------------------------------------------------------- stages

def run_child(stage: str, argv: List[str], capture: Optional[List[str]] = None) -> None:
    """Run `python argv...` at the repository root, echoing its output; DemoError if it fails."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.setdefault("GLOG_v", "3")
    print(f"== {stage}: {' '.join(argv)}", flush=True)
    with subprocess.Popen([sys.executable] + argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True) as child:
        for line in child.stdout:
            sys.stdout.write(line)
            if capture is not None:
                capture.append(line)
        sys.stdout.flush()
    if child.returncode != 0:
        raise DemoError(f"{stage} failed with exit status {child.returncode} (its output is above)")


def make_dataset(args, cfg) -> None:
    """Synthetic COCO set (reused when made with the same options and generator code) and its train/eval
    MindRecords."""
    from src.dataset import data_to_mindrecord
    from src.synthetic import generator_fingerprint, make_synthetic_coco

    stamp_path = os.path.join(cfg.data.coco_root, SYNTHETIC_STAMP)
    wanted = {"train": args.images, "val": args.val_images, "seed": args.seed, "style": args.style,
              "generator": generator_fingerprint()}
    try:
        with open(stamp_path, "r", encoding="utf-8") as handle:
            reusable = json.load(handle) == wanted
    except (OSError, ValueError):
        reusable = False
    if not reusable:
        make_synthetic_coco(cfg.data.coco_root, args.images, args.val_images, args.seed, style=args.style)
        atomic_io.write_json(stamp_path, wanted)
    print(f"synthetic set ({args.style}): {args.images} train + {args.val_images} val images in {cfg.data.coco_root}",
          flush=True)
    for is_training in (True, False):
        data_to_mindrecord(cfg, is_training)


def clear_previous_run(out: str) -> None:
    """Remove a previous demo's training and result files (the data is kept and reused)."""
    for name in TRAINING_OUTPUTS:
        path = os.path.join(out, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)


def read_train_summary(out: str) -> dict:
    with open(os.path.join(out, "train_summary_0.json"), "r", encoding="utf-8") as handle:
        return json.load(handle)


def train(args, overrides, cfg, started: float, facts: dict) -> str:
    """Train (calibrate, then budget-sized segments; or exactly --steps); returns the final checkpoint path."""
    from src.checkpoint import find_checkpoints
    from src.dataset import load_manifest

    steps_per_epoch = load_manifest(cfg, True)["records"] // cfg.train.batch_size
    metrics = os.path.join(args.out, "metrics.jsonl")
    checkpoints = os.path.join(args.out, "checkpoint")

    def run_segment(stage: str, total_steps: int, stop: int, warmup_step: int, resume: bool,
                    deadline: float = 0.0) -> None:
        schedule = {**schedule_overrides(total_steps, steps_per_epoch, cfg.train.warmup_step),
                    "train.warmup_step": warmup_step}
        resume_args = ["--resume", find_checkpoints(checkpoints)[-1]] if resume else []
        run_child(stage, ["train.py", "--output_dir", args.out] + config_args({**overrides, **schedule})
                  + resume_args + ["--max_steps", str(stop), "--deadline", f"{deadline:.1f}"])

    if args.steps:
        run_segment("train", args.steps, args.steps, schedule_overrides(args.steps, steps_per_epoch,
                                                                          cfg.train.warmup_step)["train.warmup_step"],
                    resume=False)
    else:
        # the calibration steps lie in the warmup, whose rates do not depend on the schedule length
        run_segment("train (calibration)", CALIBRATION_STEPS, CALIBRATION_STEPS, cfg.train.warmup_step, resume=False)
        compile_seconds, step_seconds = segment_timing(metrics, 0)
        done, plans = CALIBRATION_STEPS, []
        for segment in range(TRAIN_SEGMENTS):
            segments_left = TRAIN_SEGMENTS - segment
            seconds_left = args.minutes * 60.0 - (time.time() - started)
            total = done + steps_for_budget(seconds_left, compile_seconds, step_seconds * STEP_TIME_MARGIN,
                                            args.val_images, segments_left)
            plans.append({"at_step": done, "compile_seconds": round(compile_seconds, 1),
                          "step_seconds": round(step_seconds, 3), "total_steps": total})
            print(f"plan at step {done}: compile {compile_seconds:.0f} s, {step_seconds:.2f} s/step, "
                  f"{seconds_left / 60:.1f} min left -> {total} steps in all", flush=True)
            if total <= done:
                print(f"warning: --minutes {args.minutes:g} leaves no time for more training steps; "
                      f"stopping at step {done}", flush=True)
                break
            stop = total if segments_left == 1 else max(done + (total - done) // segments_left, done + 1)
            warmup = schedule_overrides(total, steps_per_epoch, cfg.train.warmup_step)["train.warmup_step"]
            # a machine that slows down after this plan must not push the run past its budget
            deadline = started + args.minutes * 60.0 - after_training_seconds(
                compile_seconds, step_seconds * STEP_TIME_MARGIN, args.val_images)
            run_segment(f"train (segment {segment + 1}/{TRAIN_SEGMENTS})", total, stop, warmup, resume=True,
                        deadline=deadline)
            reached = read_train_summary(args.out)["global_step"]
            if reached < stop:
                print(f"training stopped at its deadline, step {reached} of {total}", flush=True)
                break
            if stop - done >= 2:
                compile_seconds, step_seconds = segment_timing(metrics, done)
            done = stop
            if done >= total:
                break
        facts["schedule_plans"] = plans
    found = find_checkpoints(checkpoints)
    if not found:
        raise DemoError(f"training wrote no checkpoint under {checkpoints}")
    summary = read_train_summary(args.out)
    facts.update(steps=summary["global_step"], steps_per_epoch=steps_per_epoch,
                 final_losses=summary["final_losses"])
    return found[-1]


def plot_losses(out: str) -> str:
    from src.loss_curve import plot_loss_curve
    from src.maskrcnn.mask_rcnn_r50 import LOSS_NAMES

    return plot_loss_curve(os.path.join(out, "metrics.jsonl"), os.path.join(out, "loss_curve.png"), LOSS_NAMES,
                           title="Mask R-CNN R50-FPN on synthetic shapes")


def evaluate(out: str, checkpoint: str, cfg, overrides) -> dict:
    """eval.py; the 12-line COCO summaries also go to eval/coco_summary.txt. Returns eval_metrics.json."""
    eval_dir = os.path.join(out, "eval")
    ann_file = os.path.join(cfg.data.coco_root, "annotations", f"instances_{cfg.data.val_data_type}.json")
    lines: List[str] = []
    run_child("eval", ["eval.py", "--checkpoint_path", checkpoint, "--ann_file", ann_file, "--output_dir", eval_dir]
              + config_args(overrides), capture=lines)
    summary, iou_type = [], iter(("bbox", "segm"))
    for line in lines:
        if SUMMARY_LINE.match(line):
            if len(summary) % 13 == 0:
                summary.append(f"{next(iou_type)}:\n")
            summary.append(line)
    atomic_io.write_bytes(os.path.join(eval_dir, COCO_SUMMARY_TEXT), "".join(summary).encode("utf-8"))
    with open(os.path.join(eval_dir, "eval_metrics.json"), "r", encoding="utf-8") as handle:
        return json.load(handle)


def export(out: str, checkpoint: str, overrides) -> str:
    path = os.path.join(out, "maskrcnn.mindir")
    run_child("export", ["export.py", "--ckpt_file", checkpoint, "--file_format", "MINDIR", "--file_name",
                         path[:-len(".mindir")]] + config_args(overrides))
    return path


def predict(out: str, checkpoint: str, cfg, overrides) -> str:
    """predict.py on the first PREDICT_IMAGES val images (copied to predict_inputs/)."""
    source = os.path.join(cfg.data.coco_root, cfg.data.val_data_type)
    inputs = os.path.join(out, "predict_inputs")
    os.makedirs(inputs, exist_ok=True)
    for name in sorted(os.listdir(source))[:PREDICT_IMAGES]:
        shutil.copyfile(os.path.join(source, name), os.path.join(inputs, name))
    pictures = os.path.join(out, "predictions")
    run_child("predict", ["predict.py", inputs, "--checkpoint_path", checkpoint, "--out", pictures,
                          "--score_thr", str(PREDICT_SCORE_THR)] + config_args(overrides))
    return pictures


def run(args, overrides, cfg) -> dict:
    started = time.time()
    os.makedirs(args.out, exist_ok=True)
    clear_previous_run(args.out)
    stage_seconds: Dict[str, float] = {}
    facts: dict = {}

    def timed(name, function, *a):
        begin = time.time()
        result = function(*a)
        stage_seconds[name] = round(time.time() - begin, 1)
        return result

    timed("data", make_dataset, args, cfg)
    checkpoint = timed("train", train, args, overrides, cfg, started, facts)
    curve = timed("loss_curve", plot_losses, args.out)
    metrics = timed("eval", evaluate, args.out, checkpoint, cfg, overrides)
    mindir = timed("export", export, args.out, checkpoint, overrides)
    pictures = timed("predict", predict, args.out, checkpoint, cfg, overrides)
    summary = {"options": {"minutes": args.minutes, "images": args.images, "val_images": args.val_images,
                           "size": list(args.size), "steps": args.steps, "seed": args.seed,
                           "overrides": {k: v for k, v in overrides.items() if not k.startswith("data.")}},
               "wall_seconds": round(time.time() - started, 1), "stage_seconds": stage_seconds, **facts,
               "bbox_AP": metrics["bbox"]["AP"], "segm_AP": metrics["segm"]["AP"],
               "load_average": list(os.getloadavg()), "checkpoint": checkpoint, "mindir": mindir,
               "loss_curve": curve, "predictions": pictures}
    atomic_io.write_json(os.path.join(args.out, SUMMARY_FILE), summary)
    return summary


def main(argv: Optional[Sequence[str]] = None) -> int:
    args, overrides, cfg = parse_args(argv)
    problem = output_dir_problem(args.out, "--out")
    if problem:
        print(f"ERROR: {problem}", file=sys.stderr)
        return 2
    try:
        summary = run(args, overrides, cfg)
    except DemoError as err:
        print(f"ERROR: {err}", file=sys.stderr)
        return 1
    print(f"\ndemo finished in {summary['wall_seconds'] / 60:.1f} min ({summary['steps']} training steps); "
          f"outputs in {args.out}")
    print(f"checkpoint {summary['checkpoint']}, MINDIR {summary['mindir']}, loss curve {summary['loss_curve']}, "
          f"predictions {summary['predictions']}")
    print(f"bbox AP {summary['bbox_AP']:.3f}  segm AP {summary['segm_AP']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
