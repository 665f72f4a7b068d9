"""Soak: train.py killed with SIGKILL at random moments and resumed each time ends exactly like an uninterrupted run.

The real (narrow) model trains 12 steps (3 epochs of 4) with a checkpoint every 3 steps and at every epoch end.
The killed run is started again with `--resume auto` after each of four kills:
  1. data loading: during the MindRecord conversion of the first start (its MindRecord folder starts empty), at
     a random point: writing records, committing, moving a shard or the manifest into place;
  2. a step: from outside, a random moment after the console reports a randomly chosen step;
  3. a checkpoint write: inside a randomly chosen save;
  4. the start after kill 3, while it rewrites loss_0.log or metrics.jsonl to drop the steps it trains again.
Kills 2 and 3 (followed by 4) come in random order. Kills 1, 3 and 4 need moments too short to hit from outside,
so a small wrapper (KILLING_TRAIN) installs hooks on MindSpore's writers and on os.replace and then runs train.py
unchanged; the hook kills its own process with SIGKILL, so no cleanup of train.py runs. A checkpoint write is cut
in one of two ways: as MindSpore's staging file holding a prefix of the bytes (killed inside
ms.save_checkpoint), or as our complete staging file not yet moved into place.

The moments come from one seed, printed at the start; rerun a failure with MASKRCNN_SOAK_SEED=<seed>.
"""
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import List

import pytest

from src.config import load_config
from src.data.conversion import MANIFEST_SUFFIX
from src.maskrcnn.mask_rcnn_r50 import LOSS_NAMES
from contract_net import RECIPE_LINE
from inference_helpers import config_cli_args

pytestmark = pytest.mark.slow          # four graph compilations of the narrow model; CI runs the slow tests too

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_PY = os.path.join(ROOT, "train.py")
SEED_VARIABLE = "MASKRCNN_SOAK_SEED"
PLAN_VARIABLE = "MASKRCNN_SOAK_KILL"
STEPS_PER_EPOCH, EPOCHS, SAVE_EVERY = 4, 3, 3              # 8 synthetic training images, batch 2
LAST_STEP = STEPS_PER_EPOCH * EPOCHS
SAVED_STEPS = sorted({s for s in range(1, LAST_STEP + 1) if s % SAVE_EVERY == 0 or s % STEPS_PER_EPOCH == 0})
RUN_TIMEOUT = 600
KILL_DELAY = 0.08                  # at most about one step of the narrow model: the kill lands in the next step
PROGRESS_LINE = re.compile(r"^epoch (\d+)/\d+ step (\d+)/(\d+) ")
KILL_MARK = "soak: SIGKILL "

# Runs train.py (argv[1:]) as __main__ after installing the kill described by MASKRCNN_SOAK_KILL (JSON).
KILLING_TRAIN = """
import fnmatch, json, os, runpy, signal, sys
import mindspore
from mindspore.mindrecord import FileWriter

plan = json.loads(os.environ["%(plan)s"])

def die(where):
    sys.stdout.flush()
    print("%(mark)s" + where, file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)

def hook_writer(method):
    real = getattr(FileWriter, method)
    def wrapped(self, *args, **kwargs):
        if plan.get("point") == "before " + method:
            die("MindRecord conversion before FileWriter." + method)
        result = real(self, *args, **kwargs)
        if plan.get("point") == "after " + method:
            die("MindRecord conversion after FileWriter." + method)
        return result
    setattr(FileWriter, method, wrapped)

real_replace = os.replace
def replace(source, target, *args, **kwargs):
    if fnmatch.fnmatch(os.path.basename(target), plan.get("before_replace", "")):
        die("before moving " + os.path.basename(source) + " to " + os.path.basename(target))
    return real_replace(source, target, *args, **kwargs)

real_save = mindspore.save_checkpoint
saves = []
def save_then_die(obj, path, *args, **kwargs):
    real_save(obj, path, *args, **kwargs)
    saves.append(path)
    if len(saves) == plan["save"]:
        if plan["fraction"] < 1.0:           # what a kill inside MindSpore's write loop leaves: its .tmp, cut short
            staging = os.path.splitext(path)[0] + ".tmp"
            real_replace(path, staging)
            os.truncate(staging, int(os.path.getsize(staging) * plan["fraction"]))
            die("writing " + os.path.basename(staging) + " (%%.2f of its bytes)" %% plan["fraction"])
        die("before moving " + os.path.basename(path) + " into place")

if "point" in plan:
    for method in ("write_raw_data", "commit"):
        hook_writer(method)
if "before_replace" in plan:
    os.replace = replace
if "save" in plan:
    mindspore.save_checkpoint = save_then_die
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
""" % {"plan": PLAN_VARIABLE, "mark": KILL_MARK}


