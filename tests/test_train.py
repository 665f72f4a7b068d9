"""The training run (src/training.py) and its command line train.py, on the synthetic set (tiny config).

Most tests drive the real loop (data, schedule, logs, checkpoints, resume) with the small contract network
of contract_net.py; the command-line tests check what train.py adds (options, path checks, error exits).
The tests marked `slow` run the real MaskRcnnResnet50 graph in its narrow test width
(inference_helpers.NARROW_OVERRIDES, because full width is too slow for the suite): resume equality, and
two msrun workers on CPU.
"""
import json
import os
import re
import shutil
import subprocess
import time

import numpy as np
import pytest

from src.checkpoint import find_checkpoints, load_resume_point
from src.config import load_config, parse_overrides
from src.lr_schedule import dynamic_lr
from src.maskrcnn.mask_rcnn_r50 import LOSS_NAMES
from src.training import RunOptions, train as run_training

import train
from contract_net import RECIPE_LINE, ContractNet
from inference_helpers import config_cli_args

pytest_plugins = ["launch_fixtures"]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS_PER_EPOCH = 4                 # 8 synthetic training images, batch 2
RESUME_RTOL = 1e-6                  # CPU, fixed seeds: the resumed losses equal the uninterrupted ones


def data_args(tiny_mindrecord, *extra):
    d = tiny_mindrecord.cfg.data
    return ["--config", "tiny", "--coco_root", d.coco_root, "--mindrecord_dir", d.mindrecord_dir, *map(str, extra)]


def run_args(tiny_mindrecord, output_dir, *extra):
    return data_args(tiny_mindrecord, "--output_dir", output_dir, *extra)


def contract_model(cfg):
    return ContractNet()


def training_run(tiny_mindrecord, output_dir, *overrides, build_model=contract_model, **options):
    """src.training.train on the tiny synthetic set; `overrides` are config `--key value` pairs."""
    d = tiny_mindrecord.cfg.data
    cfg = load_config("tiny", parse_overrides(["--coco_root", d.coco_root, "--mindrecord_dir", d.mindrecord_dir,
                                               *map(str, overrides)]))
    return run_training(RunOptions(output_dir=str(output_dir), **options), cfg, build_model)


def metrics(output_dir):
    with open(os.path.join(output_dir, "metrics.jsonl")) as rows:
        return {row["global_step"]: row for row in map(json.loads, rows)}


def summary(output_dir, rank=0):
    with open(os.path.join(output_dir, f"train_summary_{rank}.json")) as handle:
        return json.load(handle)


def checkpoint_names(output_dir):
    return [os.path.basename(p) for p in find_checkpoints(os.path.join(output_dir, "checkpoint"))]


def resume_from(source_dir, checkpoint_name, target_dir):
    """A fresh output dir whose only checkpoint is `checkpoint_name` of `source_dir` (a run killed after it)."""
    os.makedirs(os.path.join(target_dir, "checkpoint"))
    shutil.copy(os.path.join(source_dir, "checkpoint", checkpoint_name), os.path.join(target_dir, "checkpoint"))


def run_script(name, *args, cwd=None):
    return subprocess.run(["bash", os.path.join(ROOT, "scripts", name), *map(str, args)], capture_output=True,
                          text=True, timeout=900, cwd=cwd)


@pytest.fixture(scope="module")
def full_run(tiny_mindrecord, tmp_path_factory):
    """Two epochs of the contract network, a checkpoint after every step."""
    out = tmp_path_factory.mktemp("full_run")
    code = training_run(tiny_mindrecord, out, "--epoch_size", 2, "--save_checkpoint_steps", 1,
                        "--keep_checkpoint_max", 20)
    assert code == 0
    return str(out)


