"""Session fixtures for the launch-script tests of test_scripts.py and test_train.py: a pytest plugin (test
modules load it with `pytest_plugins = ["launch_fixtures"]`), so each real-model launch runs once and serves
every test that reads its outputs. The model is the narrow one of inference_helpers.py.
"""
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from inference_helpers import config_cli_args
from launch_helpers import PARALLEL_STEPS, SCRIPTS, STANDALONE_STEPS, dash, free_port, make_checkout


@dataclass
class Launch:
    run: subprocess.CompletedProcess
    out: Path                            # the output folder the script chose


@pytest.fixture(scope="session")
def standalone_launch(tiny_mindrecord, tmp_path_factory) -> Launch:
    """`cd scripts && sh run_standalone_train.sh none -- ...` in a fresh checkout: the narrow model trained
    STANDALONE_STEPS steps on the automatically chosen device, a checkpoint after every step."""
    repo = make_checkout(tmp_path_factory.mktemp("standalone") / "repo")
    extra = config_cli_args(tiny_mindrecord.cfg) + ["--max_steps", str(STANDALONE_STEPS),
                                                    "--save_checkpoint_steps", "1"]
    run = subprocess.run([dash(), "run_standalone_train.sh", "none", "--", *extra], cwd=repo / "scripts",
                         capture_output=True, text=True, timeout=1200, env=dict(os.environ, GLOG_v="3"))
    return Launch(run, repo / "scripts" / "train")


@pytest.fixture(scope="session")
def two_worker_launch(tiny_mindrecord, tmp_path_factory) -> Launch:
    """run_distribute_train.sh --workers 2 on CPU (msrun on one host), output folder and port from the
    environment: the narrow model trained PARALLEL_STEPS steps, a checkpoint after every step."""
    out = tmp_path_factory.mktemp("two_workers") / "parallel"
    env = dict(os.environ, GLOG_v="3", TRAIN_OUTPUT_DIR=str(out), MASTER_PORT=str(free_port()), DEVICE_TARGET="CPU")
    extra = config_cli_args(tiny_mindrecord.cfg) + ["--max_steps", str(PARALLEL_STEPS), "--save_checkpoint_steps", "1"]
    run = subprocess.run(["bash", os.path.join(SCRIPTS, "run_distribute_train.sh"), "--workers", "2", "none", "--",
                          *extra], env=env, capture_output=True, text=True, timeout=1500)
    return Launch(run, out)
