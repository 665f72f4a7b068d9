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
