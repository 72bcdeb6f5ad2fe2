"""The drift report: shifted batches written to a real SQLite prediction log are flagged, naming the columns; a
resample of the reference is not; an empty log is "not enough data". Evidently runs for real (imported once here)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from emassist.config.settings import MonitoringParams
from emassist.data.predlog import PredictionLog, PredictionRow
from emassist.model.drift import DriftError, ProbaProjection, _infer_dtype_from_object, drift_report

CLASSES = ["Fibres", "Nanowires", "Particles", "Tips"]
NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
MONITORING = MonitoringParams()  # params.yaml's defaults: min_rows 50, drift_share 0.5, review_rate_increase 0.2


def reference_frame(n: int = 300, seed: int = 0) -> pd.DataFrame:
    """Answers on a test split as the evaluate stage writes them: per class its own brightness, contrast and
    confidence; needs_review below 0.7 confidence or unfamiliar."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        k = i % len(CLASSES)
        logits = rng.normal(0, 1, len(CLASSES))
        logits[k] += 3.0
        proba = np.exp(logits) / np.exp(logits).sum()
        score = float(rng.gamma(4, 0.15))
        conf = float(proba.max())
        rows.append({
            "source": "evaluate", "sha256": f"{i:064x}", "origin": f"data/interim/images/{i}.png",
            "width": 1024, "height": 768, "format": "TIFF", "pixel_size_nm": float(rng.normal(5 + k, 0.5)),
            "brightness": float(rng.normal(90 + 15 * k, 8)), "contrast": float(rng.normal(40 + 5 * k, 4)),
            "label": CLASSES[int(proba.argmax())], "confidence": conf,
            "probabilities": json.dumps(dict(zip(CLASSES, proba.round(6).tolist(), strict=True))),
            "needs_review": conf < 0.7 or score > 1.0, "unfamiliar": score > 1.0, "unfamiliar_score": score,
            "true_label": CLASSES[k],
        })  # fmt: skip
    return pd.DataFrame(rows)


def log_rows(store: PredictionLog, frame: pd.DataFrame, *, age_days: float = 1.0) -> None:
    """Write ``frame``'s answers as the web page would log them, ``age_days`` before NOW."""
    fields = {f.name for f in dataclasses.fields(PredictionRow)}
    rows = []
    for record in frame.to_dict("records"):
        values = {k: v for k, v in record.items() if k in fields}
        values.update(
            source="web", probabilities=json.loads(record["probabilities"]), ts=NOW - timedelta(days=age_days)
        )
        values.update(width=int(record["width"]), height=int(record["height"]))
        rows.append(PredictionRow(**values))
    store.write(rows)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[PredictionLog]:
    log = PredictionLog(f"sqlite:///{tmp_path / 'monitoring.db'}")
    yield log
    log.dispose()


def recent(store: PredictionLog, days: float = MONITORING.window_days) -> pd.DataFrame:
    return store.predictions(since=NOW - timedelta(days=days))


def test_a_resample_of_the_reference_is_not_drift(store: PredictionLog) -> None:
    reference = reference_frame()
    log_rows(store, reference.sample(150, replace=True, random_state=1))
    log_rows(store, reference_frame(seed=9).assign(brightness=5.0), age_days=30)  # outside the window: not read
    result = drift_report(reference, recent(store), MONITORING, classes=CLASSES, now=NOW)
    summary = result.summary
    assert summary["status"] == "no_drift", summary["reasons"]
    assert summary["n_current"] == 150 and summary["n_reference"] == 300
    assert summary["drift_share"] < MONITORING.drift_share and "brightness" not in summary["drifted_columns"]
    compared = set(summary["columns"])
    assert {"label", "confidence", "needs_review", "unfamiliar", "unfamiliar_score", "brightness", "contrast",
            "megapixels", "pixel_size_nm", "proba_pc1", "proba_pc2"} == compared  # fmt: skip
    assert summary["reasons"][0].startswith("no drift")
    assert abs(summary["needs_review_rate"]["current"] - summary["needs_review_rate"]["reference"]) < 0.2


def test_one_class_only_is_drift_naming_the_class_mix(store: PredictionLog, tmp_path: Path) -> None:
    reference = reference_frame()
    only = reference[reference["true_label"] == "Nanowires"]
    log_rows(store, only.sample(120, replace=True, random_state=2))
    result = drift_report(reference, recent(store), MONITORING, classes=CLASSES, now=NOW)
    summary = result.summary
    assert summary["status"] == "drift", summary["reasons"]
    assert {"label", "proba_pc1", "brightness", "contrast"} <= set(summary["drifted_columns"])
    assert summary["drift_share"] >= MONITORING.drift_share
    assert summary["class_mix"]["current"]["Nanowires"] > 0.9
    assert summary["class_mix"]["reference"]["Nanowires"] == pytest.approx(0.25, abs=0.05)
    assert any("Nanowires" in r for r in summary["reasons"]) and summary["reasons"][0].startswith("drift")
    # the files: Evidently's HTML report and the JSON summary
    html = result.save_html(tmp_path / "out" / "drift.html").read_text()
    assert "<html" in html.lower() and "proba_pc1" in html
    saved = json.loads(result.save_json(tmp_path / "out" / "drift.json").read_text())
    assert saved["status"] == "drift" and saved["drifted_columns"] == summary["drifted_columns"]
    assert datetime.fromisoformat(saved["generated"]) == NOW


