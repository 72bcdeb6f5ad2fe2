"""Evaluation metrics and confusion analysis (emassist.model.metrics) and the figures and report files
(emassist.model.reports); no TensorFlow needed."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
    top_k_accuracy_score,
)

from emassist.config.classes import CLASSES
from emassist.model.metrics import compute_metrics, confusion, format_report, most_confused_pairs
from emassist.model.reports import (
    confusion_figure,
    plot_confusion_matrix,
    plot_training_curves,
    training_curves_figure,
    write_reports,
)
from tests.conftest import REPO_ROOT

# Six images, four classes, every figure below worked out by hand (no ties in any row).
TINY_CLASSES = ["a", "b", "c", "d"]
TINY_TRUE = np.array([0, 0, 1, 1, 2, 3])
TINY_PROBA = np.array(
    [
        [0.70, 0.10, 0.15, 0.05],  # a -> a
        [0.30, 0.40, 0.20, 0.10],  # a -> b  (a still in the top 3)
        [0.05, 0.60, 0.25, 0.10],  # b -> b
        [0.10, 0.70, 0.15, 0.05],  # b -> b
        [0.12, 0.20, 0.60, 0.08],  # c -> c
        [0.50, 0.30, 0.15, 0.05],  # d -> a  (d is last: a top-3 miss)
    ]
)


def random_case(n: int = 400, c: int = 10, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Imbalanced labels and noisy softmax outputs that are right most of the time."""
    rng = np.random.default_rng(seed)
    y = rng.choice(c, size=n, p=np.arange(1, c + 1) / np.arange(1, c + 1).sum())
    logits = rng.normal(0.0, 1.0, (n, c))
    logits[np.arange(n), y] += 1.5
    proba = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return y, proba


