"""Where a training step's memory goes: peak and resident memory per stage, and the static sizes behind them.

    .venv/bin/python bench/memory_stages.py [--size 768x1280] [--precisions fp32 bf16] [--graphs forward train]
        [--options key=value ...] [--env NAME=VALUE ...] [--memory_optimize_level O0]
        [--jit_level O0] [--compile apart|in_process]

Each (precision, graph) job runs in its own process on bench_train.py's synthetic batch (batch 2, the recipe config
at --size, its 128 instance slots), set up as train.py does (src/device.py: graph mode). "train" is the training
cell (forward + backward + optimizer, src/network_define.py; at learning rate --lr, default 0: the whole update runs
but the weights stay, so every call does the first one's work, as in compare_torchvision.py), "forward" the training
network alone (the forward graph that computes the eight losses, no gradients). Stages, in order: import (MindSpore
and src), build (network, amp level, optimizer and its state), batch (the input Tensors), compile (`Cell.compile`:
by default, as train.py on a cold cache, it loads the graph that a compile-only run of the same job put in
MindSpore's compile cache; `--compile in_process` compiles in the job), then --calls calls (call 1 is the first
training step). Before each stage the kernel's high-water mark is reset (/proc/self/clear_refs), so "peak" is that
stage's own peak resident memory and "RSS" what stays resident after it; the job's peak is the largest stage peak
(what ru_maxrss reports for the whole process, as in compare_torchvision.py). The losses shown are the first call's.
"Largest mappings" lists the process's biggest memory areas after the stage (/proc/self/smaps, adjacent anonymous
mappings merged by the kernel): size / resident MiB and what they are; MindSpore's CPU memory pool shows as [anon]
areas that grow in its block size and stay resident once touched. The pool's own peaks follow the job's peak: the
most its tensors held at once, and how far into its blocks they reached (MindSpore logs both at exit at INFO level,
which the jobs switch on for the pool's submodule alone).

The static sizes printed first are computed, not measured: parameters, gradients and optimizer state
(float32), and the batch's arrays. `--options` are config overrides (src/config.py keys); `--env` sets
environment variables in the job (e.g. MindSpore's MS_DEV_* switches). `--jit_level` sets
`ms.set_context(jit_config={"jit_level": ...})`.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import numpy as np

from compiled_apart import compile_apart, with_cache

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
AMP_LEVELS = {"fp32": "O0", "bf16": "O2"}
MIB = 1024.0 * 1024.0
POOL_LOG_LEVELS = "{PRE_ACT:1}"       # MindSpore's log level by submodule: INFO for the memory pool's alone


def status_mib(field):
    """A memory line of /proc/self/status (VmRSS, VmHWM: the peak since the last `reset_peak`) in MiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak():
    """Start a new high-water mark at the current resident size (Linux 4.0+)."""
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")


def largest_mappings(count=4):
    """The `count` most resident areas of /proc/self/smaps as "name size/resident" (MiB)."""
    areas, current = [], None
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if not fields[0].endswith(":"):                   # an area's header: range perms offset dev inode [path]
                low, high = (int(bound, 16) for bound in fields[0].split("-"))
                current = [os.path.basename(fields[5]) if len(fields) > 5 else "[anon]", (high - low) / MIB, 0.0]
                areas.append(current)
            elif fields[0] == "Rss:":
                current[2] = int(fields[1]) / 1024.0
    areas.sort(key=lambda area: -area[2])
    return ", ".join(f"{name} {size:,.0f}/{resident:,.0f}" for name, size, resident in areas[:count])


