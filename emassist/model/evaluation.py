"""Test-set metrics, confusion analysis and report files (pure numpy / scikit-learn / matplotlib).

Everything here works on plain arrays: class indices ``y_true`` / ``y_pred`` in ``range(C)`` and an
``(N, C)`` probability matrix, so it is usable without TensorFlow. Figures are drawn on a bare
:class:`matplotlib.figure.Figure` (Agg renderer, no pyplot state, no display needed) and every file
is written atomically.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib as mpl
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    f1_score,
    precision_recall_fscore_support,
    top_k_accuracy_score,
)

from emassist.core.atomic import atomic_open

TOP_K = 3
HEADLINE_KEYS = ("accuracy", "macro_f1", "balanced_accuracy", "top3_accuracy", "n")
CURVE_KEYS = ("accuracy", "val_accuracy", "loss", "val_loss")
PNG_DPI = 110


# ---------------------------------------------------------------------------------------------- validation


def _class_names(classes: Sequence[str]) -> list[str]:
    names = [str(c) for c in classes]
    if not names:
        raise ValueError("classes is empty: need at least one class name")
    dupes = sorted({c for c in names if names.count(c) > 1})
    if dupes:
        raise ValueError(f"duplicate class names: {dupes}")
    return names


def _labels(values: Any, name: str, num_classes: int) -> np.ndarray:
    """``values`` as a 1-D int64 array of class indices in ``range(num_classes)``."""
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one class index per image), got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty: nothing to evaluate")
    integral = arr.dtype.kind in "iu" or (
        arr.dtype.kind == "f" and bool(np.all(np.isfinite(arr))) and bool(np.all(arr == np.round(arr)))
    )
    if not integral:
        raise ValueError(f"{name} must hold integer class indices, got dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    bad = arr[(arr < 0) | (arr >= num_classes)]
    if bad.size:
        raise ValueError(f"{name} has class indices outside 0..{num_classes - 1}: {sorted(set(bad.tolist()))[:10]}")
    return arr


def _pair(y_true: Any, y_pred: Any, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    t = _labels(y_true, "y_true", num_classes)
    p = _labels(y_pred, "y_pred", num_classes)
    if len(t) != len(p):
        raise ValueError(f"y_true has {len(t)} labels but y_pred has {len(p)}")
    return t, p


# ---------------------------------------------------------------------------------------------- metrics


def compute_metrics(y_true: np.ndarray, proba: np.ndarray, classes: Sequence[str]) -> dict[str, Any]:
    """Headline and per-class test metrics from true class indices and an ``(N, C)`` probability matrix.

    Returns plain Python numbers (JSON-serialisable)::

        {"accuracy", "macro_f1", "balanced_accuracy", "top3_accuracy": float, "n": int,
         "per_class": {class: {"precision", "recall", "f1": float, "support": int}}}

    The prediction is ``proba.argmax(axis=1)``. Precision/recall/F1 use ``labels=range(C)`` and
    ``zero_division=0``: a class absent from the test set gets zeros (and counts as 0 in the macro F1)
    instead of an error. Balanced accuracy is scikit-learn's (mean recall over the classes present
    in ``y_true``). ``top3_accuracy`` is the share of images whose true class is among the three
    highest probabilities (1.0 when there are at most three classes).
    """
    names = _class_names(classes)
    c = len(names)
    scores = np.asarray(proba, dtype=np.float64)
    if scores.ndim != 2:
        raise ValueError(f"proba must be a 2-D (N images, C classes) array, got shape {scores.shape}")
    if scores.shape[1] != c:
        raise ValueError(f"proba has {scores.shape[1]} columns but there are {c} classes")
    if scores.shape[0] == 0:
        raise ValueError("proba is empty: nothing to evaluate")
    if not np.all(np.isfinite(scores)):
        raise ValueError("proba contains NaN or infinite values")
    t = _labels(y_true, "y_true", c)
    if len(t) != scores.shape[0]:
        raise ValueError(f"y_true has {len(t)} labels but proba has {scores.shape[0]} rows")

    pred = scores.argmax(axis=1)
    labels = np.arange(c)
    with warnings.catch_warnings():
        # Classes missing from y_true / y_pred are expected on small test sets; zero_division handles them.
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
        warnings.filterwarnings("ignore", message="A single label was found")
        precision, recall, f1, support = precision_recall_fscore_support(t, pred, labels=labels, zero_division=0)
        macro_f1 = f1_score(t, pred, labels=labels, average="macro", zero_division=0)
        balanced = balanced_accuracy_score(t, pred)
        top3 = 1.0 if c <= TOP_K else top_k_accuracy_score(t, scores, k=TOP_K, labels=labels)

    return {
        "accuracy": float(accuracy_score(t, pred)),
        "macro_f1": float(macro_f1),
        "balanced_accuracy": float(balanced),
        "top3_accuracy": float(top3),
        "n": len(t),
        "per_class": {
            name: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, name in enumerate(names)
        },
    }


def confusion(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """``(C, C)`` int64 count matrix: row = true class, column = predicted class."""
    if int(num_classes) < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    c = int(num_classes)
    t, p = _pair(y_true, y_pred, c)
    return np.bincount(t * c + p, minlength=c * c).reshape(c, c).astype(np.int64)


def _check_cm(cm: Any, classes: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    names = _class_names(classes)
    m = np.asarray(cm)
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"confusion matrix must be square, got shape {m.shape}")
    if m.shape[0] != len(names):
        raise ValueError(f"confusion matrix is {m.shape[0]}x{m.shape[1]} but there are {len(names)} classes")
    if np.any(m < 0):
        raise ValueError("confusion matrix has negative counts")
    return m, names


def row_percent(cm: np.ndarray) -> np.ndarray:
    """Each row as % of that true class's images; rows with no images are NaN."""
    m = np.asarray(cm, dtype=np.float64)
    totals = m.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(totals > 0, 100.0 * m / totals, np.nan)