@dataclass
class Soak:
    """Output and MindRecord folders of the uninterrupted and of the killed-and-resumed run."""
    seed: int
    reference_out: str
    reference_mindrecord: str
    soak_out: str
    soak_mindrecord: str
    kills: List[str] = field(default_factory=list)

    def context(self) -> str:
        return f"seed {self.seed} (rerun with {SEED_VARIABLE}={self.seed}); kills: " + "; ".join(self.kills)


def train_args(synthetic_coco, mindrecord_dir, output_dir):
    cfg = load_config("tiny", {"data.coco_root": synthetic_coco, "data.mindrecord_dir": str(mindrecord_dir)})
    return config_cli_args(cfg) + ["--output_dir", str(output_dir), "--epoch_size", str(EPOCHS),
                                   "--save_checkpoint_steps", str(SAVE_EVERY), "--keep_checkpoint_max", "20"]


def child_env(plan=None):
    env = dict(os.environ, GLOG_v="3", PYTHONPATH=ROOT)
    env.pop(PLAN_VARIABLE, None)
    if plan is not None:
        env[PLAN_VARIABLE] = json.dumps(plan)
    return env


def start_full_run(args, log_path):
    with open(log_path, "w", encoding="utf-8") as log:
        return subprocess.Popen([sys.executable, TRAIN_PY, *args], stdout=log, stderr=subprocess.STDOUT,
                                env=child_env(), cwd=os.path.dirname(log_path))


def finish_full_run(child, log_path):
    try:
        child.wait(timeout=RUN_TIMEOUT)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == 0, open(log_path, encoding="utf-8").read()[-3000:]


def start_killing_run(args, plan, log_path):
    """(process, stderr file); stdout is a pipe so the caller can follow the steps."""
    err = open(log_path, "w", encoding="utf-8")
    child = subprocess.Popen([sys.executable, "-c", KILLING_TRAIN, TRAIN_PY, *args], stdout=subprocess.PIPE,
                             stderr=err, text=True, env=child_env(plan), cwd=os.path.dirname(log_path),
                             start_new_session=True)
    return child, err


def global_step_of(line):
    match = PROGRESS_LINE.match(line)
    return (int(match.group(1)) - 1) * int(match.group(3)) + int(match.group(2)) if match else None


def follow_and_kill(child, after_step, delay):
    """Read the child's console until it reports global step `after_step`, wait `delay` s, then SIGKILL it."""
    seen = []
    for line in child.stdout:
        seen.append(line)
        step = global_step_of(line)
        if step is not None and step >= after_step:
            time.sleep(delay)
            child.send_signal(signal.SIGKILL)
            break
    rest, _ = child.communicate(timeout=RUN_TIMEOUT)
    return "".join(seen) + rest


def resumed_step(output_dir):
    """Global step of the newest checkpoint (0 if none): where `--resume auto` continues."""
    directory = os.path.join(output_dir, "checkpoint")
    names = os.listdir(directory) if os.path.isdir(directory) else []
    steps = [(int(m.group(1)) - 1) * STEPS_PER_EPOCH + int(m.group(2))
             for m in (re.match(r"^maskrcnn-(\d+)_(\d+)\.ckpt$", name) for name in names) if m]
    return max(steps, default=0)