def history(epochs: int = 8) -> dict[str, list[float]]:
    x = np.arange(epochs)
    return {
        "accuracy": (0.3 + 0.6 * (1 - np.exp(-x / 3))).tolist(),
        "val_accuracy": (0.25 + 0.55 * (1 - np.exp(-x / 3))).tolist(),
        "loss": (2.0 * np.exp(-x / 3) + 0.2).tolist(),
        "val_loss": (2.1 * np.exp(-x / 3) + 0.35).tolist(),
        "learning_rate": [1e-3] * (epochs // 2) + [1e-5] * (epochs - epochs // 2),
    }


def main_axes(fig) -> list:
    """The figure's panels, leaving out colourbars."""
    return [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]


def assert_png(path: Path, min_bytes: int = 20_000) -> tuple[int, int]:
    assert path.is_file(), path
    assert path.stat().st_size > min_bytes, path.stat().st_size
    with Image.open(path) as im:
        assert im.format == "PNG"
        im.verify()
    with Image.open(path) as im:
        im.load()
        assert np.asarray(im.convert("L")).std() > 5  # not a blank canvas
        return im.size


# ---------------------------------------------------------------------------------------------- metrics


def test_tiny_case_by_hand() -> None:
    m = compute_metrics(TINY_TRUE, TINY_PROBA, TINY_CLASSES)
    assert m["n"] == 6
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["top3_accuracy"] == pytest.approx(5 / 6)
    # recalls a 1/2, b 2/2, c 1/1, d 0/1
    assert m["balanced_accuracy"] == pytest.approx((0.5 + 1 + 1 + 0) / 4)
    # F1: a 0.5, b 2·(2/3·1)/(2/3+1) = 0.8, c 1, d 0
    assert m["macro_f1"] == pytest.approx((0.5 + 0.8 + 1.0 + 0.0) / 4)
    expected = {
        "a": {"precision": 1 / 2, "recall": 1 / 2, "f1": 0.5, "support": 2},
        "b": {"precision": 2 / 3, "recall": 1.0, "f1": 0.8, "support": 2},
        "c": {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 1},
        "d": {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1},  # never predicted: zero_division=0
    }
    assert list(m["per_class"]) == TINY_CLASSES
    for name, row in expected.items():
        assert m["per_class"][name] == pytest.approx(row), name


def assert_matches_sklearn(y: np.ndarray, proba: np.ndarray, classes: list[str]) -> None:
    labels = list(range(len(classes)))
    pred = proba.argmax(axis=1)
    m = compute_metrics(y, proba, classes)
    assert m["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert m["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro", labels=labels, zero_division=0))
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
    assert m["top3_accuracy"] == pytest.approx(top_k_accuracy_score(y, proba, k=3, labels=labels))
    p, r, f, s = precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
    for i, name in enumerate(classes):
        assert m["per_class"][name] == pytest.approx(
            {"precision": p[i], "recall": r[i], "f1": f[i], "support": s[i]}
        ), name


def test_matches_sklearn_on_hand_built_set() -> None:
    assert_matches_sklearn(TINY_TRUE, TINY_PROBA, TINY_CLASSES)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_sklearn_on_random_set(seed: int) -> None:
    y, proba = random_case(seed=seed)
    assert_matches_sklearn(y, proba, list(CLASSES))
    m = compute_metrics(y, proba, list(CLASSES))
    assert 0.0 < m["top3_accuracy"] < 1.0 and m["top3_accuracy"] >= m["accuracy"]


def test_values_are_plain_python_and_json_serialisable() -> None:
    y, proba = random_case(n=50, seed=3)
    m = compute_metrics(y.astype(np.int32), proba.astype(np.float32), list(CLASSES))
    json.dumps(m)  # no numpy scalars anywhere
    for key in ("accuracy", "macro_f1", "balanced_accuracy", "top3_accuracy"):
        assert type(m[key]) is float, key
    assert type(m["n"]) is int
    for row in m["per_class"].values():
        assert [type(row[k]) for k in ("precision", "recall", "f1", "support")] == [float, float, float, int]


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")  # sklearn's own, in the comparison
def test_absent_classes_do_not_crash_or_warn() -> None:
    # Class 3 never occurs, class 4 is predicted but never true.
    y = np.array([0, 1, 2, 0, 1])
    proba = np.full((5, 5), 0.05)
    for i, p in enumerate([0, 1, 2, 4, 1]):
        proba[i, p] = 0.8
    classes = ["v", "w", "x", "y", "z"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = compute_metrics(y, proba, classes)
    assert m["per_class"]["y"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert m["per_class"]["z"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert m["accuracy"] == pytest.approx(4 / 5)
    assert m["balanced_accuracy"] == pytest.approx((0.5 + 1 + 1) / 3)  # over the classes present
    assert_matches_sklearn(y, proba, classes)


@pytest.mark.parametrize("c", [1, 2, 3])
def test_top3_is_one_with_three_classes_or_fewer(c: int) -> None:
    y = np.arange(6) % c
    proba = np.random.default_rng(0).random((6, c))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert compute_metrics(y, proba, [f"k{i}" for i in range(c)])["top3_accuracy"] == 1.0


@pytest.mark.parametrize(
    ("y_true", "proba", "classes", "match"),
    [
        (TINY_TRUE, TINY_PROBA[:, :3], TINY_CLASSES, "3 columns but there are 4 classes"),
        (TINY_TRUE[:5], TINY_PROBA, TINY_CLASSES, "5 labels but proba has 6 rows"),
        (TINY_TRUE, TINY_PROBA[0], TINY_CLASSES, "2-D"),
        (TINY_TRUE.reshape(2, 3), TINY_PROBA, TINY_CLASSES, "1-D"),
        (np.array([], dtype=int), np.empty((0, 4)), TINY_CLASSES, "empty"),
        (np.array([0, 0, 1, 1, 2, 4]), TINY_PROBA, TINY_CLASSES, r"outside 0\.\.3: \[4\]"),
        (np.array([0, 0, 1, 1, 2, -1]), TINY_PROBA, TINY_CLASSES, "outside"),
        (TINY_TRUE + 0.5, TINY_PROBA, TINY_CLASSES, "integer class indices"),
        (TINY_TRUE, np.where(np.eye(6, 4) > 0, np.nan, TINY_PROBA), TINY_CLASSES, "NaN"),
        (TINY_TRUE, TINY_PROBA, [], "classes is empty"),
        (TINY_TRUE, TINY_PROBA, ["a", "b", "a", "d"], "duplicate"),
    ],
)
def test_bad_inputs_raise(y_true, proba, classes, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        compute_metrics(y_true, proba, classes)


# ---------------------------------------------------------------------------------------------- confusion


def test_confusion_matches_sklearn() -> None:
    y, proba = random_case(n=300, seed=4)
    pred = proba.argmax(axis=1)
    cm = confusion(y, pred, 10)
    assert cm.shape == (10, 10) and cm.sum() == 300
    np.testing.assert_array_equal(cm, confusion_matrix(y, pred, labels=range(10)))
    np.testing.assert_array_equal(confusion([0, 2], [2, 2], 4), [[0, 0, 1, 0], [0] * 4, [0, 0, 1, 0], [0] * 4])


def test_confusion_bad_inputs() -> None:
    with pytest.raises(ValueError, match="3 labels but y_pred has 2"):
        confusion([0, 1, 2], [0, 1], 3)
    with pytest.raises(ValueError, match="y_pred has class indices outside"):
        confusion([0, 1], [0, 3], 3)
    with pytest.raises(ValueError, match="empty"):
        confusion([], [], 3)


def test_most_confused_pairs_by_hand() -> None:
    cm = np.array(
        [
            [8, 2, 0, 0],  # x: 10 images, 2 taken for y -> 20 %
            [1, 3, 0, 0],  # y: 4 images, 1 taken for x -> 25 %
            [0, 0, 0, 0],  # z: no images at all
            [0, 3, 1, 6],  # w: 10 images, 3 for y -> 30 %, 1 for z -> 10 %
        ]
    )
    pairs = most_confused_pairs(cm, ["x", "y", "z", "w"])
    assert list(pairs.columns) == ["category", "confused_for", "percent", "count"]
    assert list(zip(pairs["category"], pairs["confused_for"], strict=True)) == [
        ("w", "y"),
        ("y", "x"),
        ("x", "y"),
        ("w", "z"),
    ]
    assert pairs["percent"].tolist() == pytest.approx([30.0, 25.0, 20.0, 10.0])
    assert pairs["count"].tolist() == [3, 1, 2, 1]
    assert most_confused_pairs(cm, ["x", "y", "z", "w"], top=2)["percent"].tolist() == pytest.approx([30, 25])


def test_most_confused_pairs_edge_cases() -> None:
    perfect = most_confused_pairs(np.diag([3, 4, 5]), ["p", "q", "r"])
    assert perfect.empty and list(perfect.columns) == ["category", "confused_for", "percent", "count"]
    tie = most_confused_pairs(np.array([[1, 1], [2, 2]]), ["p", "q"])  # both 50 %: larger count first
    assert tie["category"].tolist() == ["q", "p"]
    with pytest.raises(ValueError, match="square"):
        most_confused_pairs(np.zeros((2, 3)), ["p", "q"])
    with pytest.raises(ValueError, match="3 classes"):
        most_confused_pairs(np.zeros((2, 2)), ["p", "q", "r"])
    with pytest.raises(ValueError, match="top"):
        most_confused_pairs(np.eye(2), ["p", "q"], top=0)


# ---------------------------------------------------------------------------------------------- figures


def test_confusion_matrix_png(tmp_path: Path) -> None:
    y, proba = random_case(seed=5)
    cm = confusion(y, proba.argmax(axis=1), 10)
    fig = confusion_figure(cm, list(CLASSES))
    panels = main_axes(fig)
    assert len(panels) == 2 and len(fig.axes) == 4  # two matrices, each with its colourbar
    assert [t.get_text() for t in panels[0].get_xticklabels()] == list(CLASSES)
    assert len(panels[0].texts) == len(panels[1].texts) == 100  # every cell annotated
    path = plot_confusion_matrix(cm, list(CLASSES), tmp_path / "sub" / "cm.png")
    assert path == tmp_path / "sub" / "cm.png"
    width, height = assert_png(path)
    assert width > 1.6 * height  # two panels side by side
    assert [p.name for p in path.parent.iterdir()] == ["cm.png"]  # no temporary left behind


def test_failed_plot_leaves_previous_file(tmp_path: Path) -> None:
    target = tmp_path / "cm.png"
    target.write_bytes(b"previous")
    with pytest.raises(ValueError, match="square"):
        plot_confusion_matrix(np.zeros((2, 3)), ["p", "q"], target)
    assert target.read_bytes() == b"previous"


def test_training_curves_png(tmp_path: Path) -> None:
    fig = training_curves_figure(history(10), phase_boundaries=[6])
    panels = main_axes(fig)
    assert [ax.get_title() for ax in panels] == ["Accuracy", "Loss"]
    for ax in panels:
        train, val, boundary = ax.get_lines()
        assert train.get_xdata()[0] == 1 and train.get_xdata()[-1] == 10  # epochs counted from 1
        assert len(val.get_ydata()) == 10
        assert list(boundary.get_xdata()) == [6.5, 6.5] and boundary.get_linestyle() == "--"
    width, height = assert_png(plot_training_curves(history(10), tmp_path / "curves.png", phase_boundaries=[6]))
    assert width > 1.6 * height


def test_training_curves_skip_missing_keys(tmp_path: Path) -> None:
    fig = training_curves_figure({"loss": [1.0, 0.7, 0.5]})
    accuracy, loss = main_axes(fig)
    assert accuracy.get_lines() == [] and "no accuracy recorded" in accuracy.texts[0].get_text()
    assert len(loss.get_lines()) == 1
    assert_png(plot_training_curves({"loss": [1.0]}, tmp_path / "one_epoch.png"), min_bytes=5_000)
    with pytest.raises(ValueError, match="phase boundaries"):
        training_curves_figure({"loss": [1.0]}, phase_boundaries=[-1])


# ---------------------------------------------------------------------------------------------- report files


def test_write_reports(tmp_path: Path) -> None:
    y, proba = random_case(n=237, seed=6)
    pred = proba.argmax(axis=1)
    classes = list(CLASSES)
    metrics = compute_metrics(y, proba, classes)
    out = tmp_path / "reports" / "plots"
    paths = write_reports(out, metrics=metrics, y_true=y, y_pred=pred, classes=classes, history=history(7))
    names = {
        "metrics": "metrics.json",
        "per_class": "per_class.csv",
        "confused_pairs": "confused_pairs.csv",
        "confusion_matrix": "confusion_matrix.png",
        "confusion": "confusion.csv",
        "history": "history.csv",
        "training_curves": "training_curves.png",
    }
    assert {k: p.name for k, p in paths.items()} == names
    assert sorted(p.name for p in out.iterdir()) == sorted(names.values())  # nothing else, no temporaries

    assert json.loads(paths["metrics"].read_text()) == metrics

    per_class = pd.read_csv(paths["per_class"])
    assert per_class.columns.tolist() == ["class", "precision", "recall", "f1", "support"]
    assert per_class["class"].tolist() == classes
    assert per_class["support"].sum() == 237
    assert per_class["f1"].tolist() == pytest.approx([metrics["per_class"][c]["f1"] for c in classes])

    confused = pd.read_csv(paths["confused_pairs"])
    assert confused.columns.tolist() == ["category", "confused_for", "percent", "count"]
    assert confused["count"].sum() == (y != pred).sum()  # every off-diagonal image, not just a top 10
    assert confused["percent"].is_monotonic_decreasing

    rows = pd.read_csv(paths["confusion"])
    assert rows.columns.tolist() == ["actual", "predicted"] and len(rows) == 237
    assert rows["actual"].tolist() == [classes[i] for i in y]
    assert rows["predicted"].tolist() == [classes[i] for i in pred]

    hist = pd.read_csv(paths["history"])
    assert hist.columns.tolist() == ["epoch", "accuracy", "val_accuracy", "loss", "val_loss", "learning_rate"]
    assert hist["epoch"].tolist() == list(range(1, 8))
    assert hist["val_loss"].tolist() == pytest.approx(history(7)["val_loss"])

    for key in ("confusion_matrix", "training_curves"):
        width, height = assert_png(paths[key])
        assert width > height


def test_write_reports_without_history_and_bad_labels(tmp_path: Path) -> None:
    metrics = compute_metrics(TINY_TRUE, TINY_PROBA, TINY_CLASSES)
    pred = TINY_PROBA.argmax(axis=1)
    paths = write_reports(tmp_path, metrics=metrics, y_true=TINY_TRUE, y_pred=pred, classes=TINY_CLASSES, history=None)
    assert "history" not in paths and "training_curves" not in paths
    assert not (tmp_path / "history.csv").exists()
    assert len(pd.read_csv(paths["confusion"])) == 6
    with pytest.raises(ValueError, match="6 labels but y_pred has 5"):
        write_reports(
            tmp_path / "x", metrics=metrics, y_true=TINY_TRUE, y_pred=pred[:5], classes=TINY_CLASSES, history=None
        )
    assert not (tmp_path / "x").exists()  # nothing written before the inputs were checked


def test_history_with_uneven_lengths(tmp_path: Path) -> None:
    metrics = compute_metrics(TINY_TRUE, TINY_PROBA, TINY_CLASSES)
    hist = {"loss": [1.0, 0.8, 0.6], "val_loss": [1.1, 0.9]}
    paths = write_reports(
        tmp_path, metrics=metrics, y_true=TINY_TRUE, y_pred=TINY_PROBA.argmax(axis=1), classes=TINY_CLASSES,
        history=hist, phase_boundaries=[2],
    )  # fmt: skip
    frame = pd.read_csv(paths["history"])
    assert len(frame) == 3 and np.isnan(frame["val_loss"].iloc[2])
    assert_png(paths["training_curves"])


def test_format_report() -> None:
    metrics = compute_metrics(TINY_TRUE, TINY_PROBA, TINY_CLASSES)
    text = format_report(metrics, TINY_CLASSES)
    lines = text.splitlines()
    assert lines[0].split() == ["class", "precision", "recall", "f1", "support"]
    assert lines[2].split() == ["a", "0.500", "0.500", "0.500", "2"]
    assert lines[3].split() == ["b", "0.667", "1.000", "0.800", "2"]
    assert "accuracy           0.6667  (66.7%)" in text
    assert "macro F1           0.5750  (57.5%)" in text
    assert "balanced accuracy  0.6250  (62.5%)" in text
    assert "top-3 accuracy     0.8333  (83.3%)" in text
    assert "test images        6" in text
    long = format_report(compute_metrics(*random_case(n=40), list(CLASSES)), list(CLASSES))
    assert all(name in long for name in CLASSES)
    assert len({len(line) for line in long.splitlines()[:12]}) == 1  # columns line up


@pytest.mark.parametrize("module", ["emassist.model.metrics", "emassist.model.reports"])
def test_no_tensorflow_and_no_pyplot_import(module: str) -> None:
    code = f"import sys, {module}; print('tensorflow' in sys.modules, 'matplotlib.pyplot' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_metrics_module_draws_nothing() -> None:
    """metrics is numbers only: importing it does not pull in matplotlib at all."""
    code = "import sys, emassist.model.metrics; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False"]
