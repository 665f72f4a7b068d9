"""Shared fixtures: the tiny config, and one small synthetic COCO set + its MindRecord for the whole session."""
import os
from dataclasses import dataclass
from typing import List

import mindspore as ms
import pytest

from src.config import Config, load_config
from src.synthetic import make_synthetic_coco

SYNTHETIC_TRAIN_IMAGES = 8
SYNTHETIC_VAL_IMAGES = 4
SYNTHETIC_SEED = 0
SYNTHETIC_SIZE_RANGE = (100, 260)


# scripts/run_tests.sh runs the suite on two pytest-xdist workers (--dist loadgroup): each test file is one unit
# of work, so its module fixtures are built once; files sharing an expensive session fixture form one unit.
SHARED_FIXTURE_GROUPS = {
    "test_scripts": "launches", "test_train": "launches",                     # launch_fixtures.py
    "test_eval": "narrow_inference", "test_export": "narrow_inference",      # narrow_eval, narrow_mindir
    "test_postprocess": "narrow_inference",
}
# The longest units start first so that the two workers end together (durations under `--durations`).
LONGEST_FIRST = ("launches", "test_compile_cache", "test_demo", "test_train_soak", "test_mask_rcnn_r50",
                 "narrow_inference", "test_torchvision_weights", "test_torchvision_preset", "test_amp")


def pytest_collection_modifyitems(config, items):
    def group(item):
        module = os.path.splitext(os.path.basename(str(item.fspath)))[0]
        return SHARED_FIXTURE_GROUPS.get(module, module)

    for item in items:
        item.add_marker(pytest.mark.xdist_group(group(item)))
    rank = {name: index for index, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(group(item), len(rank)))       # stable: file order kept otherwise


@dataclass
class TinyMindRecord:
    """The synthetic set converted with the tiny config: shard files per split and the config used."""
    train_files: List[str]
    val_files: List[str]
    cfg: Config


@pytest.fixture(scope="session", autouse=True)
def graph_mode():
    """Every test compiles cells as static graphs on the CPU, as training and inference do."""
    ms.set_context(mode=ms.GRAPH_MODE)
    ms.set_device("CPU")


@pytest.fixture(scope="session", autouse=True)
def private_compile_cache(tmp_path_factory):
    """The scripts run by the tests (and their subprocesses) keep compiled graphs in the session's own
    directory, not in the user's cache."""
    from src.compile_cache import DIR_ENV

    previous = os.environ.get(DIR_ENV)
    os.environ[DIR_ENV] = str(tmp_path_factory.mktemp("compile_cache"))
    yield
    if previous is None:
        os.environ.pop(DIR_ENV, None)
    else:
        os.environ[DIR_ENV] = previous


@pytest.fixture(scope="module")
def tiny() -> Config:
    """The tiny preset, shared by the tests of one module."""
    return load_config("tiny")


@pytest.fixture
def tiny_cfg() -> Config:
    return load_config("tiny")


@pytest.fixture(scope="session")
def synthetic_coco(tmp_path_factory) -> str:
    """Root of a synthetic COCO 2017 set: 8 train + 4 val images of 100..260 px, seed 0."""
    root = str(tmp_path_factory.mktemp("synthetic_coco"))
    return make_synthetic_coco(root, SYNTHETIC_TRAIN_IMAGES, SYNTHETIC_VAL_IMAGES, SYNTHETIC_SEED,
                               *SYNTHETIC_SIZE_RANGE)


@pytest.fixture(scope="session")
def tiny_mindrecord(synthetic_coco, tmp_path_factory) -> TinyMindRecord:
    """The synthetic set as MindRecord (tiny config); `cfg.data` points at both directories."""
    from src.dataset import data_to_mindrecord

    cfg = load_config("tiny", {"data.coco_root": synthetic_coco,
                               "data.mindrecord_dir": str(tmp_path_factory.mktemp("mindrecord"))})
    train_files = data_to_mindrecord(cfg, is_training=True)
    val_files = data_to_mindrecord(cfg, is_training=False)
    assert all(os.path.isfile(f) for f in train_files + val_files)
    return TinyMindRecord(train_files, val_files, cfg)
