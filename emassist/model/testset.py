"""Held-out evaluation of the trained model on the test split, logged to the training's MLflow run."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from emassist.config.settings import Params
from emassist.data.dataset import make_dataset, read_split
from emassist.model.training import MODEL_FILE, RUN_FILE

log = logging.getLogger(__name__)
REPORT_DIR = Path("reports")
PLOTS_DIR = REPORT_DIR / "plots"


def predict_split(model: Any, params: Params, csv_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(true class indices, probabilities) for one split file."""
    split = read_split(csv_path, params.data.classes)
    ds = make_dataset(
        split, image_size=params.train.image_size, batch_size=params.train.batch_size, training=False, cache=False
    )
    proba = model.predict(ds, verbose=0)
    return split.labels, np.asarray(proba, dtype=np.float64)


def evaluate(params: Params) -> dict[str, Any]:
    test_csv = Path(params.data.splits_dir) / "test.csv"
    read_split(test_csv, params.data.classes)  # clear error before loading the model
    if not MODEL_FILE.is_file():
        raise FileNotFoundError(f"{MODEL_FILE} not found: run the train stage first (dvc repro train)")
    import keras
    import mlflow

    from emassist.model.evaluation import compute_metrics, format_report, write_reports

    model = keras.models.load_model(MODEL_FILE, compile=False)
    y_true, proba = predict_split(model, params, test_csv)
    classes = list(params.data.classes)
    metrics = compute_metrics(y_true, proba, classes)
    history_file = MODEL_FILE.parent / "history.json"
    saved = json.loads(history_file.read_text()) if history_file.is_file() else {}
    paths = write_reports(
        PLOTS_DIR,
        metrics=metrics,
        y_true=y_true,
        y_pred=proba.argmax(axis=1),
        classes=classes,
        history=saved.get("history"),
        phase_boundaries=saved.get("phase_boundaries", []),
    )
    # The headline figures for `dvc metrics show/diff` live at reports/metrics.json.
    headline = {k: metrics[k] for k in ("accuracy", "macro_f1", "balanced_accuracy", "top3_accuracy", "n")}
    (REPORT_DIR / "metrics.json").write_text(json.dumps(headline, indent=2))
    print(format_report(metrics, classes))

    run = json.loads(RUN_FILE.read_text()) if RUN_FILE.is_file() else None
    if run:
        from emassist.model.tracking import setup_mlflow

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
    return metrics
