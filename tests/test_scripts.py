"""scripts/*.sh as the ModelZoo documents them (`sh X.sh` from scripts/, where sh is dash), and every
documented Python entry point run both as a file and as a module.

dash is Debian's and Ubuntu's /bin/sh (an Essential package there, so present in CI); a machine without it
fails these tests rather than skipping them: install it with `apt-get install -y dash`.
"""
import json
import os
import re
import subprocess
import sys

import pytest

from inference_helpers import ROOT, config_cli_args
from launch_helpers import PARALLEL_STEPS, SCRIPTS, STANDALONE_STEPS, dash, free_port, make_checkout
from src.synthetic import make_synthetic_coco

pytest_plugins = ["launch_fixtures"]

OWN_SCRIPTS = sorted(name for name in os.listdir(SCRIPTS) if name.endswith(".sh") and name != "setup_env.sh")
FORMS = ("sh scripts/X.sh", "bash scripts/X.sh", "cd scripts && sh X.sh")


@pytest.fixture
def checkout(tmp_path):
    return make_checkout(tmp_path / "repo")


def run_form(form, repo, script, *args, cwd=None, env=None, timeout=600):
    """Run scripts/<script> of `repo` in one of the documented forms; `cwd` is the user's directory for the
    two `scripts/X.sh` forms (the third runs in scripts/)."""
    if form == "cd scripts && sh X.sh":
        argv, cwd = [dash(), script], os.path.join(repo, "scripts")
    else:
        shell = dash() if form.startswith("sh ") else "bash"
        argv = [shell, os.path.join("scripts", script)] if cwd is None else [shell, os.path.join(repo, "scripts", script)]
        cwd = cwd or repo
    return subprocess.run(argv + [str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, GLOG_v="3", **(env or {})))


# ---------------------------------------------------------------- argument checks, every script, every form

USAGE_CASES = {
    "docker_start.sh": ([], 1, "Usage: sh docker_start.sh IMAGE DATA_DIR MODEL_DIR"),
    "run_demo.sh": (["--size", "7"], 2, "expected HEIGHTxWIDTH"),
    "run_distribute_train.sh": ([], 2, "--workers N [--nodes M --node_rank R --master_addr ADDR"),
    "run_eval.sh": ([], 1, "Usage: sh run_eval.sh [VALIDATION_JSON_FILE] [CHECKPOINT_PATH]"),
    "run_infer_310.sh": (["a"], 1, "Usage: sh run_infer_310.sh [MINDIR_OR_AIR_PATH]"),
    "run_standalone_train.sh": (["none", "TPU"], 2, "DEVICE_TARGET must be CPU, GPU or Ascend, got 'TPU'"),
    "run_tests.sh": (["--version"], 0, "pytest"),
}


def test_every_script_has_a_case():
    assert sorted(USAGE_CASES) == OWN_SCRIPTS


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("script", sorted(USAGE_CASES))
def test_scripts_run_under_dash_in_every_documented_form(script, form, checkout):
    args, code, message = USAGE_CASES[script]
    result = run_form(form, checkout, script, *args)
    assert "Illegal option" not in result.stderr
    assert result.returncode == code and message in result.stdout + result.stderr, result.stderr[-2000:]


def test_setup_script_runs_under_dash():
    """scripts/setup_env.sh (what every other script calls first) under `sh`: with the venv and the kernels up
    to date it only checks them."""
    result = subprocess.run([dash(), os.path.join("scripts", "setup_env.sh")], cwd=ROOT, capture_output=True,
                            text=True, timeout=600, env=dict(os.environ, GLOG_v="3"))
    assert "Illegal option" not in result.stderr
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.parametrize("args, message", [
    (["--workers", "0"], "--workers needs a positive integer, got '0'"),
    (["--workers", "1", "--nodes", "2"], "--nodes 2 needs --master_addr"),
    (["--workers", "1", "--nodes", "2", "--node_rank", "2", "--master_addr", "h"], "--node_rank must be below"),
    (["--workers", "1", "--nodes", "2", "--node_rank", "-1", "--master_addr", "h"],
     "--node_rank needs a non-negative integer, got '-1'"),
    (["--workers", "1", "--master_port", "x"], "--master_port needs a positive integer, got 'x'"),
    (["no_table.json"], "RANK_TABLE_FILE 'no_table.json' does not exist"),
])
def test_distribute_script_checks_the_multi_node_options(args, message, checkout):
    result = run_form("sh scripts/X.sh", checkout, "run_distribute_train.sh", *args)
    assert result.returncode != 0 and message in result.stderr
    assert not (checkout / "train_parallel").exists()


