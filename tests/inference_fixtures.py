"""Session fixtures for the end-to-end eval / export / offline-inference / predict tests: a pytest plugin
(test modules load it with `pytest_plugins = ["inference_fixtures"]`), so each artefact is built once.
The model and its config are described in inference_helpers.py.
"""
import json
import os
import time
from dataclasses import dataclass

import pytest

from inference_helpers import MODEL_SEED, ROOT, config_cli_args, narrow_config, run_python, val_paths
from src.config import Config


@dataclass
class NarrowModel:
    cfg: Config
    checkpoint: str


@pytest.fixture(scope="session")
def narrow_model(tiny_mindrecord, tmp_path_factory) -> NarrowModel:
    """A randomly initialised narrow model saved as a checkpoint (CPU, graph mode)."""
    import mindspore as ms
    from src.maskrcnn.mask_rcnn_r50 import MaskRcnnResnet50
    from src.inference import setup_context

    setup_context("CPU")
    cfg = narrow_config(tiny_mindrecord.cfg)
    ms.set_seed(MODEL_SEED)
    path = str(tmp_path_factory.mktemp("narrow_model") / "maskrcnn_narrow.ckpt")
    ms.save_checkpoint(MaskRcnnResnet50(cfg), path)
    return NarrowModel(cfg, path)


@dataclass
class EvalRun:
    output_dir: str
    stdout: str
    metrics: dict


@pytest.fixture(scope="session")
def narrow_eval(narrow_model, tmp_path_factory) -> EvalRun:
    """eval.py run from the command line on the synthetic val set with the narrow checkpoint."""
    out = str(tmp_path_factory.mktemp("eval"))
    _, ann_file = val_paths(narrow_model.cfg)
    run = run_python(os.path.join(ROOT, "eval.py"), "--checkpoint_path", narrow_model.checkpoint,
                     "--ann_file", ann_file, "--output_dir", out, *config_cli_args(narrow_model.cfg))
    assert run.returncode == 0, run.stderr[-3000:]
    with open(os.path.join(out, "eval_metrics.json"), encoding="utf-8") as handle:
        return EvalRun(out, run.stdout, json.load(handle))


@dataclass
class ExportedModel:
    path: str
    seconds: float


@pytest.fixture(scope="session")
def narrow_mindir(narrow_model, tmp_path_factory) -> ExportedModel:
    from export import export_model

    start = time.time()
    path = export_model(narrow_model.cfg, narrow_model.checkpoint, "MINDIR",
                        str(tmp_path_factory.mktemp("export") / "maskrcnn"), "CPU")
    return ExportedModel(path, time.time() - start)
