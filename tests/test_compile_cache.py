"""src/compile_cache.py: the key, the staging/publish protocol, and predict.py with a cold, warm, re-weighted
and re-configured cache giving the outputs of an uncached run.

The two racing cold predict runs (cold_runs) are also the cold step of the cold/warm test, which continues on
their cache: one compile fewer than a cold run of its own."""
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from inference_helpers import MODEL_SEED, ROOT, config_cli_args, val_paths
from src import compile_cache
from src.config import load_config

pytest_plugins = ["inference_fixtures"]


REAL_ENTRY_CHECK = compile_cache._entry_script_readable


@pytest.fixture
def fresh_state(monkeypatch, tmp_path):
    """A process that has not used the cache yet, with its root in tmp_path and no MindSpore cache variables
    left behind."""
    monkeypatch.setattr(compile_cache, "_state", {"staging": None, "entry": None, "active": False, "used": False})
    # as in a run of train.py / predict.py: an xdist worker's own entry is `python -c`, which turns the cache off
    monkeypatch.setattr(compile_cache, "_entry_script_readable", lambda: True)
    monkeypatch.setenv(compile_cache.DIR_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(compile_cache.SWITCH_ENV, raising=False)
    for name in (compile_cache.MS_ENABLE_ENV, compile_cache.MS_PATH_ENV):
        monkeypatch.delenv(name, raising=False)
    yield tmp_path / "cache"
    for name in (compile_cache.MS_ENABLE_ENV, compile_cache.MS_PATH_ENV):
        os.environ.pop(name, None)


def test_key_follows_config_purpose_device_and_kernels(monkeypatch):
    cfg = load_config("tiny")
    key = compile_cache.cache_key(cfg, "CPU", "predict")
    assert compile_cache.cache_key(load_config("tiny"), "CPU", "predict") == key
    assert compile_cache.cache_key(load_config("tiny", {"test.test_max_per_img": 5}), "CPU", "predict") != key
    assert compile_cache.cache_key(cfg, "CPU", "eval") != key
    assert compile_cache.cache_key(cfg, "GPU", "predict") != key
    monkeypatch.setenv("MASKRCNN_CPU_KERNELS", "mindspore")          # the graph then holds MindSpore's ops
    assert compile_cache.cache_key(cfg, "CPU", "predict") != key


def test_cold_run_stages_then_publishes_and_ends_caching(fresh_state):
    staging = compile_cache.enable(load_config("tiny"), "CPU", "predict")
    assert staging.parent == fresh_state and compile_cache.STAGING_MARK in staging.name
    assert os.environ[compile_cache.MS_PATH_ENV] == str(staging) and os.environ[compile_cache.MS_ENABLE_ENV] == "1"
    (staging / "graph").write_text("compiled")
    compile_cache.publish()
    entries = os.listdir(fresh_state)
    assert len(entries) == 1 and entries[0].startswith("predict-") and compile_cache.STAGING_MARK not in entries[0]
    assert (fresh_state / entries[0] / "graph").read_text() == "compiled"
    assert compile_cache.MS_ENABLE_ENV not in os.environ and compile_cache.MS_PATH_ENV not in os.environ
    assert compile_cache.enable(load_config("tiny"), "CPU", "eval") is None      # once per process


def test_warm_run_reads_the_entry_and_a_losing_racer_drops_its_copy(fresh_state, monkeypatch):
    cfg = load_config("tiny")
    staging = compile_cache.enable(cfg, "CPU", "predict")
    (staging / "graph").write_text("racer")
    entry = fresh_state / f"predict-{compile_cache.cache_key(cfg, 'CPU', 'predict')}"
    entry.mkdir()
    (entry / "graph").write_text("winner")                 # a concurrent run published first
    compile_cache.publish()
    assert os.listdir(fresh_state) == [entry.name] and (entry / "graph").read_text() == "winner"
    monkeypatch.setattr(compile_cache, "_state", {"staging": None, "entry": None, "active": False, "used": False})
    assert compile_cache.enable(cfg, "CPU", "predict") == entry


def test_switches(fresh_state, monkeypatch):
    monkeypatch.setenv(compile_cache.SWITCH_ENV, "0")
    assert compile_cache.enable(load_config("tiny"), "CPU", "predict") is None
    monkeypatch.delenv(compile_cache.SWITCH_ENV)
    monkeypatch.setenv(compile_cache.MS_ENABLE_ENV, "1")                 # the user's own MindSpore settings
    monkeypatch.setenv(compile_cache.MS_PATH_ENV, "/somewhere/else")
    assert compile_cache.enable(load_config("tiny"), "CPU", "predict") is None
    assert os.environ[compile_cache.MS_PATH_ENV] == "/somewhere/else" and not fresh_state.exists()


def test_off_when_the_entry_is_no_script_file(fresh_state, monkeypatch):
    """`python -c ...` (argv[0] '-c'): MindSpore's cache would open '-c' for its dependency scan and fail."""
    from mindspore.graph import api

    monkeypatch.setattr(compile_cache, "_entry_script_readable", REAL_ENTRY_CHECK)
    monkeypatch.setattr(api, "entry_script_path", os.path.realpath("-c"))     # what MindSpore records for -c
    assert compile_cache.enable(load_config("tiny"), "CPU", "train") is None
    assert compile_cache.MS_ENABLE_ENV not in os.environ and not fresh_state.exists()


def test_compiling_apart_points_the_run_at_the_entry_its_child_published(fresh_state, monkeypatch):
    monkeypatch.delenv(compile_cache.APART_SWITCH_ENV, raising=False)
    staging = compile_cache.enable(load_config("tiny"), "CPU", "train-3")
    entry = compile_cache._state["entry"]
    # the child sees the switch, not this process's staging directory, and publishes the entry
    child = ("import os, sys; assert os.environ['MASKRCNN_COMPILE_ONLY'] == '1'; "
             "assert 'MS_COMPILER_CACHE_PATH' not in os.environ; os.makedirs(sys.argv[1])")
    assert compile_cache.compile_apart((sys.executable, "-c", child, str(entry)))
    assert os.environ[compile_cache.MS_PATH_ENV] == str(entry) and not staging.exists()
    compile_cache.publish()                                  # nothing left to rename
    assert os.listdir(fresh_state) == [entry.name]
    assert not compile_cache.compile_apart((sys.executable, "-c", "raise SystemExit(1)"))    # warm: no child


def test_a_failed_child_leaves_the_run_compiling_itself(fresh_state, monkeypatch, capsys):
    monkeypatch.delenv(compile_cache.APART_SWITCH_ENV, raising=False)
    staging = compile_cache.enable(load_config("tiny"), "CPU", "train-3")
    assert not compile_cache.compile_apart((sys.executable, "-c", "import sys; sys.exit('no graph today')"))
    assert "compiling apart failed (exit code 1: no graph today); compiling in this process" in capsys.readouterr().err
    assert os.environ[compile_cache.MS_PATH_ENV] == str(staging) and staging.is_dir()
    compile_cache.publish()
    assert [path.name for path in fresh_state.iterdir()] == [compile_cache._state["entry"].name]


def test_compiling_apart_switched_off_or_inside_the_child(fresh_state, monkeypatch, tmp_path):
    marker = tmp_path / "child_ran"
    child = (sys.executable, "-c", f"open({str(marker)!r}, 'w')")
    monkeypatch.setenv(compile_cache.APART_SWITCH_ENV, "0")
    staging = compile_cache.enable(load_config("tiny"), "CPU", "train-3")
    assert not compile_cache.compile_apart(child)
    monkeypatch.delenv(compile_cache.APART_SWITCH_ENV)
    monkeypatch.setenv(compile_cache.COMPILE_ONLY_ENV, "1")
    assert compile_cache.compile_only() and not compile_cache.compile_apart(child)
    assert not compile_cache.compile_apart(())                # no command (train() called in-process)
    assert not marker.exists() and os.environ[compile_cache.MS_PATH_ENV] == str(staging)


def _cache_env(cache_dir, cache=True):
    env = dict(os.environ, GLOG_v="3", **{compile_cache.DIR_ENV: str(cache_dir),
                                          compile_cache.SWITCH_ENV: "1" if cache else "0"})
    for name in (compile_cache.MS_ENABLE_ENV, compile_cache.MS_PATH_ENV):
        env.pop(name, None)
    return env


def _predict_command(checkpoint, image, out, extra):
    return [sys.executable, os.path.join(ROOT, "predict.py"), image, "--checkpoint_path", checkpoint,
            "--out", str(out), "--score_thr", "0", *extra]


def _detections(out):
    with open(os.path.join(out, "predictions.json"), encoding="utf-8") as handle:
        return [record["detections"] for record in json.load(handle)]


def _predict(checkpoint, image, out, cache_dir, extra=(), cache=True):
    run = subprocess.run(_predict_command(checkpoint, image, out, extra), cwd=ROOT, env=_cache_env(cache_dir, cache),
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return _detections(out)


@pytest.fixture(scope="module")
def other_weights(narrow_model, tmp_path_factory):
    """The narrow model with other random weights."""
    import mindspore as ms
    from src.maskrcnn.mask_rcnn_r50 import MaskRcnnResnet50

    ms.set_seed(MODEL_SEED + 1)
    path = str(tmp_path_factory.mktemp("other_weights") / "other.ckpt")
    ms.save_checkpoint(MaskRcnnResnet50(narrow_model.cfg), path)
    return path


@dataclass
class ColdRuns:
    """Two predict.py runs started together on an empty cache: their detections and the entries they left."""
    cache: Path
    image: str
    detections: list
    entries: list


@pytest.fixture(scope="module")
def cold_runs(narrow_model, tmp_path_factory) -> ColdRuns:
    """Racing cold runs (both compile; one publishes); the cold/warm test then continues on their cache."""
    data_path, _ = val_paths(narrow_model.cfg)
    image = os.path.join(data_path, sorted(os.listdir(data_path))[0])
    base = tmp_path_factory.mktemp("cold_runs")
    cache = base / "cache"
    runs = [subprocess.Popen(_predict_command(narrow_model.checkpoint, image, base / f"out{i}",
                                              config_cli_args(narrow_model.cfg)),
                             cwd=ROOT, env=_cache_env(cache), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for i in range(2)]
    for run in runs:
        _, stderr = run.communicate(timeout=600)
        assert run.returncode == 0, stderr[-3000:]
    return ColdRuns(cache, image, [_detections(base / f"out{i}") for i in range(2)], sorted(os.listdir(cache)))


@pytest.mark.slow
def test_concurrent_cold_runs_leave_one_entry(cold_runs):
    assert cold_runs.detections[0] == cold_runs.detections[1]
    assert len(cold_runs.entries) == 1 and compile_cache.STAGING_MARK not in cold_runs.entries[0]


@pytest.mark.slow
def test_predict_with_cold_warm_reweighted_and_reconfigured_cache(narrow_model, other_weights, cold_runs, tmp_path):
    """Continues on the cache of the cold runs (cold_runs)."""
    image, cache = cold_runs.image, cold_runs.cache
    args = config_cli_args(narrow_model.cfg)

    cold, entries = cold_runs.detections[0], cold_runs.entries
    assert len(entries) == 1 and compile_cache.STAGING_MARK not in entries[0]
    graph_files = sorted((cache / entries[0]).rglob("*.mindir"))
    assert graph_files
    stamps = [path.stat().st_mtime_ns for path in graph_files]
    assert sum(len(d) for d in cold) > 0

    assert _predict(narrow_model.checkpoint, image, tmp_path / "warm", cache, args) == cold
    assert sorted(os.listdir(cache)) == entries and [path.stat().st_mtime_ns for path in graph_files] == stamps

    # weights are not part of the cached graph
    reweighted = _predict(other_weights, image, tmp_path / "rw", cache, args)
    assert reweighted != cold
    assert reweighted == _predict(other_weights, image, tmp_path / "rw_ref", cache, args, cache=False)

    # another config bakes other constants into the graph: its own entry, its own outputs
    fewer = args + ["--test.test_max_per_img", "3"]
    reconfigured = _predict(narrow_model.checkpoint, image, tmp_path / "rc", cache, fewer)
    assert len(os.listdir(cache)) == 2
    assert reconfigured != cold
    assert reconfigured == _predict(narrow_model.checkpoint, image, tmp_path / "rc_ref", cache, fewer, cache=False)


def _train(tiny_mindrecord, out, cache_dir, max_steps, cache=True, apart=True, said=None):
    env = _cache_env(cache_dir, cache)
    env[compile_cache.APART_SWITCH_ENV] = "1" if apart else "0"
    run = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *config_cli_args(tiny_mindrecord.cfg),
                          "--output_dir", str(out), "--max_steps", str(max_steps), "--save_checkpoint", "False"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    if said is not None:
        said.append(run.stdout)
    with open(os.path.join(out, "train_summary_0.json"), encoding="utf-8") as handle:
        summary = json.load(handle)
    return summary["final_losses"], summary["parameter_sha256"]


@pytest.mark.slow
def test_training_with_cold_warm_and_rescheduled_cache(tiny_mindrecord, tmp_path):
    """The cold run compiles its graph apart (a child process publishes the entry, which the run then loads)
    and trains exactly as a run that compiles in its own process; the child writes nothing to the output dir."""
    cache = tmp_path / "cache"
    said = []
    cold = _train(tiny_mindrecord, tmp_path / "cold", cache, 2, said=said)
    entries = os.listdir(cache)
    assert len(entries) == 1 and entries[0].startswith("train-")
    assert "compiled the graph apart" in said[0] and said[0].count("done: 2 steps") == 1
    in_process = _train(tiny_mindrecord, tmp_path / "in_process", tmp_path / "cache_in_process", 2, apart=False,
                        said=said)
    assert in_process == cold and "compiled the graph apart" not in said[1]
    assert sorted(os.listdir(tmp_path / "cold")) == sorted(os.listdir(tmp_path / "in_process"))
    assert _train(tiny_mindrecord, tmp_path / "warm", cache, 2, said=said) == cold
    assert "compiled the graph apart" not in said[2]
    assert os.listdir(cache) == entries
    # a schedule of another length is another lr parameter shape: its own entry
    shorter = _train(tiny_mindrecord, tmp_path / "short", cache, 1)
    assert len(os.listdir(cache)) == 2
    assert shorter != cold and shorter == _train(tiny_mindrecord, tmp_path / "short_ref", cache, 1, cache=False)
