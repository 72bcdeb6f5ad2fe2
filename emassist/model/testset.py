"""The evaluate stage's job: the trained model (``models/model.keras``) on the held-out test split.

Predicts ``data/splits/test.csv`` with the training's input pipeline, computes the metrics
(:mod:`emassist.model.metrics`), writes ``reports/metrics.json`` (the headline figures ``dvc metrics`` shows) and the
report files (:mod:`emassist.model.reports`), and logs them to the training's MLflow run (``models/run.json``).

Calibration (:mod:`emassist.model.calibration`): a temperature is fitted on ``data/splits/val.csv`` and written to
``models/calibration.json`` (the register step ships it with the model); ECE and NLL on test before and after go
into ``reports/metrics.json`` and the reliability diagram into ``reports/plots/`` (:mod:`emassist.model.reliability`).
The headline metrics (accuracy, F1, ...) stay those of the raw model: a temperature never changes the argmax.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from emassist.config.settings import Params
from emassist.core.atomic import atomic_open
from emassist.data.dataset import make_dataset, read_split
from emassist.model.calibration import calibration_report
from emassist.model.files import CALIBRATION_FILE, HISTORY_FILE, MODEL_FILE, RUN_FILE
from emassist.model.metrics import HEADLINE_KEYS, compute_metrics, format_report
from emassist.model.reliability import write_reliability
from emassist.model.reports import write_reports
from emassist.model.tracking import setup_mlflow

log = logging.getLogger(__name__)
REPORT_DIR = Path("reports")
PLOTS_DIR = REPORT_DIR / "plots"
METRICS_FILE = REPORT_DIR / "metrics.json"
CALIBRATION_KEYS = ("ece_before", "ece_after", "nll_before", "nll_after")


def predict_split(model: Any, params: Params, csv_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(true class indices, probabilities) for one split file."""
    split = read_split(csv_path, params.data.classes)
    ds = make_dataset(
        split, image_size=params.train.image_size, batch_size=params.train.batch_size, training=False, cache=False
    )
    proba = model.predict(ds, verbose=0)
    return split.labels, np.asarray(proba, dtype=np.float64)


def evaluate(params: Params) -> dict[str, Any]:
    """Evaluate ``models/model.keras`` on the test split; write reports/ and log to the training's MLflow run."""
    test_csv = Path(params.data.splits_dir) / "test.csv"
    val_csv = Path(params.data.splits_dir) / "val.csv"
    read_split(test_csv, params.data.classes)  # clear errors before loading the model
    read_split(val_csv, params.data.classes)
    if not MODEL_FILE.is_file():
        raise FileNotFoundError(f"{MODEL_FILE} not found: run the train stage first (dvc repro train)")
    # Keras and MLflow are imported here, not at module top: they take seconds to import.
    import keras
    import mlflow

    model = keras.models.load_model(MODEL_FILE, compile=False)
    y_true, proba = predict_split(model, params, test_csv)
    y_val, proba_val = predict_split(model, params, val_csv)
    classes = list(params.data.classes)
    calibration = calibration_report((y_val, proba_val), (y_true, proba))
    missing = [classes[k] for k in calibration.pop("val_classes_missing")]
    if missing:
        log.warning("the val split has no image of %s: the temperature is fitted on the other classes", missing)
    calibration["val_classes_missing"] = missing
    CALIBRATION_FILE.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(CALIBRATION_FILE, "w", encoding="utf-8") as fh:
        fh.write(json.dumps(calibration, indent=2) + "\n")
    metrics = compute_metrics(y_true, proba, classes)
    saved = json.loads(HISTORY_FILE.read_text()) if HISTORY_FILE.is_file() else {}
    paths = write_reports(
        PLOTS_DIR,
        metrics=metrics,
        y_true=y_true,
        y_pred=proba.argmax(axis=1),
        classes=classes,
        history=saved.get("history"),
        phase_boundaries=saved.get("phase_boundaries", []),
    )
    paths.update(write_reliability(PLOTS_DIR, proba, y_true, calibration["temperature"]))
    paths["calibration"] = CALIBRATION_FILE
    # The headline figures for `dvc metrics show/diff` live at reports/metrics.json.
    headline = {k: metrics[k] for k in HEADLINE_KEYS}
    headline.update({k: calibration[k] for k in CALIBRATION_KEYS})
    headline["temperature"] = calibration["temperature"]
    METRICS_FILE.write_text(json.dumps(headline, indent=2))
    print(format_report(metrics, classes))
    print(
        f"calibration: temperature {calibration['temperature']:.3f} (fitted on {calibration['n_val']} val images); "
        f"test ECE {calibration['ece_before']:.4f} -> {calibration['ece_after']:.4f}, "
        f"NLL {calibration['nll_before']:.4f} -> {calibration['nll_after']:.4f}"
    )

    run = json.loads(RUN_FILE.read_text()) if RUN_FILE.is_file() else None
    if run:
        setup_mlflow(params)
        with mlflow.start_run(run_id=run["run_id"]):
            mlflow.log_metrics({f"test_{k}": float(v) for k, v in headline.items()})
            mlflow.log_metrics(
                {f"test_f1_{c}": float(metrics["per_class"][c]["f1"]) for c in classes if c in metrics["per_class"]}
            )
            for path in paths.values():
                mlflow.log_artifact(str(path), artifact_path="evaluation")
    else:
        log.warning("%s not found: metrics not logged to MLflow", RUN_FILE)
    metrics["calibration"] = calibration
    return metrics
