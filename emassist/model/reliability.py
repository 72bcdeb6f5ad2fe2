"""The reliability diagram of the test split, before and after temperature scaling: a PNG and the plot data
(``reliability.csv``, one row per confidence bin and curve, for ``dvc plots``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from emassist.model.calibration import DEFAULT_BINS, apply_temperature, ece, reliability_table
from emassist.model.reports import _save_png, _write_csv

RELIABILITY_CSV = "reliability.csv"
RELIABILITY_PNG = "reliability_diagram.png"


def reliability_frame(
    proba: np.ndarray, labels: np.ndarray, temperature: float, bins: int = DEFAULT_BINS
) -> pd.DataFrame:
    """``curve`` (uncalibrated / calibrated), bin bounds and centre, ``count``, ``accuracy``, ``confidence``."""
    frames = []
    for curve, p in (("uncalibrated", proba), ("calibrated", apply_temperature(proba, temperature))):
        frame = pd.DataFrame(reliability_table(p, labels, bins))
        frame.insert(0, "curve", curve)
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def reliability_figure(frame: pd.DataFrame, *, temperature: float, eces: dict[str, float]) -> Figure:
    fig = Figure(figsize=(6.0, 5.0), layout="constrained")
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="perfect calibration")
    for curve, marker in (("uncalibrated", "o"), ("calibrated", "s")):
        rows = frame[(frame["curve"] == curve) & (frame["count"] > 0)]
        ax.plot(
            rows["confidence"], rows["accuracy"], marker=marker,
            label=f"{curve} (ECE {eces.get(curve, float('nan')):.3f})",
        )  # fmt: skip
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("mean confidence in bin")
    ax.set_ylabel("accuracy in bin")
    ax.set_title(f"Reliability on test (temperature {temperature:.3f})")
    ax.legend(loc="upper left")
    return fig


def write_reliability(
    out_dir: Path, proba: np.ndarray, labels: np.ndarray, temperature: float, bins: int = DEFAULT_BINS
) -> dict[str, Path]:
    """Write ``reliability.csv`` and ``reliability_diagram.png`` into ``out_dir``; returns ``{name: path}``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    frame = reliability_frame(proba, labels, temperature, bins)
    eces: dict[str, Any] = {
        "uncalibrated": ece(proba, labels, bins),
        "calibrated": ece(apply_temperature(proba, temperature), labels, bins),
    }
    csv_path = out_dir / RELIABILITY_CSV
    _write_csv(frame, csv_path, float_format="%.6f")
    png_path = _save_png(reliability_figure(frame, temperature=temperature, eces=eces), out_dir / RELIABILITY_PNG)
    return {"reliability": csv_path, "reliability_diagram": png_path}