def test_full_run_logs_every_step_in_the_recipe_format(full_run, tiny_mindrecord):
    lines = open(os.path.join(full_run, "loss_0.log")).read().splitlines()
    positions = [RECIPE_LINE.match(line).group(1, 2) for line in lines]
    assert positions == [(str(e), str(s)) for e in (1, 2) for s in range(1, STEPS_PER_EPOCH + 1)]
    rows = metrics(full_run)
    assert sorted(rows) == list(range(1, 2 * STEPS_PER_EPOCH + 1))
    cfg = load_config("tiny")
    expected_lr = dynamic_lr(cfg.train, 1, 0, 2 * STEPS_PER_EPOCH)
    np.testing.assert_allclose([rows[g]["lr"] for g in sorted(rows)], expected_lr, rtol=1e-6)
    assert all(set(LOSS_NAMES) <= set(row) and row["step_time_ms"] > 0 for row in rows.values())
    assert checkpoint_names(full_run) == [f"maskrcnn-{e}_{s}.ckpt" for e in (1, 2) for s in range(1, 5)]
    done = summary(full_run)
    assert done["global_step"] == 8 and done["steps_this_run"] == 8


@pytest.mark.parametrize("checkpoint, first_resumed", [("maskrcnn-1_4.ckpt", 5), ("maskrcnn-2_1.ckpt", 6)])
def test_resume_continues_exactly_where_the_run_stopped(full_run, tiny_mindrecord, tmp_path, checkpoint,
                                                        first_resumed):
    resume_from(full_run, checkpoint, tmp_path)
    assert training_run(tiny_mindrecord, tmp_path, "--epoch_size", 2, resume="auto") == 0
    uninterrupted, resumed = metrics(full_run), metrics(tmp_path)
    assert sorted(resumed) == list(range(first_resumed, 9))
    for step in resumed:                 # same data batch, sampling seed, lr, weights and momentum
        for key in LOSS_NAMES + ("lr",):
            assert resumed[step][key] == pytest.approx(uninterrupted[step][key], rel=RESUME_RTOL), (step, key)
    assert summary(tmp_path)["parameter_sha256"] == summary(full_run)["parameter_sha256"]
    assert summary(tmp_path)["steps_this_run"] == 9 - first_resumed


def test_resume_cuts_the_logs_back_to_the_checkpoint_so_each_step_is_logged_once(full_run, tiny_mindrecord,
                                                                                  tmp_path, capsys):
    resume_from(full_run, "maskrcnn-1_4.ckpt", tmp_path)         # killed during step 7, last checkpoint step 4
    for name in ("loss_0.log", "metrics.jsonl"):
        lines = open(os.path.join(full_run, name)).read().splitlines(keepends=True)
        (tmp_path / name).write_text("".join(lines[:6]) + lines[6][:12])      # with the torn line of step 7
    assert training_run(tiny_mindrecord, tmp_path, "--epoch_size", 2, resume="auto") == 0
    positions = [RECIPE_LINE.match(line).group(1, 2) for line in open(tmp_path / "loss_0.log").read().splitlines()]
    assert positions == [(str(e), str(s)) for e in (1, 2) for s in range(1, STEPS_PER_EPOCH + 1)]
    assert [json.loads(row)["global_step"] for row in open(tmp_path / "metrics.jsonl")] == list(range(1, 9))
    assert "dropped 3 lines logged after global step 4" in capsys.readouterr().out


def test_max_steps_stops_and_saves_and_a_finished_run_has_nothing_to_do(tiny_mindrecord, tmp_path, capsys):
    assert training_run(tiny_mindrecord, tmp_path, "--keep_checkpoint_max", 1, max_steps=3) == 0
    assert checkpoint_names(tmp_path) == ["maskrcnn-1_3.ckpt"]
    point = load_resume_point(os.path.join(tmp_path, "checkpoint", "maskrcnn-1_3.ckpt"), STEPS_PER_EPOCH)
    assert point.state.global_step == 3 and point.state.next_position() == (0, 3)
    assert training_run(tiny_mindrecord, tmp_path, "--keep_checkpoint_max", 1, max_steps=3, resume="auto") == 0
    assert "nothing to do: 3 steps done" in capsys.readouterr().out


def test_deadline_stops_and_saves_before_a_step_that_would_end_after_it(tiny_mindrecord, tmp_path, capsys):
    passed = time.time() - 1.0                           # every step would end after it: stop after the first
    assert training_run(tiny_mindrecord, tmp_path, deadline=passed) == 0
    out = capsys.readouterr().out
    assert checkpoint_names(tmp_path) == ["maskrcnn-1_1.ckpt"]
    far = time.time() + 3600.0
    assert training_run(tiny_mindrecord, tmp_path / "far", deadline=far) == 0
    all_steps = summary(tmp_path / "far")["global_step"]
    assert all_steps > 1 and f"deadline reached: stopping at global step 1 of {all_steps}" in out


