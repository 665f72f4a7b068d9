"""demo.py end to end (2 training steps, the narrow model at 64x96) and its parts: options, schedule sizing,
calibration timing and the loss-curve plot.

The end-to-end run checks that every promised output exists and is valid, not accuracy (2 steps).
"""
import json
import math
import os
import subprocess
import sys
import time

import cv2
import numpy as np
import pytest

import demo
from inference_helpers import NARROW_OVERRIDES
from src.config import load_config
from src.loss_curve import loss_series, moving_average, plot_loss_curve, read_metrics
from src.lr_schedule import dynamic_lr
from src.maskrcnn.mask_rcnn_r50 import LOSS_NAMES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
E2E_STEPS = 2
E2E_IMAGES = 8
E2E_VAL_IMAGES = 4
E2E_SIZE = (64, 96)


def narrow_cli():
    args = []
    for key, value in NARROW_OVERRIDES.items():
        args += [f"--{key}", json.dumps(value) if isinstance(value, list) else str(value)]
    return args


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """One demo.py run in a child process: (output dir, stdout)."""
    out = str(tmp_path_factory.mktemp("demo") / "out")
    argv = [sys.executable, "demo.py", "--steps", str(E2E_STEPS), "--images", str(E2E_IMAGES), "--val_images",
            str(E2E_VAL_IMAGES), "--size", "x".join(map(str, E2E_SIZE)), "--out", out] + narrow_cli()
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, GLOG_v="3"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out, done.stdout


def _json(path):
    with open(path, "r", encoding="utf-8") as handle:
        return json.load(handle)


def _image(path):
    picture = cv2.imread(path, cv2.IMREAD_COLOR)
    assert picture is not None, f"{path} does not decode"
    return picture


def test_demo_training_outputs(demo_run):
    out, _ = demo_run
    with open(os.path.join(out, "loss_0.log")) as log:
        lines = log.read().splitlines()
    assert len(lines) == E2E_STEPS and all(f"{name}:" in lines[0] for name in LOSS_NAMES)
    rows = read_metrics(os.path.join(out, "metrics.jsonl"))
    assert [row["global_step"] for row in rows] == list(range(1, E2E_STEPS + 1))
    assert all(math.isfinite(row[name]) for row in rows for name in LOSS_NAMES)
    curve = _image(os.path.join(out, "loss_curve.png"))
    assert curve.shape[0] > 100 and curve.shape[1] > 100 and curve.std() > 0


def test_demo_checkpoint_loads_into_the_model(demo_run):
    from src.checkpoint import find_checkpoints, load_model_weights
    from src.maskrcnn.mask_rcnn_r50 import MaskRcnnResnet50

    out, _ = demo_run
    found = find_checkpoints(os.path.join(out, "checkpoint"))
    assert [os.path.basename(p) for p in found] == [f"maskrcnn-1_{E2E_STEPS}.ckpt"]
    cfg = load_config("demo", {**NARROW_OVERRIDES, "data.img_height": E2E_SIZE[0], "data.img_width": E2E_SIZE[1]})
    net = MaskRcnnResnet50(cfg)
    before = net.rcnn_cls.trainable_params()[0].asnumpy().copy()
    load_model_weights(found[0], net)                  # strict: every name and shape must match
    assert not np.array_equal(before, net.rcnn_cls.trainable_params()[0].asnumpy())


def test_demo_eval_export_predict_outputs(demo_run):
    import mindspore as ms

    out, stdout = demo_run
    metrics = _json(os.path.join(out, "eval", "eval_metrics.json"))
    for iou_type in ("bbox", "segm"):
        assert all(0.0 <= metrics[iou_type][name] <= 1.0 for name in ("AP", "AP50", "AP75", "AR100"))
    assert isinstance(_json(os.path.join(out, "eval", "detections.json")), list)
    with open(os.path.join(out, "eval", demo.COCO_SUMMARY_TEXT)) as text:
        summary = text.read()
    assert summary.startswith("bbox:") and "segm:" in summary and summary.count("Average Precision") == 12

    graph = ms.load(os.path.join(out, "maskrcnn.mindir"))
    assert graph is not None

    records = _json(os.path.join(out, "predictions", "predictions.json"))
    assert len(records) == demo.PREDICT_IMAGES
    for record in records:
        picture = _image(record["picture"])
        assert picture.shape[:2] == (record["height"], record["width"])

    summary = _json(os.path.join(out, demo.SUMMARY_FILE))
    assert summary["steps"] == E2E_STEPS
    assert summary["bbox_AP"] == metrics["bbox"]["AP"] and summary["segm_AP"] == metrics["segm"]["AP"]
    last = stdout.strip().splitlines()[-3:]
    assert out in last[0] and last[-1].startswith("bbox AP ") and "segm AP" in last[-1]