def kill_plan(kind, start, early, rng):
    """(plan for KILLING_TRAIN or {} for a kill from outside, description, step to kill after)."""
    # the first kill after the conversion stays in the first 2/3 so that the next one has steps left to hit
    last_target = LAST_STEP * 2 // 3 if early else LAST_STEP
    if kind == "conversion":
        point = rng.choice(["before write_raw_data", "after write_raw_data", "after commit", "shard", "manifest"])
        if point in ("shard", "manifest"):
            pattern = "MaskRcnn_train.mindrecord?" if point == "shard" else "*" + MANIFEST_SUFFIX
            return {"before_replace": pattern}, f"before moving the first {point} into place", None
        return {"point": point}, point, None
    if kind == "checkpoint":
        candidates = [s for s in SAVED_STEPS if start < s <= last_target]
        target = rng.choice(candidates)
        fraction = rng.choice([1.0, round(rng.uniform(0.0, 1.0), 2)])
        plan = {"save": SAVED_STEPS.index(target) - SAVED_STEPS.index(candidates[0]) + 1, "fraction": fraction}
        return plan, f"saving global step {target}, {fraction:.2f} of the staging file written", None
    if kind == "log rewrite":
        name = rng.choice(["loss_0.log", "metrics.jsonl"])
        return {"before_replace": name}, f"before the rewritten {name} replaces the old one", None
    # after the first checkpoint is complete, so that a later run resumes from one whatever else is drawn
    after = rng.randint(max(start + 1, SAVED_STEPS[0] + 1), last_target - 3)
    delay = round(rng.uniform(0.0, KILL_DELAY), 3)
    return {}, f"{delay} s after global step {after}", (after, delay)


def killed_run(soak, synthetic_coco, number, kind, early, rng):
    """Start the soak run with `--resume auto`, kill it as `kind` says (moment drawn from rng), check it died."""
    args = train_args(synthetic_coco, soak.soak_mindrecord, soak.soak_out) + ["--resume", "auto"]
    start = resumed_step(soak.soak_out)
    plan, what, outside = kill_plan(kind, start, early, rng)
    soak.kills.append(f"{number}: {kind}, resumed at step {start}, {what}")
    log_path = os.path.join(os.path.dirname(soak.soak_out), f"killed_run_{number}.log")
    child, err = start_killing_run(args, plan, log_path)
    try:
        console = follow_and_kill(child, *outside) if outside else child.communicate(timeout=RUN_TIMEOUT)[0]
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        err.close()
    stderr = open(log_path, encoding="utf-8").read()
    assert child.returncode == -signal.SIGKILL, f"run {number} was not killed ({soak.context()}):\n" \
                                                f"{console[-2000:]}\n{stderr[-2000:]}"
    if outside:
        soak.kills[-1] += f" -> last step reported {max(filter(None, map(global_step_of, console.splitlines())))}"
    else:
        assert KILL_MARK in stderr, f"run {number}: the kill hook never fired ({soak.context()})"
        soak.kills[-1] += " -> " + stderr.split(KILL_MARK)[-1].strip()
    with pytest.raises(ProcessLookupError):        # nothing of the killed run lives on (e.g. data workers)
        os.killpg(child.pid, 0)


@pytest.fixture(scope="module")
def soak(synthetic_coco, tmp_path_factory):
    seed = int(os.environ.get(SEED_VARIABLE) or random.SystemRandom().randrange(1 << 31))
    print(f"soak seed {seed}: rerun with {SEED_VARIABLE}={seed}", flush=True)
    rng = random.Random(seed)
    base = tmp_path_factory.mktemp("soak")
    result = Soak(seed, str(base / "reference"), str(base / "reference_mindrecord"), str(base / "soak"),
                  str(base / "soak_mindrecord"))
    # the uninterrupted run goes alongside the killed ones: its graph compilation overlaps theirs
    reference = start_full_run(train_args(synthetic_coco, result.reference_mindrecord, result.reference_out),
                               base / "reference.log")
    try:
        later = rng.sample([["step"], ["checkpoint", "log rewrite"]], 2)
        kinds = ["conversion"] + later[0] + later[1]
        for number, kind in enumerate(kinds, start=1):
            killed_run(result, synthetic_coco, number, kind, 1 < number <= len(later[0]) + 1, rng)
    finally:
        finish_full_run(reference, base / "reference.log")
    assert resumed_step(result.soak_out) > 0, f"no checkpoint to resume from; {result.context()}"
    final_args = train_args(synthetic_coco, result.soak_mindrecord, result.soak_out) + ["--resume", "auto"]
    finish_full_run(start_full_run(final_args, base / "final.log"), base / "final.log")
    print("\n".join(result.kills), flush=True)
    return result


