"""src/ops/build.py and backend.py: the kernels are built by an explicit step, never on import; the constants
they share with Python come from src/ops/constants.py."""
import ctypes
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from src.ops import backend, constants
from src.ops.conv import Conv2d

ROOT = Path(__file__).resolve().parent.parent
# Records every subprocess the imports start, then prints them.
IMPORT_PROBE = """
import json, subprocess
calls = []
original = subprocess.Popen.__init__
def record(self, args, *rest, **kwargs):
    calls.append(args if isinstance(args, str) else [str(a) for a in args])
    original(self, args, *rest, **kwargs)
subprocess.Popen.__init__ = record
import src, src.config, src.maskrcnn, src.maskrcnn.mask_rcnn_r50, src.ops.build, src.ops.conv
print(json.dumps(calls))
"""


def _fake_tools(tmp_path):
    """A PATH whose g++ and pip leave a marker and fail, so any use of them shows."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("g++", "pip"):
        script = bin_dir / tool
        script.write_text(f"#!/bin/sh\ntouch {tmp_path}/{tool}.used\nexit 1\n")
        script.chmod(0o755)
    return dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", GLOG_v="3")


def test_importing_compiles_and_downloads_nothing(tmp_path):
    env = _fake_tools(tmp_path)
    env[backend.BUILD_DIR_ENV] = str(tmp_path / "build")
    result = subprocess.run([sys.executable, "-c", IMPORT_PROBE], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    calls = json.loads(result.stdout.strip().splitlines()[-1])
    assert not [call for call in calls if any(word in str(call) for word in ("pip", "g++", "gcc", "c++"))]
    assert not (tmp_path / "build").exists() and not list(tmp_path.glob("*.used"))


def test_the_library_is_built_here():
    """Built by scripts/setup_env.sh; without it every CPU run falls back to MindSpore's slower operators."""
    assert backend.library() is not None, "run: python -m src.ops.build"


def test_building_again_is_a_no_op(tmp_path):
    assert backend.library() is not None
    result = subprocess.run([sys.executable, "-m", "src.ops.build"], cwd=ROOT, env=_fake_tools(tmp_path),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout == "" and not list(tmp_path.glob("*.used"))


def test_a_failed_build_says_so_in_one_line_and_succeeds(tmp_path):
    env = _fake_tools(tmp_path)
    env[backend.BUILD_DIR_ENV] = str(tmp_path / "build")
    result = subprocess.run([sys.executable, "-m", "src.ops.build"], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("CPU kernels not built (")
    assert lines[0].endswith("MindSpore's operators will run")
    assert not list((tmp_path / "build").glob("*.so"))


def test_without_the_library_the_ops_run_mindspore_operators(monkeypatch, tmp_path):
    monkeypatch.setenv(backend.BUILD_DIR_ENV, str(tmp_path))
    monkeypatch.setitem(backend._state, "warned", False)
    with pytest.warns(UserWarning, match="python -m src.ops.build"):
        layer = Conv2d(16, 16, 3, pad_mode="pad", padding=1)
    assert layer.onednn is None


def test_the_library_has_an_entry_point_for_every_shared_constant():
    library = ctypes.CDLL(backend.library())
    for stride in constants.CONV_STRIDES:
        for pad in constants.CONV_PADDINGS:
            assert hasattr(library, f"ConvForwardS{stride}P{pad}") and hasattr(library, f"DeconvForwardS{stride}P{pad}")
    assert all(hasattr(library, f"RoiAlignForward{size}") for size in constants.ROI_ALIGN_SIZES)
    assert all(hasattr(library, f"MaskTargets{size}") for size in constants.MASK_TARGET_SIZES)
    assert not hasattr(library, "ConvForwardS3P1") and not hasattr(library, "RoiAlignForward8")
    header = constants.header_text()
    assert f"kRoiAlignLevels = {constants.ROI_ALIGN_LEVELS};" in header
    assert "kPosIou, kNegIou, kMinPosIou, kIouEps, kNowhere, kUnreachableIou, kMaxIouAssignSettings" in header
