"""Evaluation figures and report files: confusion-matrix and training-curve PNGs, the CSV/JSON reports.

Figures are drawn on a bare :class:`matplotlib.figure.Figure` (Agg renderer, no pyplot state, no display needed)
and every file is written atomically. The numbers come from :mod:`emassist.model.metrics`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib as mpl
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from emassist.core.atomic import atomic_open
from emassist.model.metrics import check_confusion, class_names, confusion, label_pair, most_confused_pairs, row_percent

CURVE_KEYS = ("accuracy", "val_accuracy", "loss", "val_loss")
PNG_DPI = 110


# ---------------------------------------------------------------------------------------------- figures


def _save_png(fig: Figure, path: Path | str) -> Path:
    path = Path(path)
    with atomic_open(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=PNG_DPI)
    return path


def _annotate(ax: Any, values: np.ndarray, texts: list[list[str]], fontsize: float, vmax: float) -> None:
    """Write ``texts`` into the cells: white on dark cells (above 55% of the colour scale), black elsewhere."""
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            v = values[i, j]
            dark = bool(np.isfinite(v) and v > 0.55 * vmax)
            ax.text(
                j, i, texts[i][j], ha="center", va="center", fontsize=fontsize,
                color="white" if dark else "black", fontweight="bold" if i == j else "normal",
            )  # fmt: skip


def confusion_figure(cm: np.ndarray, classes: Sequence[str], *, title: str | None = None) -> Figure:
    """Two panels side by side: counts and row-normalised %, each annotated and with a colourbar."""
    m, names = check_confusion(cm, classes)
    c = len(names)
    pct = row_percent(m)
    label_chars = max(len(n) for n in names)
    side = max(4.0, 0.62 * c + 1.0)  # inches per matrix
    margin = min(4.5, 0.085 * label_chars + 0.8)  # room for the y tick labels
    fig = Figure(figsize=(2 * (side + margin + 1.1), side + 0.8 * margin + 0.7), layout="constrained")
    axes = fig.subplots(1, 2)
    annotate = c <= 30
    fontsize = float(np.clip(13 - 0.3 * c, 6, 11))
    supports = m.sum(axis=1)

    panels = [
        ("Counts", m.astype(np.float64), "Blues", "images", [[f"{int(v)}" for v in row] for row in m]),
        (
            "Row-normalised (% of true class)",
            pct,
            "Oranges",
            "% of true class",
            [["n/a" if not np.isfinite(v) else f"{v:.0f}" if v == 0 or v >= 9.95 else f"{v:.1f}" for v in row]
             for row in pct],
        ),
    ]  # fmt: skip
    for ax, (panel_title, values, cmap_name, bar_label, texts) in zip(axes, panels, strict=True):
        cmap = mpl.colormaps[cmap_name].with_extremes(bad="#e0e0e0")
        vmax = 100.0 if values is pct else max(1.0, float(np.nanmax(values)) if values.size else 1.0)
        image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=0.0, vmax=vmax, aspect="equal")
        cbar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.03)
        cbar.set_label(bar_label)
        if annotate:
            _annotate(ax, values, texts, fontsize, vmax)
        ax.set_title(panel_title, fontsize=12, fontweight="bold")
        ax.set_xticks(range(c))
        ax.set_yticks(range(c))
        ax.set_xticklabels(names, rotation=40, ha="right", rotation_mode="anchor", fontsize=9)
        if values is pct:
            ax.set_yticklabels([f"{n} (n={int(s)})" for n, s in zip(names, supports, strict=True)], fontsize=9)
        else:
            ax.set_yticklabels(names, fontsize=9)
        ax.set_xlabel("Predicted class", fontsize=10)
        ax.set_ylabel("True class", fontsize=10)
        ax.set_xticks(np.arange(-0.5, c, 1), minor=True)
        ax.set_yticks(np.arange(-0.5, c, 1), minor=True)
        ax.grid(which="minor", color="white", linewidth=1.0)
        ax.tick_params(which="minor", length=0)
    total = int(m.sum())
    correct = int(np.trace(m))
    acc = f"accuracy {100.0 * correct / total:.1f}% ({correct}/{total})" if total else "no images"
    fig.suptitle(f"{title or 'Confusion matrix'} — {acc}", fontsize=13)
    return fig


def plot_confusion_matrix(cm: np.ndarray, classes: Sequence[str], path: Path | str) -> Path:
    """Write :func:`confusion_figure` as one PNG (atomically); returns ``path``."""
    return _save_png(confusion_figure(cm, classes), path)


def _boundaries(phase_boundaries: Sequence[int]) -> list[int]:
    out = []
    for b in phase_boundaries:
        if int(b) != b or b < 0:
            raise ValueError(f"phase boundaries must be non-negative epoch counts, got {list(phase_boundaries)}")
        out.append(int(b))
    return out


def training_curves_figure(history: Mapping[str, Sequence[float]], *, phase_boundaries: Sequence[int] = ()) -> Figure:
    """Accuracy and loss panels, train vs validation, epochs numbered from 1.

    ``phase_boundaries`` holds the number of epochs run before each later phase (what the training
    records): a boundary ``b`` draws a dashed line between epoch ``b`` and ``b + 1``, where
    fine-tuning starts. Keys missing from ``history`` are skipped.
    """
    bounds = _boundaries(phase_boundaries)
    fig = Figure(figsize=(13, 5), layout="constrained")
    axes = fig.subplots(1, 2)
    longest = max((len(history.get(k) or ()) for k in CURVE_KEYS), default=0)
    panels = [("Accuracy", "accuracy", "val_accuracy"), ("Loss", "loss", "val_loss")]
    for ax, (panel_title, train_key, val_key) in zip(axes, panels, strict=True):
        drawn = False
        for key, label, colour in ((train_key, "train", "tab:blue"), (val_key, "validation", "tab:orange")):
            values = history.get(key)
            if values is None or len(values) == 0:
                continue
            y = np.asarray([float(v) for v in values])
            x = np.arange(1, len(y) + 1)
            ax.plot(x, y, color=colour, label=label, linewidth=1.8, marker="o" if len(y) <= 40 else None,
                    markersize=3.5)  # fmt: skip
            drawn = True
        for n, b in enumerate(bounds):
            ax.axvline(b + 0.5, color="grey", linestyle="--", linewidth=1.2,
                       label="fine-tuning starts" if n == 0 else None)  # fmt: skip
        if not drawn:
            ax.text(0.5, 0.5, f"no {panel_title.lower()} recorded", transform=ax.transAxes, ha="center",
                    va="center", color="grey")  # fmt: skip
        ax.set_title(panel_title, fontsize=12, fontweight="bold")
        ax.set_xlabel("Epoch")
        ax.set_ylabel(panel_title.lower())
        if longest:
            ax.set_xlim(0.5, max(longest, *bounds, 1) + 0.5)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        ax.grid(True, alpha=0.3)
        if drawn or bounds:
            ax.legend(loc="best")
    fig.suptitle("Training curves", fontsize=13)
    return fig


def plot_training_curves(
    history: Mapping[str, Sequence[float]], path: Path | str, *, phase_boundaries: Sequence[int] = ()
) -> Path:
    """Write :func:`training_curves_figure` as one PNG (atomically); returns ``path``."""
    return _save_png(training_curves_figure(history, phase_boundaries=phase_boundaries), path)


# ---------------------------------------------------------------------------------------------- report files


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def _write_csv(frame: pd.DataFrame, path: Path, **kwargs: Any) -> None:
    with atomic_open(path, "w", newline="", encoding="utf-8") as fh:
        frame.to_csv(fh, index=False, lineterminator="\n", **kwargs)


def history_frame(history: Mapping[str, Sequence[float]]) -> pd.DataFrame:
    """``epoch`` (from 1) plus one column per history key; shorter series are padded with NaN."""
    longest = max((len(v) for v in history.values()), default=0)
    data: dict[str, Any] = {"epoch": np.arange(1, longest + 1)}
    for key, values in history.items():
        if key == "epoch":
            continue
        col = np.full(longest, np.nan)
        col[: len(values)] = [float(v) for v in values]
        data[str(key)] = col
    return pd.DataFrame(data)


def write_reports(
    out_dir: Path,
    *,
    metrics: dict[str, Any],
    y_true: np.ndarray,
    y_pred: np.ndarray,
    classes: Sequence[str],
    history: Mapping[str, Sequence[float]] | None,
    phase_boundaries: Sequence[int] = (),
) -> dict[str, Path]:
    """Write every evaluation artefact into ``out_dir`` (atomically); returns ``{name: path}``.

    ``metrics`` (``metrics.json``), ``per_class`` (``per_class.csv``), ``confused_pairs``
    (``confused_pairs.csv``, all non-zero pairs), ``confusion_matrix`` (``confusion_matrix.png``),
    ``confusion`` (``confusion.csv``: ``actual``, ``predicted`` class names, one row per image, for
    ``dvc plots``' confusion template) and, when ``history`` is given and non-empty, ``history``
    (``history.csv``: ``epoch`` + one column per metric) and ``training_curves``
    (``training_curves.png``).
    """
    names = class_names(classes)
    t, p = label_pair(y_true, y_pred, len(names))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}

    paths["metrics"] = out_dir / "metrics.json"
    with atomic_open(paths["metrics"], "w", encoding="utf-8") as fh:
        fh.write(json.dumps(metrics, indent=2, default=_json_default) + "\n")

    per_class = metrics.get("per_class") or {}
    rows = [{"class": name, **{k: per_class[name][k] for k in ("precision", "recall", "f1", "support")}}
            for name in names if name in per_class]  # fmt: skip
    paths["per_class"] = out_dir / "per_class.csv"
    _write_csv(pd.DataFrame(rows, columns=["class", "precision", "recall", "f1", "support"]), paths["per_class"])

    cm = confusion(t, p, len(names))
    paths["confused_pairs"] = out_dir / "confused_pairs.csv"
    pairs = most_confused_pairs(cm, names, top=len(names) * len(names))
    _write_csv(pairs, paths["confused_pairs"], float_format="%.4f")

    paths["confusion_matrix"] = plot_confusion_matrix(cm, names, out_dir / "confusion_matrix.png")

    paths["confusion"] = out_dir / "confusion.csv"
    label_names = np.asarray(names, dtype=object)
    _write_csv(pd.DataFrame({"actual": label_names[t], "predicted": label_names[p]}), paths["confusion"])

    if history:
        paths["history"] = out_dir / "history.csv"
        _write_csv(history_frame(history), paths["history"])
        paths["training_curves"] = plot_training_curves(
            history, out_dir / "training_curves.png", phase_boundaries=phase_boundaries
        )
    return paths