@pytest.mark.parametrize("argv, message", [
    (["--minutes", "-1"], "--minutes: must be > 0"),
    (["--minutes", "soon"], "expected a float"),
    (["--images", "0"], "--images: must be > 0"),
    (["--size", "128by192"], "expected HEIGHTxWIDTH"),
    (["--size", "100x192"], "multiples of 32"),
    (["--images", "1"], "at least one batch"),
    (["--train.base_lr", "-1"], "train.base_lr"),
    (["--no_such_key", "1"], "no_such_key"),
])
def test_bad_options_fail_clearly(argv, message, capsys):
    with pytest.raises(SystemExit) as stop:
        demo.parse_args(argv)
    assert stop.value.code == 2 and message in capsys.readouterr().err


def test_an_out_under_a_file_is_one_line_before_any_work(tmp_path, capsys):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file")
    assert demo.main(["--out", str(blocker / "demo")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"ERROR: --out '{blocker / 'demo'}' lies under the file '{blocker}', not a directory; choose a directory path"]


def test_run_demo_script_reports_bad_options():
    done = subprocess.run(["bash", "scripts/run_demo.sh", "--size", "7"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 2 and "expected HEIGHTxWIDTH" in done.stderr


def test_options_reach_every_stage_config(tmp_path):
    args, overrides, cfg = demo.parse_args(["--size", "96x160", "--out", str(tmp_path), "--train.base_lr", "0.01"])
    assert (cfg.data.img_height, cfg.data.img_width, cfg.train.base_lr) == (96, 160, 0.01)
    assert cfg.data.coco_root == os.path.join(str(tmp_path), "synthetic_coco")
    cli = demo.config_args(overrides)
    assert cli[:2] == ["--config", "demo"] and cli[cli.index("--data.img_width") + 1] == "160"


def test_a_segment_stopped_at_its_deadline_ends_training_inside_the_budget(tmp_path, monkeypatch):
    """Fake training processes: the first budget-sized segment stops early, as train.py does at --deadline."""
    args, overrides, cfg = demo.parse_args(["--minutes", "30", "--out", str(tmp_path)])
    os.makedirs(tmp_path / "checkpoint")
    open(tmp_path / "checkpoint" / "maskrcnn-1_6.ckpt", "wb").close()
    calls = []

    def fake_child(stage, argv, capture=None):
        stop, deadline = int(argv[argv.index("--max_steps") + 1]), float(argv[argv.index("--deadline") + 1])
        calls.append((stop, deadline))
        reached = stop if len(calls) == 1 else stop // 2                # calibration runs through
        with open(tmp_path / "train_summary_0.json", "w", encoding="utf-8") as handle:
            json.dump({"global_step": reached, "final_losses": {}}, handle)

    monkeypatch.setattr(demo, "run_child", fake_child)
    monkeypatch.setattr(demo, "segment_timing", lambda metrics, after: (30.0, 2.0))
    monkeypatch.setattr("src.dataset.load_manifest", lambda cfg, is_training: {"records": 400})
    started, facts = time.time(), {}
    demo.train(args, overrides, cfg, started, facts)
    assert len(calls) == 2 and len(facts["schedule_plans"]) == 1        # no segment after the early stop
    (_, no_deadline), (stop, deadline) = calls
    assert no_deadline == 0.0 and facts["steps"] == stop // 2
    reserve = demo.after_training_seconds(30.0, 2.0 * demo.STEP_TIME_MARGIN, args.val_images)
    assert deadline == pytest.approx(started + 30 * 60.0 - reserve, abs=0.1) and reserve > 0


def test_synthetic_set_is_reused_only_from_the_same_generator(tmp_path, monkeypatch):
    args, _, cfg = demo.parse_args(["--images", "2", "--val_images", "1", "--size", "64x96", "--out", str(tmp_path)])
    annotations = os.path.join(cfg.data.coco_root, "annotations", "instances_train2017.json")
    demo.make_dataset(args, cfg)
    first = os.stat(annotations).st_mtime_ns
    demo.make_dataset(args, cfg)
    assert os.stat(annotations).st_mtime_ns == first                      # same options and code: reused
    monkeypatch.setattr("src.synthetic.generator_fingerprint", lambda: "edited generator")
    demo.make_dataset(args, cfg)
    assert os.stat(annotations).st_mtime_ns != first                      # older generator's set: made again


@pytest.mark.parametrize("total_steps, warmup", [(20, 50), (300, 30), (1000, 50)])
def test_schedule_spans_exactly_the_sized_run(total_steps, warmup):
    steps_per_epoch = 200
    keys = demo.schedule_overrides(total_steps, steps_per_epoch, warmup)
    train = load_config("demo", keys).train
    rates = dynamic_lr(train)
    assert len(rates) == total_steps                                     # the whole table is used
    assert train.epoch_size * steps_per_epoch >= total_steps
    assert train.warmup_step <= total_steps // demo.MIN_WARMUP_FRACTION
    decay = rates[train.warmup_step:]
    assert np.all(np.diff(decay) <= 0) and rates[-1] < 0.1 * train.base_lr < decay[0]


def test_steps_for_budget_keeps_the_reserve():
    step, compile_s, val = 2.0, 40.0, 50
    one_start = 100 * step + compile_s * (1 + demo.INFERENCE_COMPILES * demo.INFERENCE_COMPILE_RATIO) \
        + val * step * demo.EVAL_IMAGE_STEP_RATIO + (1 + demo.INFERENCE_COMPILES) * demo.PROCESS_OVERHEAD_S
    assert demo.steps_for_budget(one_start, compile_s, step, val, 1) == 100
    assert demo.steps_for_budget(one_start, compile_s, step, val, 2) < 100           # one more compile
    assert demo.steps_for_budget(one_start, compile_s, 2 * step, val, 1) < 50
    assert demo.steps_for_budget(10.0, compile_s, step, val, 1) == 0


def test_segment_timing_excludes_compile(tmp_path):
    path = tmp_path / "metrics.jsonl"

    def log(first_step, times_ms):
        with open(path, "a") as out:
            out.writelines(json.dumps({"global_step": first_step + i, "step_time_ms": t}) + "\n"
                           for i, t in enumerate(times_ms))

    log(1, [60000.0, 2000.0, 2500.0, 1500.0, 9000.0])      # calibration: compile step, then one outlier
    compile_s, step_s = demo.segment_timing(str(path), 0)
    assert step_s == pytest.approx(2.25) and compile_s == pytest.approx(60.0 - 2.25)
    log(6, [30000.0, 4000.0, 4000.0])                        # the resumed process
    assert demo.segment_timing(str(path), 5) == (pytest.approx(26.0), pytest.approx(4.0))
    with pytest.raises(demo.DemoError, match="need 2"):
        demo.segment_timing(str(path), 7)


def _metrics_file(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_loss_curve_plots_every_loss(tmp_path):
    rows = [{"global_step": s, "lr": 0.01, **{name: 3.0 / s + i for i, name in enumerate(LOSS_NAMES)}}
            for s in range(1, 41)]
    png = plot_loss_curve(_metrics_file(tmp_path / "metrics.jsonl", rows), str(tmp_path / "curve.png"), LOSS_NAMES)
    picture = _image(png)
    assert picture.shape[0] > 200 and picture.std() > 0
    series = loss_series(rows[::-1] + rows[:3], LOSS_NAMES)            # unordered, repeated steps (resume)
    assert list(series["global_step"]) == list(range(1, 41)) and set(LOSS_NAMES) < set(series)


def test_loss_curve_errors_name_file_and_line(tmp_path):
    bad = tmp_path / "metrics.jsonl"
    bad.write_text(json.dumps({"global_step": 1, "total_loss": 1.0}) + "\n{oops\n")
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not valid JSON"):
        read_metrics(str(bad))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="no logged steps"):
        read_metrics(str(empty))


def test_moving_average_is_a_trailing_mean():
    values = np.arange(40, dtype=np.float64)                           # window = 2 rows
    smooth = moving_average(values)
    assert smooth[0] == 0.0 and np.allclose(smooth[1:], values[1:] - 0.5)
