"""Train Mask R-CNN (ResNet50-FPN) with the ModelZoo recipe; resumable, single device or data parallel.

    python train.py --config configs/coco.yaml [--pre_trained backbone.ckpt] [--key value ...]
    python train.py --config tiny --coco_root data/synthetic_coco --max_steps 20
    python train.py ... --resume auto            # continue from the newest checkpoint of the output dir

Any config key can be overridden (`--train.base_lr 0.01` or a unique leaf `--base_lr 0.01`). Outputs in
--output_dir: loss_<rank>.log (the recipe's loss lines), metrics.jsonl (rank 0), train_summary_<rank>.json,
and checkpoints under train.save_checkpoint_path (relative to --output_dir unless absolute, rank 0 only).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Optional, Sequence

from src.checkpoint import CheckpointError, find_checkpoints
from src.cli import output_dir_problem
from src.config import Config, ConfigError, config_from_args, resolved_paths, set_value, validate
from src.device import AUTO
from src.training import COMM_BACKENDS, RunOptions, checkpoint_dir, train

# script option -> config key it sets (the script option wins over a config override of the same key)
OPTION_KEYS = {"device_target": "train.device_target", "dataset": "data.dataset",
               "mindrecord_dir": "data.mindrecord_dir", "coco_root": "data.coco_root", "seed": "train.seed"}
EXIT_TRAINING_ERROR = 1
EXIT_BAD_PATH = 2


def _flag(value: str) -> bool:
    if value.lower() in ("true", "1", "yes"):
        return True
    if value.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got '{value}'")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device_target", choices=[AUTO, *sorted(COMM_BACKENDS)],
                        help="sets train.device_target (auto: Ascend, then GPU, then CPU)")
    parser.add_argument("--dataset", choices=("coco", "other"), help="sets data.dataset")
    parser.add_argument("--mindrecord_dir", help="sets data.mindrecord_dir (converted on first use)")
    parser.add_argument("--coco_root", help="sets data.coco_root")
    parser.add_argument("--seed", type=int, help="sets train.seed (weights init, data order, augmentation)")
    parser.add_argument("--pre_trained", default="",
                        help="converted ResNet50 backbone or full Mask R-CNN checkpoint to start from")
    parser.add_argument("--run_distribute", type=_flag, nargs="?", const=True, default=False,
                        help="data parallel over all ranks (msrun or an Ascend rank table)")
    parser.add_argument("--output_dir", default=".", help="logs, metrics and checkpoints go here")
    parser.add_argument("--resume", default="",
                        help="training checkpoint to continue from, or 'auto' for the newest in the output dir")
    parser.add_argument("--max_steps", type=int, default=0,
                        help="stop (and save) once this many global steps are done; 0 = train all epochs")
    parser.add_argument("--deadline", type=float, default=0.0,
                        help="Unix time: stop (and save) before a step that would end after it; 0 = no deadline")
    return parser


def parse_args(argv: Optional[Sequence[str]] = None):
    """Script options + config; every value is validated before any data is touched."""
    parser = build_parser()
    args, cfg = config_from_args(parser, argv)
    try:
        for option, key in OPTION_KEYS.items():
            if getattr(args, option) is not None:
                set_value(cfg, key, getattr(args, option))
        validate(cfg)
    except ConfigError as err:
        parser.error(str(err))
    if args.max_steps < 0:
        parser.error(f"--max_steps must be >= 0, got {args.max_steps}")
    if args.deadline < 0:
        parser.error(f"--deadline must be a Unix time >= 0 (0 = none), got {args.deadline}")
    if args.deadline and args.run_distribute:
        # each rank would read its own clock, stop at its own step and leave the others waiting in AllReduce
        parser.error("--deadline works for standalone training only, not with --run_distribute")
    return args, cfg


def path_problem(args, cfg: Config) -> str:
    """The first output location that cannot be a writable directory, as one line ('' if none)."""
    paths = {"--output_dir": args.output_dir, "data.mindrecord_dir": cfg.data.mindrecord_dir}
    if cfg.train.save_checkpoint:
        paths["train.save_checkpoint_path"] = checkpoint_dir(cfg, args.output_dir)
    return next(filter(None, (output_dir_problem(path, name) for name, path in paths.items())), "")


def main(argv: Optional[Sequence[str]] = None, build_model: Optional[Callable] = None) -> int:
    """`build_model(cfg)` replaces MaskRcnnResnet50 (tests pass small models)."""
    from src.data.records import DatasetError
    from src.network_define import NonFiniteLossError

    if os.getenv("MS_ROLE") == "MS_SCHED" and os.getenv("MSRUN_NODE_RANK", "0") != "0":
        return 0    # msrun starts a scheduler wherever master_addr is local; the job's is node 0's
    args, cfg = parse_args(argv)
    print(resolved_paths(cfg), flush=True)
    problem = path_problem(args, cfg)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return EXIT_BAD_PATH
    os.makedirs(args.output_dir, exist_ok=True)
    # run as a script, the same command can compile the graph apart (src/compile_cache.py)
    command = (sys.executable, *sys.argv) if argv is None else ()
    options = RunOptions(output_dir=args.output_dir, pre_trained=args.pre_trained, resume=args.resume,
                         run_distribute=args.run_distribute, max_steps=args.max_steps, deadline=args.deadline,
                         compile_command=command)
    try:
        return train(options, cfg, build_model)
    except NonFiniteLossError as err:
        latest = find_checkpoints(checkpoint_dir(cfg, args.output_dir))
        kept = f"last good checkpoint: {latest[-1]}" if latest else "no checkpoint was written before it"
        print(f"error: {err}. Training stopped; {kept}. Lower train.base_lr or check the data.", file=sys.stderr)
    except (CheckpointError, DatasetError) as err:
        print(f"error: {err}", file=sys.stderr)
    return EXIT_TRAINING_ERROR


if __name__ == "__main__":
    sys.exit(main())