# ---------------------------------------------------------------- the python each script runs, for real

def test_standalone_script_from_scripts_dir_writes_train_and_prints_device_and_paths(checkout):
    """`cd scripts && sh run_standalone_train.sh`: train.py really starts (and stops at the missing data);
    the log lands in scripts/train/, the device is chosen and printed, relative paths are the user's."""
    result = run_form("cd scripts && sh X.sh", checkout, "run_standalone_train.sh", "none", "--",
                      "--config", "tiny", "--coco_root", "no_data", "--mindrecord_dir", "no_records")
    log = (checkout / "scripts" / "train" / "log").read_text()
    assert result.returncode == 1 and "COCO annotation file not found" in log, log[-2000:]
    assert "device: CPU (auto: best available of Ascend, GPU, CPU)" in log
    scripts_dir = os.path.join(checkout, "scripts")
    assert f"paths: data.coco_root={scripts_dir}/no_data, data.mindrecord_dir={scripts_dir}/no_records" in log


def test_eval_script_runs_eval_py_with_outputs_in_eval(checkout, tmp_path):
    coco = make_synthetic_coco(str(tmp_path / "coco"), 1, 1, 0, 100, 120)
    ann = os.path.join(coco, "annotations", "instances_val2017.json")
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    user = tmp_path / "user"
    user.mkdir()
    result = run_form("sh scripts/X.sh", checkout, "run_eval.sh", ann, bad, "--config", "tiny", cwd=user)
    log = (user / "eval" / "eval.log").read_text()
    assert result.returncode == 1 and "bad.ckpt' cannot be read" in log, log[-2000:]
    assert "device: CPU (auto" in log and f"paths: data.coco_root={ROOT}/data/synthetic_coco" in log


def test_infer_310_script_preprocesses_under_dash(checkout, tmp_path):
    coco = make_synthetic_coco(str(tmp_path / "coco"), 1, 2, 0, 100, 120)
    model = tmp_path / "maskrcnn.mindir"
    model.write_bytes(b"not built here")
    (tmp_path / "no_lite").mkdir()
    result = run_form("sh scripts/X.sh", checkout, "run_infer_310.sh", model, os.path.join(coco, "val2017"),
                      os.path.join(coco, "annotations", "instances_val2017.json"), "0", "--config", "tiny",
                      cwd=tmp_path, env={"MINDSPORE_PATH": str(tmp_path / "no_lite"),
                                         "BUILD_DIR": str(tmp_path / "build"), "PYTHON": sys.executable})
    assert result.returncode == 1 and "[2/4] build the runner" in result.stdout, result.stderr[-2000:]
    assert len(os.listdir(tmp_path / "preprocess_result")) > 0


def two_server_table(path, first="10.255.0.1", second="10.255.0.2"):
    table = {"version": "1.0", "server_count": "2", "status": "completed", "server_list": [
        {"server_id": first, "device": [{"device_id": str(d), "device_ip": f"192.98.92.{d}", "rank_id": str(d)}
                                        for d in (0, 1)], "host_nic_ip": "reserve"},
        {"server_id": second, "device": [{"device_id": str(d), "device_ip": f"192.98.93.{d}", "rank_id": str(d + 2)}
                                         for d in (0, 1)], "host_nic_ip": "reserve"}]}
    path.write_text(json.dumps(table))
    return path


