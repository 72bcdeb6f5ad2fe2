"""The evaluate stage's job: the trained model (``models/model.keras``) on the held-out test split.

Predicts ``data/splits/test.csv`` with the training's input pipeline, computes the metrics
(:mod:`emassist.model.metrics`), writes ``reports/metrics.json`` (the headline figures ``dvc metrics`` shows) and the
report files (:mod:`emassist.model.reports`), and logs them to the training's MLflow run (``models/run.json``).

What it fits on val and the register step ships with the model (``models/calibration.json``,
``models/familiarity.npz``):

* a temperature (:mod:`emassist.model.calibration`); ECE and NLL on test before and after, and the reliability
  diagram (:mod:`emassist.model.reliability`);
* the familiarity score (:mod:`emassist.model.familiarity`: fitted on the train split's features, its threshold on
  val's) and the share of test images it calls unfamiliar;
* the review threshold (:mod:`emassist.model.selective`: the lowest calibrated confidence at which the accepted
  familiar val images reach ``evaluate.target_accuracy``); coverage and selective accuracy at it on test, and the
  risk–coverage curve (:mod:`emassist.model.riskcoverage`).

It also writes the model's answers on test, one row per image in the prediction log's columns
(``reports/test_predictions.parquet``, :func:`answers_frame`; logged as ``evaluation/test_predictions.parquet``):
the reference the drift report (:mod:`emassist.model.drift`) compares the live log with.

The headline metrics (accuracy, F1, ...) stay those of the raw model: a temperature never changes the argmax.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from emassist.config.settings import Params
from emassist.core.atomic import atomic_open
from emassist.data.dataset import make_dataset, read_split
from emassist.data.predlog import PREDICTIONS, image_stats
from emassist.model.calibration import apply_temperature, calibration_report
from emassist.model.familiarity import Familiarity, fit_familiarity
from emassist.model.features import with_features
from emassist.model.files import CALIBRATION_FILE, FAMILIARITY_FILE, HISTORY_FILE, MODEL_FILE, RUN_FILE
from emassist.model.metrics import HEADLINE_KEYS, compute_metrics, format_report
from emassist.model.reliability import write_reliability
from emassist.model.reports import write_reports
from emassist.model.riskcoverage import write_risk_coverage
from emassist.model.scale import has_scale_input, split_scale
from emassist.model.selective import ReviewPolicy, ThresholdChoice, choose_threshold, selective_report
from emassist.model.tracking import setup_mlflow

log = logging.getLogger(__name__)
REPORT_DIR = Path("reports")
PLOTS_DIR = REPORT_DIR / "plots"
METRICS_FILE = REPORT_DIR / "metrics.json"
TEST_PREDICTIONS_FILE = REPORT_DIR / "test_predictions.parquet"  # the drift report's reference
CALIBRATION_KEYS = ("ece_before", "ece_after", "nll_before", "nll_after")
WITHHELD_KEYS = ("accuracy", "macro_f1")  # a scale-aware model's figures with every pixel size withheld
SELECTIVE_KEYS = ("coverage", "selective_accuracy", "target_accuracy", "unfamiliar_share", "unfamiliar_threshold")


def predict_split(
    scorer: Any, params: Params, csv_path: Path, *, withhold_scale: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(true class indices, probabilities, penultimate features) for one split file; ``scorer`` is
    :func:`~emassist.model.features.with_features` of the model. A scale-aware model gets each image's pixel size
    (ingest's manifest), or none at all with ``withhold_scale``."""
    scale_aware = has_scale_input(scorer)
    manifest = Path(params.data.interim_dir) / "manifest.parquet" if scale_aware else None
    split = read_split(csv_path, params.data.classes, manifest=manifest)
    size = params.train.image_size
    ds = make_dataset(
        split, image_size=size, batch_size=params.train.batch_size, training=False, cache=False,
        scale=split_scale(split, size, withhold=withhold_scale) if scale_aware else None,
    )  # fmt: skip
    proba, features = scorer.predict(ds, verbose=0)
    return split.labels, np.asarray(proba, dtype=np.float64), np.asarray(features, dtype=np.float64)