def test_nan_stops_the_run_naming_the_step_and_keeps_the_last_good_checkpoint(tiny_mindrecord, tmp_path, capsys):
    def poisoned(cfg):
        return ContractNet(nan_at_step=2)            # the counter is 2 during global step 3
    code = train.main(run_args(tiny_mindrecord, tmp_path, "--save_checkpoint_steps", 1), build_model=poisoned)
    assert code == train.EXIT_TRAINING_ERROR
    err = capsys.readouterr().err
    assert "non-finite loss at epoch 1 step 3 (global step 3)" in err
    assert "last good checkpoint: " in err and "maskrcnn-1_2.ckpt" in err
    assert checkpoint_names(tmp_path) == ["maskrcnn-1_1.ckpt", "maskrcnn-1_2.ckpt"]
    load_resume_point(os.path.join(tmp_path, "checkpoint", "maskrcnn-1_2.ckpt"), STEPS_PER_EPOCH)
    assert len(open(os.path.join(tmp_path, "loss_0.log")).read().splitlines()) == 2
    assert not os.path.exists(os.path.join(tmp_path, "train_summary_0.json"))


@pytest.mark.parametrize("override, key", [(["--train.base_lr", "-1"], "train.base_lr"),
                                           (["--keep_checkpoint_max", "0"], "train.keep_checkpoint_max"),
                                           (["--img_width", "100"], "data.img_width"),
                                           (["--max_steps", "-2"], "--max_steps"),
                                           (["--deadline", "-1"], "--deadline"),
                                           (["--run_distribute", "--deadline", "1"], "--deadline")])
def test_bad_values_are_rejected_before_any_data_is_touched(tmp_path, capsys, override, key):
    mindrecord = tmp_path / "mindrecord"
    with pytest.raises(SystemExit) as info:
        train.main(["--config", "tiny", "--coco_root", str(tmp_path / "nowhere"), "--mindrecord_dir", str(mindrecord),
                    "--output_dir", str(tmp_path / "out"), *override])
    assert info.value.code == 2
    assert key in capsys.readouterr().err
    assert not mindrecord.exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("option", ["--output_dir", "--mindrecord_dir", "--save_checkpoint_path"])