def last_loss_line_per_step(output_dir):
    lines = open(os.path.join(output_dir, "loss_0.log"), encoding="utf-8").read().splitlines()
    matches = [RECIPE_LINE.match(line) for line in lines]
    assert all(matches), [line for line, match in zip(lines, matches) if not match]
    return {(int(m.group(1)), int(m.group(2))): m.group(0) for m in matches}


def last_metrics_per_step(output_dir):
    with open(os.path.join(output_dir, "metrics.jsonl"), encoding="utf-8") as rows:
        return {row["global_step"]: {k: row[k] for k in ("epoch", "step", "lr", *LOSS_NAMES)}
                for row in map(json.loads, rows)}


def all_files(directory):
    return sorted(os.path.relpath(os.path.join(folder, name), directory)
                  for folder, dirs, names in os.walk(directory) for name in names + [d + "/" for d in dirs])


def test_killed_and_resumed_run_ends_with_the_same_checkpoints(soak):
    names = sorted(os.listdir(os.path.join(soak.reference_out, "checkpoint")))
    assert names == sorted(f"maskrcnn-{(s - 1) // STEPS_PER_EPOCH + 1}_{(s - 1) % STEPS_PER_EPOCH + 1}.ckpt"
                           for s in SAVED_STEPS)
    assert sorted(os.listdir(os.path.join(soak.soak_out, "checkpoint"))) == names, soak.context()
    for name in names:                         # every parameter, optimizer moment and the training state
        with open(os.path.join(soak.reference_out, "checkpoint", name), "rb") as expected, \
                open(os.path.join(soak.soak_out, "checkpoint", name), "rb") as actual:
            assert actual.read() == expected.read(), f"{name} differs; {soak.context()}"
    summaries = [json.load(open(os.path.join(out, "train_summary_0.json"), encoding="utf-8"))
                 for out in (soak.reference_out, soak.soak_out)]
    assert summaries[1]["global_step"] == LAST_STEP
    assert summaries[1]["parameter_sha256"] == summaries[0]["parameter_sha256"], soak.context()


def test_killed_and_resumed_run_logs_the_same_losses(soak):
    expected = last_loss_line_per_step(soak.reference_out)
    assert len(expected) == LAST_STEP
    assert last_loss_line_per_step(soak.soak_out) == expected, soak.context()
    assert last_metrics_per_step(soak.soak_out) == last_metrics_per_step(soak.reference_out), soak.context()


def test_killed_and_resumed_run_leaves_no_stray_files(soak):
    for out, mindrecord in ((soak.soak_out, soak.soak_mindrecord), (soak.reference_out, soak.reference_mindrecord)):
        for path in all_files(out) + all_files(mindrecord):
            assert ".partial" not in path and not path.endswith(".tmp"), f"{path} left; {soak.context()}"
    assert all_files(soak.soak_out) == all_files(soak.reference_out), soak.context()
    assert all_files(soak.soak_mindrecord) == all_files(soak.reference_mindrecord), soak.context()


def test_logs_have_no_duplicate_steps_after_resume(soak):
    lines = open(os.path.join(soak.soak_out, "loss_0.log"), encoding="utf-8").read().splitlines()
    assert len(lines) == len(set(RECIPE_LINE.match(line).group(1, 2) for line in lines)) == LAST_STEP, \
        soak.context()
    with open(os.path.join(soak.soak_out, "metrics.jsonl"), encoding="utf-8") as rows:
        steps = [json.loads(row)["global_step"] for row in rows]
    assert steps == list(range(1, LAST_STEP + 1)), soak.context()
