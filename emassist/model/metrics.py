"""Test-set metrics and confusion analysis on plain arrays (numpy / scikit-learn; no TensorFlow, no plotting).

Class indices ``y_true`` / ``y_pred`` in ``range(C)`` and an ``(N, C)`` probability matrix in; headline and per-class
figures (:func:`compute_metrics`), the confusion matrix (:func:`confusion`), the most-confused pairs and a text
report out. The figures and report files built from them are in :mod:`emassist.model.reports`; the evaluation of the
trained model on the test split (the evaluate stage) is :mod:`emassist.model.testset`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    f1_score,
    precision_recall_fscore_support,
    top_k_accuracy_score,
)

TOP_K = 3
HEADLINE_KEYS = ("accuracy", "macro_f1", "balanced_accuracy", "top3_accuracy", "n")


# ------------------------------------------------------------------------- input arrays (data, not settings)


def class_names(classes: Sequence[str]) -> list[str]:
    """``classes`` as a list of distinct strings (at least one)."""
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


def label_pair(y_true: Any, y_pred: Any, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """``y_true`` and ``y_pred`` as int64 class-index arrays of the same length."""
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
    names = class_names(classes)
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
    t, p = label_pair(y_true, y_pred, c)
    return np.bincount(t * c + p, minlength=c * c).reshape(c, c).astype(np.int64)


def check_confusion(cm: Any, classes: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    """``cm`` as a square, non-negative matrix with one row per class, and the class names."""
    names = class_names(classes)
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
    m, names = check_confusion(cm, classes)
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