def trust_report(
    params: Params,
    val: tuple[np.ndarray, np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray, np.ndarray],
    train: tuple[np.ndarray, np.ndarray],
    temperature: float,
) -> tuple[Familiarity, ThresholdChoice, dict[str, Any]]:
    """Familiarity (fitted on train features, threshold on val) and the review threshold (on calibrated val);
    coverage, selective accuracy and the unfamiliar share on test. ``val``/``test``: (labels, proba, features);
    ``train``: (labels, features)."""
    y_val, p_val, f_val = val
    y_test, p_test, f_test = test
    y_train, f_train = train
    familiarity = fit_familiarity(f_train, y_train, f_val, params.evaluate.unfamiliar_quantile)
    familiar_val = familiarity.score(f_val) <= 1.0
    familiar_test = familiarity.score(f_test) <= 1.0
    cal_val = apply_temperature(p_val, temperature)
    cal_test = apply_temperature(p_test, temperature)
    choice = choose_threshold(
        cal_val, y_val, params.evaluate.target_accuracy, classes=params.data.classes, accept=familiar_val
    )
    at = selective_report(cal_test, y_test, choice.threshold, accept=familiar_test)
    report = {
        **choice.as_dict(),
        "coverage": at["coverage"],
        "selective_accuracy": at["selective_accuracy"],
        "unfamiliar_quantile": familiarity.quantile,
        "unfamiliar_threshold": familiarity.threshold,
        "unfamiliar_share": float(1.0 - familiar_test.mean()) if len(familiar_test) else float("nan"),
        "_familiar_test": familiar_test,
        "_calibrated_test": cal_test,
    }
    return familiarity, choice, report


def answers_frame(
    csv_path: Path,
    classes: list[str],
    calibrated: np.ndarray,
    unfamiliar_scores: np.ndarray,
    policy: ReviewPolicy,
    *,
    y_true: np.ndarray,
) -> pd.DataFrame:
    """The answers on one split as the prediction log stores them (source ``evaluate``), plus ``true_label``.

    ``calibrated``: the calibrated probabilities; ``unfamiliar_scores``: the familiarity score (above 1: unfamiliar);
    ``needs_review`` by ``policy``, the rule the served model applies. Brightness and contrast are those of the
    cached (standardized) PNG, as the log measures them; size, format and SEM metadata come from the split file
    where it has them (ingest's manifest columns).
    """
    split = pd.read_csv(csv_path, keep_default_na=False)
    rows: list[dict[str, Any]] = []
    for i, record in enumerate(split.to_dict("records")):
        with Image.open(record["image_path"]) as img:
            brightness, contrast = image_stats(np.asarray(img.convert("L")))
        k = int(np.argmax(calibrated[i]))
        score = float(unfamiliar_scores[i])
        needs_review, _ = policy.decide(float(calibrated[i, k]), score > 1.0)
        rows.append({
            "source": "evaluate", "sha256": str(record.get("sha256", "")), "origin": str(record["image_path"]),
            "width": _number(record.get("width"), int), "height": _number(record.get("height"), int),
            "format": str(record.get("format") or "") or None,
            "pixel_size_nm": _number(record.get("pixel_size_nm"), float),
            "magnification": _number(record.get("magnification"), float),
            "instrument": str(record.get("instrument") or "") or None,
            "brightness": brightness, "contrast": contrast,
            "label": classes[k], "confidence": float(calibrated[i, k]),
            "probabilities": json.dumps({c: round(float(p), 6) for c, p in zip(classes, calibrated[i], strict=True)}),
            "needs_review": bool(needs_review), "unfamiliar": score > 1.0, "unfamiliar_score": score,
            "true_label": classes[int(y_true[i])],
        })  # fmt: skip
    columns = [c.name for c in PREDICTIONS.columns if c.name not in ("id", "ts", "model_name", "model_version",
                                                                      "model_alias")]  # fmt: skip
    frame = pd.DataFrame(rows, columns=[*columns, "true_label"])
    frame["width"] = frame["width"].astype("Int64")
    frame["height"] = frame["height"].astype("Int64")
    return frame


