"""Atomic writes (src/atomic_io.py)."""
import json
import os

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
