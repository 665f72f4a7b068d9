"""Plot the training losses of a run from its metrics.jsonl (one JSON object per logged step).

    python -m src.loss_curve OUTPUT_DIR/metrics.jsonl OUTPUT_DIR/loss_curve.png

One panel per loss name (all of LOSS_NAMES found in the file), raw values plus a moving average, and the
learning rate on its own panel, all over the global step. Matplotlib's Agg backend: no display needed.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
from typing import Dict, List, Sequence

import numpy as np

if not __package__:                 # run as a file: python src/loss_curve.py
    import _file_run  # noqa: F401

from src import atomic_io

LR_KEY = "lr"
STEP_KEY = "global_step"
PANEL_COLUMNS = 3
PANEL_SIZE = (4.0, 2.6)             # inches per panel
SMOOTHING_FRACTION = 0.05           # moving-average window as a fraction of the logged rows
DPI = 100


def read_metrics(path: str) -> List[dict]:
    """Rows of a metrics.jsonl file; a bad line is an error naming the file and line."""
    rows = []
    with open(path, "r", encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not valid JSON ({err.msg})") from None
            if not isinstance(row, dict) or STEP_KEY not in row:
                raise ValueError(f"{path}:{number}: expected an object with '{STEP_KEY}'")
            rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no logged steps to plot")
    return rows


def loss_series(rows: Sequence[dict], loss_names: Sequence[str]) -> Dict[str, np.ndarray]:
    """{name: (N,) values} for the loss names present in the rows, plus 'global_step' and 'lr'."""
    rows = sorted({row[STEP_KEY]: row for row in rows}.values(), key=lambda row: row[STEP_KEY])  # resumed runs
    names = [STEP_KEY] + [name for name in loss_names if name in rows[0]] + [LR_KEY]
    return {name: np.array([float(row.get(name, math.nan)) for row in rows]) for name in names}


def moving_average(values: np.ndarray) -> np.ndarray:
    """Trailing mean over a window of SMOOTHING_FRACTION of the series (at least 1 row)."""
    window = max(1, int(len(values) * SMOOTHING_FRACTION))
    cumulative = np.cumsum(np.insert(values, 0, 0.0))
    counts = np.minimum(np.arange(1, len(values) + 1), window)
    return (cumulative[1:] - cumulative[np.arange(1, len(values) + 1) - counts]) / counts


def plot_loss_curve(metrics_path: str, png_path: str, loss_names: Sequence[str], title: str = "") -> str:
    """Write the PNG (atomically) and return its path."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = loss_series(read_metrics(metrics_path), loss_names)
    steps = series.pop(STEP_KEY)
    panels = list(series)
    rows = -(-len(panels) // PANEL_COLUMNS)
    figure, axes = plt.subplots(rows, PANEL_COLUMNS, figsize=(PANEL_SIZE[0] * PANEL_COLUMNS, PANEL_SIZE[1] * rows),
                                squeeze=False)
    for axis, name in zip(axes.ravel(), panels):
        values = series[name]
        if name == LR_KEY:
            axis.plot(steps, values, color="tab:green")
        else:
            axis.plot(steps, values, color="tab:blue", alpha=0.35, linewidth=0.8, label="per step")
            axis.plot(steps, moving_average(values), color="tab:blue", linewidth=1.6, label="moving average")
        axis.set_title(name)
        axis.set_xlabel("global step")
        axis.grid(alpha=0.3)
    for axis in axes.ravel()[len(panels):]:
        axis.set_visible(False)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    buffer = _png_bytes(figure)
    plt.close(figure)
    atomic_io.write_bytes(png_path, buffer)
    return png_path


def _png_bytes(figure) -> bytes:
    out = io.BytesIO()
    figure.savefig(out, format="png", dpi=DPI)
    return out.getvalue()


def main(argv=None) -> None:
    from src.maskrcnn.mask_rcnn_r50 import LOSS_NAMES

    parser = argparse.ArgumentParser(description="Plot the losses of metrics.jsonl to a PNG.")
    parser.add_argument("metrics", help="metrics.jsonl written by train.py")
    parser.add_argument("png", nargs="?", help="output PNG (default: loss_curve.png next to the metrics)")
    args = parser.parse_args(argv)
    png = args.png or os.path.join(os.path.dirname(args.metrics), "loss_curve.png")
    print(f"wrote {plot_loss_curve(args.metrics, png, LOSS_NAMES)}")


if __name__ == "__main__":
    main()
