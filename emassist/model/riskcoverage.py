"""The risk–coverage curve of the test split: a PNG and its plot data (``risk_coverage.csv`` for ``dvc plots``).

Each point accepts the test images whose calibrated confidence is at or above a threshold (and that are familiar);
coverage is the share accepted, selective accuracy the accuracy of those. The review threshold chosen on val is
marked, with the target accuracy.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from emassist.model.reports import _save_png, _write_csv
from emassist.model.selective import risk_coverage

RISK_COVERAGE_CSV = "risk_coverage.csv"
RISK_COVERAGE_PNG = "risk_coverage.png"


def risk_coverage_frame(proba: np.ndarray, labels: np.ndarray, accept: np.ndarray | None = None) -> pd.DataFrame:
    """``threshold``, ``coverage``, ``selective_accuracy``, ``risk``: one row per distinct confidence."""
    return pd.DataFrame(risk_coverage(proba, labels, accept))


def risk_coverage_figure(
    frame: pd.DataFrame, *, threshold: float | None, target_accuracy: float, point: tuple[float, float] | None
) -> Figure:
    fig = Figure(figsize=(6.0, 4.5), layout="constrained")
    ax = fig.subplots()
    ax.plot(frame["coverage"], frame["selective_accuracy"], label="test (calibrated, familiar images)")
    ax.axhline(target_accuracy, linestyle="--", color="grey", linewidth=1, label=f"target {target_accuracy:g}")
    if point is not None and threshold is not None:
        ax.plot([point[0]], [point[1]], "o", color="C3",
                label=f"review threshold {threshold:.3f}: {point[0]:.1%} at {point[1]:.3f}")  # fmt: skip
    ax.set_xlim(0, 1.0)
    low = float(np.nanmin(frame["selective_accuracy"])) if len(frame) else 0.0
    ax.set_ylim(max(0.0, min(low, target_accuracy) - 0.02), 1.005)
    ax.set_xlabel("coverage (share of images answered without review)")
    ax.set_ylabel("selective accuracy (accuracy of those)")
    title = "Risk–coverage on test"
    if threshold is None:
        title += " (target not reached on val: everything flagged)"
    ax.set_title(title)
    ax.legend(loc="lower left")
    return fig


def write_risk_coverage(
    out_dir: Path,
    proba: np.ndarray,
    labels: np.ndarray,
    *,
    threshold: float | None,
    target_accuracy: float,
    accept: np.ndarray | None = None,
    point: tuple[float, float] | None = None,
) -> dict[str, Path]:
    """Write ``risk_coverage.csv`` and ``risk_coverage.png`` into ``out_dir``; returns ``{name: path}``.

    ``point``: (coverage, selective accuracy) at the review threshold, marked on the curve.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    frame = risk_coverage_frame(proba, labels, accept)
    csv_path = out_dir / RISK_COVERAGE_CSV
    _write_csv(frame, csv_path, float_format="%.6f")
    fig = risk_coverage_figure(frame, threshold=threshold, target_accuracy=target_accuracy, point=point)
    png_path = _save_png(fig, out_dir / RISK_COVERAGE_PNG)
    return {"risk_coverage": csv_path, "risk_coverage_plot": png_path}