def run_job(job):
    """One process: the stages of job["graph"]; prints one JSON line with MiB per stage and the losses."""
    stages = {}
    started = time.perf_counter()

    def record(stage):
        stages[stage] = {"peak": status_mib("VmHWM"), "rss": status_mib("VmRSS"),
                         "s": round(time.perf_counter() - started, 1), "mappings": largest_mappings()}
        reset_peak()

    reset_peak()
    sys.path.insert(0, ROOT)
    sys.path.insert(0, BENCH)
    import mindspore as ms

    from bench_train import synthetic_batch
    from src import amp, compile_cache
    from src.config import load_config
    from src.device import release_free_heap, set_device
    from src.maskrcnn.mask_rcnn_r50 import LOSS_NAMES, MaskRcnnResnet50
    from src.network_define import build_train_step

    set_device("CPU", announce=False)                  # as train.py: graph mode
    if job["memory_optimize_level"]:
        ms.set_context(memory_optimize_level=job["memory_optimize_level"])
    if job.get("jit_level"):
        ms.set_context(jit_config={"jit_level": job["jit_level"]})
    height, width = job["height"], job["width"]
    level = AMP_LEVELS[job["precision"]]
    cfg = load_config(None, {"data.img_height": height, "data.img_width": width, "train.amp_level": level,
                             **job["overrides"]})
    record("import")

    ms.set_seed(cfg.train.seed)
    net = amp.apply(MaskRcnnResnet50(cfg), level, "CPU")
    net.set_train(True)
    cell = net
    if job["graph"] == "train":
        _, cell = build_train_step(net, LOSS_NAMES, cfg.train, job["lr"])
    record("build")

    batch = synthetic_batch(cfg)
    record("batch")
    cell.compile(*batch)
    if compile_cache.compile_only():                   # the child of --compile apart: the cache holds the graph
        return
    release_free_heap()                                # as train.py's training loop after its compile
    record("compile")
    first_losses = None
    for stage in [f"call {number}" for number in range(1, job["calls"] + 1)]:
        outputs = cell(*batch)
        losses = outputs[0] if job["graph"] == "train" else outputs
        first_losses = first_losses or [float(value.asnumpy()) for value in losses]
        record(stage)
    print(json.dumps({"stages": stages, "losses": dict(zip(LOSS_NAMES, first_losses))}), flush=True)


def static_sizes(height, width, overrides):
    """MiB of the tensors whose size follows from the config: parameters, gradients, optimizer state, batch."""
    sys.path.insert(0, ROOT)
    from src.config import load_config
    from src.data.mask_bits import packed_width
    from src.maskrcnn.mask_rcnn_r50 import MaskRcnnResnet50

    import mindspore as ms

    ms.set_context(mode=ms.GRAPH_MODE)
    ms.set_device("CPU")
    cfg = load_config(None, {"data.img_height": height, "data.img_width": width, **overrides})
    net = MaskRcnnResnet50(cfg)
    param_bytes = sum(p.size * p.itemsize for p in net.get_parameters())
    trainable_bytes = sum(p.size * p.itemsize for p in net.trainable_params())
    state_copies = {"momentum": 1, "adam": 2, "adamw": 2}[cfg.train.optimizer]
    batch, slots = cfg.train.batch_size, cfg.data.max_instance_count
    arrays = {"image float32 (B, 3, H, W)": batch * 3 * height * width * 4,
              "masks as bits (B, M, H, ceil(W / 8))": batch * slots * height * packed_width(width),
              "boxes, labels, valid (B, M, ...)": batch * slots * (16 + 4 + 1)}
    rows = [("parameters (float32)", param_bytes), ("gradients of the trainable ones", trainable_bytes),
            (f"{cfg.train.optimizer} state ({state_copies} per trainable parameter)", state_copies * trainable_bytes)]
    rows += [(f"batch: {name}", size) for name, size in arrays.items()]
    return [(name, size / MIB) for name, size in rows]


POOL_STATS = re.compile(r"DumpDynamicMemPoolStateInfo\].*? peak used mem:(\d+)M, actual peak used mem:(\d+)M")


def pool_peaks(log):
    """(peak used, actual peak used) MiB of MindSpore's memory pool from the state it logs at exit: the most its
    tensors held at once, and how far into its blocks they reached (fragmentation included); None if not logged."""
    found = POOL_STATS.findall(log)
    return tuple(int(value) for value in found[-1]) if found else None


def launch(job):
    env = dict(os.environ, **job["env"])
    env.setdefault("GLOG_v", "3")
    env.setdefault("MS_SUBMODULE_LOG_v", POOL_LOG_LEVELS)       # the pool's state at exit (INFO), nothing else
    command = [sys.executable, "-u", __file__, "--job", json.dumps(job)]
    with tempfile.TemporaryDirectory() as cache:
        if job["compile"] == "apart":
            env = with_cache(env, cache)
            compile_apart(command, env)
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    for line in reversed(done.stdout.splitlines()):
        if line.startswith("{"):
            result = json.loads(line)
            result["pool"] = pool_peaks(done.stderr)
            return result
    sys.stderr.write(done.stdout[-2000:] + done.stderr[-4000:])
    raise RuntimeError(f"job {job['precision']} {job['graph']} failed (exit {done.returncode})")