def most_confused_pairs(cm: np.ndarray, classes: Sequence[str], top: int = 10) -> pd.DataFrame:
    """The off-diagonal cells with the largest share of their true class, as in the NFFA study's table.

    Columns: ``category`` (true class), ``confused_for`` (predicted class), ``percent`` (share of
    ``category``'s images predicted as ``confused_for``, 0-100) and ``count``. Sorted by ``percent``
    descending (ties: larger ``count`` first, then by names); pairs with no images are omitted;
    at most ``top`` rows.
    """
    if int(top) < 1:
        raise ValueError(f"top must be >= 1, got {top}")
    m, names = _check_cm(cm, classes)
    pct = row_percent(m)
    rows = [
        {"category": names[i], "confused_for": names[j], "percent": float(pct[i, j]), "count": int(m[i, j])}
        for i in range(len(names))
        for j in range(len(names))
        if i != j and m[i, j] > 0
    ]
    frame = pd.DataFrame(rows, columns=["category", "confused_for", "percent", "count"])
    if frame.empty:
        return frame.astype({"percent": "float64", "count": "int64"})
    frame = frame.sort_values(
        ["percent", "count", "category", "confused_for"], ascending=[False, False, True, True], kind="mergesort"
    )
    return frame.head(int(top)).reset_index(drop=True)


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
    m, names = _check_cm(cm, classes)
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
    names = _class_names(classes)
    t, p = _pair(y_true, y_pred, len(names))
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


def format_report(metrics: Mapping[str, Any], classes: Sequence[str]) -> str:
    """A plain-text table: per-class precision / recall / F1 / support, then the headline figures."""
    names = [str(c) for c in classes]
    per_class = metrics.get("per_class") or {}
    width = max([len("class"), *(len(n) for n in names)])
    header = f"{'class':<{width}}  {'precision':>9}  {'recall':>7}  {'f1':>7}  {'support':>7}"
    lines = [header, "-" * len(header)]
    for name in names:
        row = per_class.get(name)
        if row is None:
            lines.append(f"{name:<{width}}  {'-':>9}  {'-':>7}  {'-':>7}  {'-':>7}")
            continue
        lines.append(
            f"{name:<{width}}  {row['precision']:>9.3f}  {row['recall']:>7.3f}  {row['f1']:>7.3f}  "
            f"{int(row['support']):>7d}"
        )
    lines.append("-" * len(header))

    def fmt(key: str) -> str:
        value = metrics.get(key)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "n/a"
        return f"{float(value):.4f}  ({100 * float(value):.1f}%)"

    headline = [
        ("accuracy", fmt("accuracy")),
        ("macro F1", fmt("macro_f1")),
        ("balanced accuracy", fmt("balanced_accuracy")),
        (f"top-{TOP_K} accuracy", fmt("top3_accuracy")),
        ("test images", str(metrics.get("n", "n/a"))),
    ]
    label_width = max(len(k) for k, _ in headline)
    lines += [f"{k:<{label_width}}  {v}" for k, v in headline]
    return "\n".join(lines)