def test_rank_table_script_starts_only_this_servers_devices(checkout, tmp_path):
    """Server 1 of a two-server table: ranks 2 and 3 on its devices 0 and 1, RANK_SIZE 4. Without Ascend
    each train.py then stops, but the directories and log lines show which ranks this server started."""
    table = two_server_table(tmp_path / "rank_table.json")
    result = run_form("sh scripts/X.sh", checkout, "run_distribute_train.sh", table, "--", "--config", "tiny",
                      cwd=tmp_path, env={"SERVER_ID": "10.255.0.2"})
    assert "Ascend: 2 of 4 devices" in result.stdout, result.stderr
    assert sorted(p for p in os.listdir(tmp_path) if p.startswith("train_parallel")) == \
        ["train_parallel2", "train_parallel3"]
    assert result.returncode == 1 and "rank 2 failed" in result.stderr and "rank 3 failed" in result.stderr


# ---------------------------------------------------------------- python entry points: file and module

ENTRY_POINTS = ["train", "eval", "export", "predict", "preprocess", "postprocess", "demo",
                "src.config", "src.convert_checkpoint", "src.synthetic", "src.infer_files", "src.loss_curve",
                "src.rank_table"]


@pytest.mark.parametrize("form", ["file", "module"])
@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_entry_point_runs_as_file_and_as_module(entry, form, tmp_path):
    if form == "file":          # from another directory, as `python path/to/src/X.py` is run
        argv, cwd = [sys.executable, os.path.join(ROOT, *entry.split(".")) + ".py"], tmp_path
    else:
        argv, cwd = [sys.executable, "-m", entry], ROOT
    result = subprocess.run(argv + ["--help"], cwd=cwd, capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, GLOG_v="3"))
    assert result.returncode == 0 and re.match(r"usage: ", result.stdout), result.stderr[-2000:]


# ---------------------------------------------------------------- the real model through the script (slow)

@pytest.mark.slow
def test_standalone_script_trains_under_dash_from_scripts_dir(standalone_launch):
    """The real model through `cd scripts && sh run_standalone_train.sh` (the launch is shared with
    test_train.py's tests of its logs, checkpoints and resume)."""
    run, out = standalone_launch.run, standalone_launch.out
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert len((out / "loss_0.log").read_text().splitlines()) == STANDALONE_STEPS
    assert "device: CPU (auto" in (out / "log").read_text()


@pytest.mark.slow
def test_msrun_on_two_hosts_trains_as_two_workers_on_one(checkout, tiny_mindrecord, two_worker_launch, tmp_path):
    """Two "hosts" on the loopback (two msrun launches of one worker each, --nodes 2) give the losses of
    one launch of two workers: same ranks, same shards, same all-reduced gradients. The one launch is shared
    with test_train.py (it also saves checkpoints, which does not change the losses)."""
    single, one_host = two_worker_launch.run, two_worker_launch.out
    assert single.returncode == 0, single.stdout[-3000:] + single.stderr[-3000:]
    extra = ["--", *config_cli_args(tiny_mindrecord.cfg), "--max_steps", str(PARALLEL_STEPS),
             "--save_checkpoint", "false"]
    env = dict(os.environ, GLOG_v="3", DEVICE_TARGET="CPU")
    port = str(free_port())
    launches = []
    for node in (0, 1):
        host = tmp_path / f"host{node}"
        host.mkdir()
        launches.append(subprocess.Popen(
            [dash(), os.path.join(checkout, "scripts", "run_distribute_train.sh"), "--workers", "1", "--nodes", "2",
             "--node_rank", str(node), "--master_addr", "127.0.0.1", "--master_port", port, "none", *extra],
            cwd=host, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [launch.communicate(timeout=1500)[0] for launch in launches]
    assert [launch.returncode for launch in launches] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]

    for rank in (0, 1):
        together = (one_host / f"loss_{rank}.log").read_text()
        apart = (tmp_path / f"host{rank}" / "train_parallel" / f"loss_{rank}.log").read_text()
        assert len(together.splitlines()) == PARALLEL_STEPS and apart == together
        assert json.loads((tmp_path / f"host{rank}" / "train_parallel" / f"train_summary_{rank}.json")
                          .read_text())["group_size"] == 2