def test_darkened_images_are_named_and_the_share_threshold_decides(store: PredictionLog) -> None:
    reference = reference_frame()
    dark = reference.sample(150, replace=True, random_state=1)
    dark = dark.assign(brightness=dark["brightness"] * 0.4, contrast=dark["contrast"] * 0.5)
    log_rows(store, dark)
    current = recent(store)
    summary = drift_report(reference, current, MONITORING, classes=CLASSES, now=NOW).summary
    assert {"brightness", "contrast"} <= set(summary["drifted_columns"])
    assert "label" not in summary["drifted_columns"]
    # the image statistics alone are 2 of 11 columns: below the default share; drift at a lower one
    assert summary["status"] == "no_drift" and summary["drift_share"] < MONITORING.drift_share
    strict = dataclasses.replace(MONITORING, drift_share=0.15)
    summary = drift_report(reference, current, strict, classes=CLASSES, now=NOW).summary
    assert summary["status"] == "drift" and any("brightness, contrast" in r for r in summary["reasons"])


def test_a_risen_needs_review_rate_is_drift_on_its_own(store: PredictionLog) -> None:
    reference = reference_frame()
    batch = reference.sample(150, replace=True, random_state=4).reset_index(drop=True)
    batch.loc[: len(batch) // 2, "needs_review"] = True  # half flagged, by whatever cause
    log_rows(store, batch)
    only_rate = dataclasses.replace(MONITORING, drift_share=1.0)  # no share of columns can reach it
    summary = drift_report(reference, recent(store), only_rate, classes=CLASSES, now=NOW).summary
    rates = summary["needs_review_rate"]
    assert rates["current"] - rates["reference"] > only_rate.review_rate_increase
    assert summary["status"] == "drift" and summary["drift_share"] < 1.0
    assert any(r.startswith("needs_review rate") and "more than" in r for r in summary["reasons"])


def test_an_empty_or_short_log_is_not_enough_data(store: PredictionLog, tmp_path: Path) -> None:
    reference = reference_frame()
    result = drift_report(reference, recent(store), MONITORING, now=NOW)  # a fresh, empty log
    assert result.status == "not_enough_data" and result.snapshot is None
    assert result.summary["n_current"] == 0 and result.summary["drifted_columns"] == []
    assert "fewer than monitoring.min_rows=50" in result.summary["reasons"][0]
    page = result.save_html(tmp_path / "drift.html").read_text()
    assert "not_enough_data" in page and "min_rows" in page
    log_rows(store, reference.head(49))
    assert drift_report(reference, recent(store), MONITORING, now=NOW).status == "not_enough_data"
    # without a reference too (a fresh install), as long as there is nothing to compare
    assert drift_report(None, recent(store), MONITORING, now=NOW).status == "not_enough_data"
    log_rows(store, reference.head(10))
    with pytest.raises(DriftError, match="no reference predictions"):
        drift_report(None, recent(store), MONITORING, now=NOW)


def test_columns_unknown_on_one_side_are_left_out_and_named(store: PredictionLog) -> None:
    reference = reference_frame()
    uploads = reference.sample(100, replace=True, random_state=5).assign(pixel_size_nm=None, unfamiliar=None)
    log_rows(store, uploads)
    summary = drift_report(reference, recent(store), MONITORING, classes=CLASSES, now=NOW).summary
    assert {"pixel_size_nm", "unfamiliar"} <= set(summary["columns_left_out"])
    assert "pixel_size_nm" not in summary["columns"] and summary["status"] == "no_drift"
    assert summary["unfamiliar_rate"]["current"] is None


def test_probability_components_and_the_pandas_shim() -> None:
    rng = np.random.default_rng(0)
    proba = rng.dirichlet(np.ones(4), 200)
    projection = ProbaProjection.fit(proba, CLASSES)
    pcs = projection.transform(proba)
    assert pcs.shape == (200, 2) and np.allclose(pcs.mean(axis=0), 0, atol=1e-9)
    assert pcs[:, 0].var() >= pcs[:, 1].var()  # the first component carries the most
    assert ProbaProjection.fit(proba[:, :2], CLASSES[:2]).components.shape == (1, 2)  # at most n_classes - 1
    # pandas 2's infer_dtype_from_object, which evidently 0.7 imports and pandas 3 lacks
    assert _infer_dtype_from_object(np.float32) is np.float32
    assert _infer_dtype_from_object("int64") is np.int64
    assert _infer_dtype_from_object(np.dtype("bool")) is np.bool_
    assert _infer_dtype_from_object(pd.Int64Dtype()) is np.int64
    assert _infer_dtype_from_object("datetime") is np.datetime64
