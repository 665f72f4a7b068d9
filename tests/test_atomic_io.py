"""Atomic writes (src/atomic_io.py)."""
import json
import os
import subprocess

import pytest

from src import atomic_io


def test_write_json_atomic_leaves_no_temp_file(tmp_path):
    path = tmp_path / "sub" / "out.json"
    atomic_io.write_json(str(path), {"a": [1, 2]})
    atomic_io.write_json(str(path), {"a": [3]})
    assert json.loads(path.read_text()) == {"a": [3]}
    assert os.listdir(path.parent) == ["out.json"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_staging_file(tmp_path):
    path = tmp_path / "model.ckpt"
    atomic_io.write_bytes(str(path), b"old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_io.staged_path(str(path), ".ckpt") as staging:
            assert staging.endswith(".ckpt") and atomic_io.PARTIAL_MARK in os.path.basename(staging)
            with open(staging, "wb") as out:
                out.write(b"half")
            raise KeyboardInterrupt
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["model.ckpt"]


def test_writing_a_file_removes_the_staging_files_its_killed_writers_left(tmp_path):
    """A writer killed with SIGKILL leaves its staging file; the next write of the same file removes it, but
    not the staging file of a live writer nor that of another file."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    live = subprocess.Popen(["sleep", "60"])
    path = tmp_path / "loss_0.log"
    mark = atomic_io.PARTIAL_MARK
    left = [f".loss_0.log{mark}-{dead.pid}-0", f".loss_0.log{mark}-{dead.pid}-1.tmp",
            f".loss_0.log{mark}-{os.getpid()}-999999"]                      # an earlier process with our pid
    kept = [f".loss_0.log{mark}-{live.pid}-0", f".metrics.jsonl{mark}-{dead.pid}-0"]
    try:
        for name in left + kept:
            (tmp_path / name).write_bytes(b"half")
        atomic_io.write_text(str(path), "epoch:1 step:1\n")
    finally:
        live.kill()
        live.wait()
    assert sorted(os.listdir(tmp_path)) == sorted(kept + ["loss_0.log"])