def parse_pairs(pairs, what):
    parsed = {}
    for pair in pairs:
        if "=" not in pair:
            raise SystemExit(f"{what} '{pair}': expected NAME=VALUE")
        name, value = pair.split("=", 1)
        parsed[name] = value
    return parsed


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--job", help=argparse.SUPPRESS)
    parser.add_argument("--size", default="768x1280", help="input HxW (default: the recipe's 768x1280)")
    parser.add_argument("--precisions", nargs="+", choices=sorted(AMP_LEVELS), default=["fp32", "bf16"])
    parser.add_argument("--graphs", nargs="+", choices=("forward", "train"), default=["forward", "train"])
    parser.add_argument("--lr", type=float, default=0.0,
                        help="learning rate of the train graph (default 0, as in compare_torchvision.py: the weights "
                             "stay, so every call repeats the first one's work)")
    parser.add_argument("--calls", type=int, default=3, help="calls timed after the compile (default 3)")
    parser.add_argument("--options", nargs="*", default=[], help="config overrides key=value (src/config.py keys)")
    parser.add_argument("--env", nargs="*", default=[], help="environment variables NAME=VALUE for the jobs")
    parser.add_argument("--memory_optimize_level", choices=("O0", "O1"),
                        help="ms.set_context(memory_optimize_level=...) in the jobs (default: MindSpore's)")
    parser.add_argument("--jit_level", choices=("O0", "O1", "O2"),
                        help="ms.set_context(jit_config={'jit_level': ...}) in the jobs (default: MindSpore's)")
    parser.add_argument("--compile", choices=("apart", "in_process"), default="apart",
                        help="apart (as train.py on a cold cache): a child job compiles the graph into MindSpore's "
                             "compile cache and the measured job loads it; in_process: the measured job compiles")
    args = parser.parse_args()
    if args.job:
        run_job(json.loads(args.job))
        return
    height, width = (int(v) for v in args.size.lower().split("x"))
    overrides = {}
    for name, value in parse_pairs(args.options, "--options").items():
        overrides[name] = json.loads(value) if value[:1] in "[{0123456789-" or value in ("true", "false") \
            else value
    env = parse_pairs(args.env, "--env")
    print(f"size {height}x{width}, batch 2, lr {args.lr}, options {overrides or 'none'}, env {env or 'none'}, "
          f"memory_optimize_level {args.memory_optimize_level or 'default'}, "
          f"jit_level {args.jit_level or 'default'}, compile {args.compile}", flush=True)
    print("\n| static size | MiB |\n|---|---|")
    for name, mib in static_sizes(height, width, overrides):
        print(f"| {name} | {mib:,.0f} |")
    for graph in args.graphs:
        for precision in args.precisions:
            job = {"height": height, "width": width, "precision": precision, "graph": graph,
                   "overrides": overrides, "env": env, "lr": args.lr, "calls": args.calls,
                   "memory_optimize_level": args.memory_optimize_level,
                   "jit_level": args.jit_level, "compile": args.compile}
            result = launch(job)
            stages = result["stages"]
            peak = max(s["peak"] for s in stages.values())
            losses = ", ".join(f"{name} {value!r}" for name, value in result["losses"].items())
            pool = result["pool"]
            pool_text = (f"memory pool's tensors peak {pool[0]:,} MiB, reaching {pool[1]:,} MiB into its blocks"
                         if pool else "memory pool's peak not logged")
            print(f"\n{graph} {precision}: job peak {peak:,.0f} MiB; {pool_text}; first call's losses {losses}",
                  flush=True)
            print("| stage | peak MiB | RSS after MiB | s since start | largest mappings after (size/resident MiB) |\n"
                  "|---|---|---|---|---|")
            for stage in stages:
                s = stages[stage]
                print(f"| {stage} | {s['peak']:,.0f} | {s['rss']:,.0f} | {s['s']} | {s['mappings']} |", flush=True)


if __name__ == "__main__":
    main()