@pytest.mark.parametrize("under", [False, True])
def test_an_output_path_that_is_a_file_is_one_line_before_any_work(tmp_path, capsys, option, under):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file")
    bad = blocker / "sub" if under else blocker
    mindrecord, out = tmp_path / "mindrecord", tmp_path / "out"
    code = train.main(["--config", "tiny", "--coco_root", str(tmp_path / "nowhere"), "--mindrecord_dir", str(mindrecord),
                       "--output_dir", str(out), option, str(bad)], build_model=contract_model)
    assert code == train.EXIT_BAD_PATH
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"'{bad}'" in err[0]
    assert (f"lies under the file '{blocker}'" if under else "is a file, not a directory") in err[0]
    assert not mindrecord.exists() and not out.exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_an_output_dir_that_is_not_writable_is_one_line(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    code = train.main(["--config", "tiny", "--coco_root", str(tmp_path / "nowhere"), "--output_dir",
                       str(locked / "out")], build_model=contract_model)
    assert code == train.EXIT_BAD_PATH and "is not writable" in capsys.readouterr().err


def test_script_options_set_config_keys():
    args, cfg = train.parse_args(["--config", "tiny", "--seed", "7", "--dataset", "other", "--coco_root", "/c",
                                  "--mindrecord_dir", "/m", "--device_target", "CPU", "--base_lr", "0.5"])
    assert (cfg.train.seed, cfg.data.dataset, cfg.data.coco_root, cfg.data.mindrecord_dir) == (7, "other", "/c", "/m")
    assert cfg.train.base_lr == 0.5 and args.run_distribute is False
    assert train.parse_args(["--run_distribute=True"])[0].run_distribute is True


@pytest.mark.parametrize("content, message", [(b"\x0a\x05trunc", "truncated"), (b"plain text", "truncated")])
def test_damaged_resume_checkpoint_is_a_clear_error(tiny_mindrecord, tmp_path, capsys, content, message):
    bad = tmp_path / "maskrcnn-1_2.ckpt"
    bad.write_bytes(content)
    code = train.main(run_args(tiny_mindrecord, tmp_path / "out", "--resume", bad), build_model=contract_model)
    assert code == train.EXIT_TRAINING_ERROR
    err = capsys.readouterr().err
    assert str(bad) in err and message in err


def test_resume_auto_without_checkpoints_starts_fresh(full_run, tiny_mindrecord, tmp_path, capsys):
    for name in ("loss_0.log", "metrics.jsonl"):              # a run killed during step 3, before its first save
        (tmp_path / name).write_text("".join(open(os.path.join(full_run, name)).readlines()[:2]))
    assert training_run(tiny_mindrecord, tmp_path, resume="auto", max_steps=1) == 0
    out = capsys.readouterr().out
    assert "no checkpoint in" in out and "dropped 2 lines logged after global step 0" in out
    assert summary(tmp_path)["global_step"] == 1
    assert [RECIPE_LINE.match(line).group(1, 2) for line in open(tmp_path / "loss_0.log")] == [("1", "1")]
    assert [json.loads(row)["global_step"] for row in open(tmp_path / "metrics.jsonl")] == [1]


# ---------------------------------------------------------------- the real model (slow)

@pytest.fixture(scope="module")
def script_run(standalone_launch):
    """The real (narrow) model trained STANDALONE_STEPS steps by `cd scripts && sh run_standalone_train.sh`, a
    checkpoint after every step (launch_fixtures.py: the same launch serves test_scripts.py)."""
    run = standalone_launch.run
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return standalone_launch.out


@pytest.mark.slow
def test_standalone_script_trains_with_logs_under_train(script_run):
    log = (script_run / "log").read_text()
    assert re.search(r"MaskRcnnResnet50: [\d.]+M parameters, [\d.]+M trainable, input 128x192", log)
    assert "done: 3 steps" in log
    assert [RECIPE_LINE.match(line).group(2) for line in (script_run / "loss_0.log").read_text().splitlines()] \
        == ["1", "2", "3"]
    assert checkpoint_names(script_run) == ["maskrcnn-1_2.ckpt", "maskrcnn-1_3.ckpt"]    # keep_checkpoint_max 2


@pytest.mark.slow
def test_real_model_resume_matches_the_uninterrupted_run(script_run, tiny_mindrecord, tmp_path):
    resume_from(str(script_run), "maskrcnn-1_2.ckpt", str(tmp_path))
    narrow = config_cli_args(tiny_mindrecord.cfg)
    assert train.main(narrow + ["--output_dir", str(tmp_path), "--max_steps", "3", "--resume", "auto"]) == 0
    uninterrupted, after_resume = metrics(script_run), metrics(tmp_path)
    assert sorted(after_resume) == [3]
    for key in LOSS_NAMES:
        assert after_resume[3][key] == pytest.approx(uninterrupted[3][key], rel=RESUME_RTOL), key
    assert summary(tmp_path)["parameter_sha256"] == summary(script_run)["parameter_sha256"]


@pytest.mark.slow
def test_two_msrun_workers_train_in_sync_on_different_shards(two_worker_launch):
    """Output folder and master port from TRAIN_OUTPUT_DIR and MASTER_PORT (launch_fixtures.py: the same launch
    is test_scripts.py's reference for two hosts)."""
    result, out = two_worker_launch.run, two_worker_launch.out
    logs = {rank: open(out / "msrun_log" / f"worker_{rank}.log").read() for rank in (0, 1)}
    assert result.returncode == 0, result.stderr[-3000:] + logs[0][-3000:] + logs[1][-3000:]
    ranks = [summary(out, rank) for rank in (0, 1)]
    assert [r["group_size"] for r in ranks] == [2, 2] and [r["global_step"] for r in ranks] == [2, 2]
    assert ranks[0]["parameter_sha256"] == ranks[1]["parameter_sha256"]
    # same initial weights and sampling seed: a different first loss means a different shard of images
    first = [RECIPE_LINE.match(open(out / f"loss_{rank}.log").readline()).group(3, 4, 5, 6) for rank in (0, 1)]
    assert first[0] != first[1]
    assert checkpoint_names(out) == ["maskrcnn-1_1.ckpt", "maskrcnn-1_2.ckpt"]
    assert "saved " in logs[0] and "saved " not in logs[1]


# ---------------------------------------------------------------- launch scripts (argument checks)

@pytest.mark.parametrize("args, code, message", [
    (["a", "CPU", "extra"], 2, "usage:"),
    (["none", "TPU"], 2, "DEVICE_TARGET must be CPU, GPU or Ascend, got 'TPU'"),
    (["/no/such/backbone.ckpt", "CPU"], 1, "PRETRAINED_CKPT '/no/such/backbone.ckpt' does not exist"),
])
def test_standalone_script_checks_its_arguments(tmp_path, args, code, message):
    result = run_script("run_standalone_train.sh", *args, cwd=tmp_path)
    assert result.returncode == code and message in result.stderr
    assert not (tmp_path / "train").exists()


def test_distribute_script_checks_its_arguments(tmp_path):
    result = run_script("run_distribute_train.sh", cwd=tmp_path)
    assert result.returncode == 2 and "usage:" in result.stderr and "--workers N" in result.stderr
    result = run_script("run_distribute_train.sh", "--workers", "0", cwd=tmp_path)
    assert result.returncode == 2 and "--workers needs a positive integer, got '0'" in result.stderr
    result = run_script("run_distribute_train.sh", tmp_path / "hccl_8p.json", cwd=tmp_path)
    assert result.returncode == 1 and f"RANK_TABLE_FILE '{tmp_path / 'hccl_8p.json'}' does not exist" in result.stderr
    result = run_script("run_distribute_train.sh", "--workers", "2", tmp_path / "r50.ckpt", cwd=tmp_path)
    assert result.returncode == 1 and "r50.ckpt' does not exist" in result.stderr


@pytest.mark.parametrize("table, message", [
    ("{not json", "is not an HCCL rank table"),
    (json.dumps({"server_list": [{"server_id": "10.255.0.1", "device": []},
                                 {"server_id": "10.255.0.2", "device": []}]}), "none of them is this host"),
])
def test_distribute_script_rejects_bad_rank_tables(tmp_path, table, message):
    path = tmp_path / "hccl.json"
    path.write_text(table)
    result = run_script("run_distribute_train.sh", path, cwd=tmp_path)
    assert result.returncode == 1 and message in result.stderr
    assert not list(tmp_path.glob("train_parallel*"))


def test_the_first_step_compiles_apart_and_gives_the_freed_heap_back_before_running(monkeypatch):
    """Compiling leaves freed heap behind that the step's memory pool never reuses (bench/memory_stages.py): the
    loop compiles on its first batch, releases that heap, then runs; later steps only run."""
    import mindspore as ms
    from types import SimpleNamespace

    from src import training
    from src.checkpoint import TrainingState

    events = []
    monkeypatch.setattr(training, "release_free_heap", lambda: events.append("release") or True)

    class Cell:
        def compile(self, *batch):
            events.append(f"compile {batch[0]}")

        def __call__(self, *batch):
            events.append(f"run {batch[0]}")
            return (ms.Tensor(1.0),), ms.Tensor(True)

    class Batches:
        def create_tuple_iterator(self, num_epochs):
            return iter([(1,), (2,), (3,)])

    train_cfg = SimpleNamespace(epoch_size=1, save_checkpoint_steps=0, save_checkpoint_epochs=1,
                                loss_scale_mode="fixed")
    monitor = SimpleNamespace(step=lambda *args: None, flush=lambda: None)
    loop = training.TrainingLoop(train_cfg, lambda epoch: Batches(), Cell(), None, None, np.zeros(3), monitor, None,
                                 ["total_loss"])
    loop.run(TrainingState(0, 0, 0, 3), last_step=3)
    assert events == ["compile 1", "release", "run 1", "run 2", "run 3"]