def _number(value: Any, kind: type) -> Any:
    """A finite number from a CSV cell, else None."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return kind(number) if np.isfinite(number) else None


def evaluate(params: Params) -> dict[str, Any]:
    """Evaluate ``models/model.keras`` on the test split; write reports/ and log to the training's MLflow run."""
    test_csv = Path(params.data.splits_dir) / "test.csv"
    val_csv = Path(params.data.splits_dir) / "val.csv"
    train_csv = Path(params.data.splits_dir) / "train.csv"  # the originals (not augmented): familiarity is fitted on
    for csv_path in (test_csv, val_csv, train_csv):
        read_split(csv_path, params.data.classes)  # clear errors before loading the model
    if not MODEL_FILE.is_file():
        raise FileNotFoundError(f"{MODEL_FILE} not found: run the train stage first (dvc repro train)")
    # Keras and MLflow are imported here, not at module top: they take seconds to import.
    import keras
    import mlflow

    scorer = with_features(keras.models.load_model(MODEL_FILE, compile=False))
    y_true, proba, feats = predict_split(scorer, params, test_csv)
    y_val, proba_val, feats_val = predict_split(scorer, params, val_csv)
    y_train, _, feats_train = predict_split(scorer, params, train_csv)
    classes = list(params.data.classes)
    scale_aware = has_scale_input(scorer)
    withheld: dict[str, Any] | None = None
    if scale_aware:  # the same model on the same test images, every pixel size withheld (no tags, no bar)
        _, proba_withheld, _ = predict_split(scorer, params, test_csv, withhold_scale=True)
        withheld = compute_metrics(y_true, proba_withheld, classes)
    calibration = calibration_report((y_val, proba_val), (y_true, proba))
    missing = [classes[k] for k in calibration.pop("val_classes_missing")]
    if missing:
        log.warning("the val split has no image of %s: the temperature is fitted on the other classes", missing)
    calibration["val_classes_missing"] = missing
    familiarity, choice, trust = trust_report(
        params, (y_val, proba_val, feats_val), (y_true, proba, feats), (y_train, feats_train),
        calibration["temperature"],
    )  # fmt: skip
    familiar_test, calibrated_test = trust.pop("_familiar_test"), trust.pop("_calibrated_test")
    (log.info if choice.reached else log.warning)("%s", choice.message)
    calibration.update(trust)
    familiarity.save(FAMILIARITY_FILE)
    CALIBRATION_FILE.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(CALIBRATION_FILE, "w", encoding="utf-8") as fh:
        fh.write(json.dumps(_json_safe(calibration), indent=2) + "\n")
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
    point = None if choice.threshold is None else (trust["coverage"], trust["selective_accuracy"])
    paths.update(
        write_risk_coverage(
            PLOTS_DIR, calibrated_test, y_true, threshold=choice.threshold,
            target_accuracy=choice.target_accuracy, accept=familiar_test, point=point,
        )
    )  # fmt: skip
    paths["calibration"] = CALIBRATION_FILE
    paths["familiarity"] = FAMILIARITY_FILE
    reference = answers_frame(
        test_csv, classes, calibrated_test, familiarity.score(feats), ReviewPolicy.from_config(calibration),
        y_true=y_true,
    )  # fmt: skip
    reference.to_parquet(TEST_PREDICTIONS_FILE, index=False)
    paths["test_predictions"] = TEST_PREDICTIONS_FILE
    # The headline figures for `dvc metrics show/diff` live at reports/metrics.json.
    headline = {k: metrics[k] for k in HEADLINE_KEYS}
    headline.update({k: calibration[k] for k in CALIBRATION_KEYS})
    headline["temperature"] = calibration["temperature"]
    headline["review_threshold"] = choice.threshold  # null when the target is not reached (everything flagged)
    headline.update({k: calibration[k] for k in SELECTIVE_KEYS})
    if withheld is not None:
        headline.update({f"{k}_scale_withheld": withheld[k] for k in WITHHELD_KEYS})
    METRICS_FILE.write_text(json.dumps(_json_safe(headline), indent=2))
    print(format_report(metrics, classes))
    if withheld is not None:
        print(
            f"scale input: test macro-F1 {metrics['macro_f1']:.4f} with the pixel sizes, "
            f"{withheld['macro_f1']:.4f} with every size withheld"
        )
    print(
        f"calibration: temperature {calibration['temperature']:.3f} (fitted on {calibration['n_val']} val images); "
        f"test ECE {calibration['ece_before']:.4f} -> {calibration['ece_after']:.4f}, "
        f"NLL {calibration['nll_before']:.4f} -> {calibration['nll_after']:.4f}"
    )
    print(choice.message)
    if choice.reached:
        print(
            f"on test: {trust['coverage']:.1%} answered without review at {trust['selective_accuracy']:.4f} accuracy; "
            f"{trust['unfamiliar_share']:.1%} flagged unfamiliar"
        )

    run = json.loads(RUN_FILE.read_text()) if RUN_FILE.is_file() else None
    if run:
        setup_mlflow(params)
        with mlflow.start_run(run_id=run["run_id"]):
            mlflow.log_metrics({f"test_{k}": float(v) for k, v in headline.items() if _loggable(v)})
            mlflow.log_metrics(
                {f"test_f1_{c}": float(metrics["per_class"][c]["f1"]) for c in classes if c in metrics["per_class"]}
            )
            for path in paths.values():
                mlflow.log_artifact(str(path), artifact_path="evaluation")
    else:
        log.warning("%s not found: metrics not logged to MLflow", RUN_FILE)
    metrics["calibration"] = calibration
    return metrics


def _loggable(value: Any) -> bool:
    """A finite number MLflow can log (a null review threshold or a NaN share is left out)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and np.isfinite(value)


def _json_safe(values: dict[str, Any]) -> dict[str, Any]:
    """NaN (e.g. the selective accuracy when nothing is accepted) as null: JSON has no NaN."""
    return {k: None if isinstance(v, float) and not np.isfinite(v) else v for k, v in values.items()}
