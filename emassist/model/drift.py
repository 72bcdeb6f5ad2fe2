"""The drift report: the recent prediction log against a reference (the champion's answers on the test split).

Both frames have the prediction log's columns (:mod:`emassist.data.predlog`; the reference is what the evaluate stage
writes to ``reports/test_predictions.parquet``). :func:`drift_frame` turns one into the columns compared:

* ``label`` (categorical: the class mix), ``confidence`` (calibrated), ``needs_review`` and ``unfamiliar``
  (categorical: their rates);
* image statistics of the standardized image: ``brightness``, ``contrast``; the image size as ``megapixels``
  (width × height: one column, so a size change counts once); ``pixel_size_nm`` where the SEM metadata gave it;
* the embedding summary: ``unfamiliar_score`` (the model's own distance of the image's penultimate-layer embedding
  from the training data, over its threshold: the one number the log keeps about the embedding itself) and the first
  two principal components of the class probabilities (``proba_pc1``, ``proba_pc2``; fitted on the reference), which
  see a change in how the answers are spread between classes that the top label and its confidence miss.

A column absent or empty on either side (no pixel size from uploads, no familiarity shipped) is left out and named
in the summary. Evidently 0.7 (``DataDriftPreset`` with its tests) picks each column's test by type and size (K-S or
chi-square / Z-test p-values on small samples, Wasserstein / Jensen-Shannon distances on large ones) and says which
drifted. The status (:func:`drift_report`):

* ``not_enough_data``: fewer than ``monitoring.min_rows`` current rows (an empty log included; Evidently is not run);
* ``drift``: the share of drifted columns reaches ``monitoring.drift_share``, or the needs_review rate is above the
  reference's by more than ``monitoring.review_rate_increase`` (absolute, e.g. 0.2 = 20 points);
* ``no_drift`` otherwise.

Evidently 0.7.23 imports ``pandas.core.dtypes.common.infer_dtype_from_object``, which pandas 3 removed:
:func:`_import_evidently` defines it (pandas 2's semantics) before the first import; the one place that does.
"""

from __future__ import annotations

import html
import json
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from emassist.config.settings import MonitoringParams
from emassist.core.atomic import atomic_open

if TYPE_CHECKING:
    import pandas as pd

CATEGORICAL_COLUMNS = ("label", "needs_review", "unfamiliar")
NUMERICAL_COLUMNS = (
    "confidence", "unfamiliar_score", "brightness", "contrast", "megapixels", "pixel_size_nm", "proba_pc1", "proba_pc2",
)  # fmt: skip
N_COMPONENTS = 2
#: The reference the evaluate stage writes (``emassist.model.testset.TEST_PREDICTIONS_FILE``; named again here so that
#: the monitor does not import the evaluate stage's Keras) and the artifact path it has in the training's MLflow run.
REFERENCE_FILE = Path("reports/test_predictions.parquet")
REFERENCE_ARTIFACT = "evaluation/test_predictions.parquet"


class DriftError(ValueError):
    """The frames cannot be compared (no reference, a required column missing); the message says what to do."""


# --------------------------------------------------------------------------------------------- Evidently import


def _infer_dtype_from_object(dtype: Any) -> type:
    """pandas 2's ``infer_dtype_from_object``: a dtype-like (NumPy scalar type, dtype, extension dtype or its name)
    → its NumPy scalar type (an extension dtype's ``type``)."""
    import pandas as pd

    if isinstance(dtype, type) and issubclass(dtype, np.generic):
        return dtype
    if isinstance(dtype, np.dtype | pd.api.extensions.ExtensionDtype):
        numpy_dtype = getattr(dtype, "numpy_dtype", None)
        return numpy_dtype.type if numpy_dtype is not None else dtype.type
    if isinstance(dtype, str) and dtype in ("datetime", "timedelta"):
        dtype += "64"
    try:
        resolved = pd.api.types.pandas_dtype(dtype)
    except TypeError:
        resolved = np.dtype(dtype)
    return _infer_dtype_from_object(resolved)


def _import_evidently() -> Any:
    """Import Evidently (seconds: lazy, only where a report is made), with the pandas 3 shim applied first."""
    import pandas.core.dtypes.common as pandas_common

    if not hasattr(pandas_common, "infer_dtype_from_object"):  # gone in pandas 3; evidently 0.7 imports it
        pandas_common.infer_dtype_from_object = _infer_dtype_from_object  # type: ignore[attr-defined]
    import evidently

    return evidently


# --------------------------------------------------------------------------------------------- the compared columns


@dataclass(frozen=True)
class ProbaProjection:
    """Principal components of the class probabilities, fitted on the reference."""

    classes: tuple[str, ...]
    mean: np.ndarray
    components: np.ndarray  # [k, n_classes]

    @classmethod
    def fit(cls, proba: np.ndarray, classes: Sequence[str], k: int = N_COMPONENTS) -> ProbaProjection:
        centered = proba - proba.mean(axis=0)
        _, _, vt = np.linalg.svd(centered, full_matrices=False)
        k = max(0, min(k, vt.shape[0], len(classes) - 1))
        return cls(tuple(classes), proba.mean(axis=0), vt[:k])

    def transform(self, proba: np.ndarray) -> np.ndarray:
        return (proba - self.mean) @ self.components.T


def probability_matrix(frame: pd.DataFrame, classes: Sequence[str]) -> np.ndarray:
    """``[n, len(classes)]`` from the log's ``probabilities`` column (JSON ``{class: p}`` or a mapping); a class
    missing from a row counts 0."""
    rows = []
    for value in frame["probabilities"] if "probabilities" in frame.columns else []:
        probs = json.loads(value) if isinstance(value, str) else (value or {})
        rows.append([float(probs.get(c, 0.0)) for c in classes])
    return np.asarray(rows, dtype=np.float64).reshape(len(rows), len(classes))


def classes_of(frame: pd.DataFrame) -> list[str]:
    """The classes named in a frame's probabilities (first seen order)."""
    seen: dict[str, None] = {}
    for value in frame.get("probabilities", []):
        probs = json.loads(value) if isinstance(value, str) else (value or {})
        seen.update(dict.fromkeys(map(str, probs)))
    return list(seen)


def drift_frame(frame: pd.DataFrame, projection: ProbaProjection | None) -> pd.DataFrame:
    """The compared columns of a log-shaped frame (see the module docstring)."""
    import pandas as pd

    out = pd.DataFrame(index=range(len(frame)))
    col = frame.reset_index(drop=True)
    if "label" not in col.columns:
        raise DriftError("the frame has no 'label' column: not a prediction log frame")
    out["label"] = col["label"].astype("str")
    for name in ("needs_review", "unfamiliar"):
        if name in col.columns:  # as text: Evidently's categorical tests; a missing flag stays missing
            out[name] = col[name].map(lambda v: None if v is None or v != v else ("true" if bool(v) else "false"))
    for name in ("confidence", "unfamiliar_score", "brightness", "contrast", "pixel_size_nm"):
        if name in col.columns:
            out[name] = pd.to_numeric(col[name], errors="coerce").astype("float64")
    if "width" in col.columns and "height" in col.columns:
        w = pd.to_numeric(col["width"], errors="coerce")
        h = pd.to_numeric(col["height"], errors="coerce")
        out["megapixels"] = (w * h / 1e6).astype("float64")
    if projection is not None and len(projection.components):
        pcs = projection.transform(probability_matrix(col, projection.classes))
        for i in range(pcs.shape[1]):
            out[f"proba_pc{i + 1}"] = pcs[:, i]
    return out


# --------------------------------------------------------------------------------------------- the report


@dataclass
class DriftResult:
    """The JSON summary and Evidently's snapshot (None when it was not run)."""

    summary: dict[str, Any]
    snapshot: Any = None
    columns: list[str] = field(default_factory=list)

    @property
    def status(self) -> str:
        return str(self.summary["status"])

    def save_json(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_open(path, "w", encoding="utf-8") as fh:
            fh.write(json.dumps(self.summary, indent=2) + "\n")
        return path

    def save_html(self, path: Path) -> Path:
        """Evidently's HTML report; without one (not enough data) a short page with the summary's sentences."""
        path.parent.mkdir(parents=True, exist_ok=True)
        if self.snapshot is not None:
            tmp = path.with_name(f".{path.name}.tmp")
            self.snapshot.save_html(str(tmp))
            tmp.replace(path)
            return path
        items = "".join(f"<li>{html.escape(r)}</li>" for r in self.summary["reasons"])
        page = (
            "<!doctype html><html><head><meta charset='utf-8'><title>Drift report</title></head><body>"
            f"<h1>Drift report: {html.escape(self.status)}</h1><ul>{items}</ul>"
            f"<p>generated {html.escape(self.summary['generated'])}</p></body></html>\n"
        )
        with atomic_open(path, "w", encoding="utf-8") as fh:
            fh.write(page)
        return path


def _rate(frame: pd.DataFrame, column: str) -> float | None:
    if column not in frame.columns:
        return None
    values = frame[column].dropna()
    return float(values.astype(bool).mean()) if len(values) else None


def _class_mix(frame: pd.DataFrame) -> dict[str, float]:
    if "label" not in frame.columns or not len(frame):
        return {}
    return {str(k): round(float(v), 4) for k, v in frame["label"].value_counts(normalize=True).sort_index().items()}


def _usable(column: str, reference: pd.DataFrame, current: pd.DataFrame) -> bool:
    return (
        column in reference.columns
        and column in current.columns
        and reference[column].notna().any()
        and current[column].notna().any()
    )


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0%}"


def drift_report(
    reference: pd.DataFrame | None,
    current: pd.DataFrame,
    monitoring: MonitoringParams,
    *,
    window_days: float | None = None,
    classes: Sequence[str] | None = None,
    now: datetime | None = None,
) -> DriftResult:
    """Compare ``current`` (the recent log) with ``reference`` (see the module docstring for columns and status).

    ``window_days`` (default ``monitoring.window_days``) is only reported; the caller chose the rows. ``classes``
    orders the probabilities (default: as the reference names them). ``reference`` may be None only when there are
    too few current rows to compare anyway.
    """
    window = float(monitoring.window_days if window_days is None else window_days)
    n_current = len(current)
    n_reference = 0 if reference is None else len(reference)
    summary: dict[str, Any] = {
        "status": "not_enough_data",
        "n_reference": n_reference,
        "n_current": n_current,
        "window_days": window,
        "drifted_columns": [],
        "drift_share": None,
        "drift_share_threshold": monitoring.drift_share,
        "needs_review_rate": {"reference": None, "current": _rate(current, "needs_review")},
        "review_rate_increase_threshold": monitoring.review_rate_increase,
        "unfamiliar_rate": {"reference": None, "current": _rate(current, "unfamiliar")},
        "class_mix": {"reference": {}, "current": _class_mix(current)},
        "columns": {},
        "columns_left_out": [],
        "reasons": [],
        "generated": (now or datetime.now(UTC)).isoformat(timespec="seconds"),
    }
    if reference is not None:
        summary["needs_review_rate"]["reference"] = _rate(reference, "needs_review")
        summary["unfamiliar_rate"]["reference"] = _rate(reference, "unfamiliar")
        summary["class_mix"]["reference"] = _class_mix(reference)
    if n_current < monitoring.min_rows:
        summary["reasons"].append(
            f"not enough data: {n_current} prediction{'s' if n_current != 1 else ''} in the last {window:g} days, "
            f"fewer than monitoring.min_rows={monitoring.min_rows}; nothing compared"
        )
        if reference is None:
            summary["reasons"].append("no reference either: run the evaluate stage (dvc repro evaluate)")
        return DriftResult(summary)
    if reference is None or n_reference == 0:
        raise DriftError(
            "no reference predictions to compare with: the evaluate stage writes them "
            "(reports/test_predictions.parquet, logged to the training's MLflow run); run dvc repro evaluate"
        )

    names = list(classes) if classes else classes_of(reference)
    ref_proba = probability_matrix(reference, names) if names else np.zeros((n_reference, 0))
    projection = ProbaProjection.fit(ref_proba, names) if names and len(ref_proba) > 1 else None
    ref, cur = drift_frame(reference, projection), drift_frame(current, projection)
    columns = [c for c in (*CATEGORICAL_COLUMNS, *NUMERICAL_COLUMNS) if _usable(c, ref, cur)]
    summary["columns_left_out"] = [
        c for c in (*CATEGORICAL_COLUMNS, *NUMERICAL_COLUMNS) if c not in columns
    ]  # unknown on one side

    snapshot, per_column = _run_evidently(ref[columns], cur[columns], columns, monitoring.drift_share)
    summary["columns"] = per_column
    drifted = [c for c in columns if per_column[c]["drifted"]]
    share = len(drifted) / len(columns) if columns else 0.0
    summary["drifted_columns"] = drifted
    summary["drift_share"] = round(share, 4)

    reasons: list[str] = []
    by_share = share >= monitoring.drift_share
    reasons.append(
        f"{len(drifted)} of {len(columns)} columns drifted ({share:.0%}; "
        f"{'at or above' if by_share else 'below'} monitoring.drift_share={monitoring.drift_share:g})"
        + (f": {', '.join(drifted)}" if drifted else "")
    )
    rates = summary["needs_review_rate"]
    by_review = False
    if rates["reference"] is not None and rates["current"] is not None:
        rise = rates["current"] - rates["reference"]
        by_review = rise > monitoring.review_rate_increase
        reasons.append(
            f"needs_review rate {_pct(rates['reference'])} on the reference, {_pct(rates['current'])} now "
            f"({rise * 100:+.0f} points; {'more' if by_review else 'not more'} than "
            f"monitoring.review_rate_increase={monitoring.review_rate_increase:g})"
        )
    if "label" in drifted:
        reasons.append(_class_mix_sentence(summary["class_mix"]))
    summary["status"] = "drift" if by_share or by_review else "no_drift"
    reasons.insert(0, "drift: the recent predictions differ from the reference" if summary["status"] == "drift"
                   else "no drift: the recent predictions look like the reference")  # fmt: skip
    summary["reasons"] = reasons
    return DriftResult(summary, snapshot, columns)


def _class_mix_sentence(mix: Mapping[str, Mapping[str, float]]) -> str:
    """The class whose share moved most, in words."""
    ref, cur = mix["reference"], mix["current"]
    moved = max(set(ref) | set(cur), key=lambda c: abs(cur.get(c, 0.0) - ref.get(c, 0.0)))
    return (
        f"class mix changed most for {moved}: {ref.get(moved, 0.0):.0%} of the reference, {cur.get(moved, 0.0):.0%} now"
    )


def _run_evidently(
    reference: pd.DataFrame, current: pd.DataFrame, columns: Sequence[str], drift_share: float
) -> tuple[Any, dict[str, dict[str, Any]]]:
    """Evidently's DataDriftPreset with its tests; per column: method, score, threshold, drifted."""
    _import_evidently()
    from evidently import DataDefinition, Dataset, Report
    from evidently.presets import DataDriftPreset

    definition = DataDefinition(
        numerical_columns=[c for c in columns if c in NUMERICAL_COLUMNS],
        categorical_columns=[c for c in columns if c in CATEGORICAL_COLUMNS],
    )
    report = Report([DataDriftPreset(columns=list(columns), drift_share=drift_share)], include_tests=True)
    with warnings.catch_warnings():  # constant columns (e.g. one image size) make NumPy warn in correlations
        warnings.simplefilter("ignore", RuntimeWarning)
        snapshot = report.run(
            reference_data=Dataset.from_pandas(reference, data_definition=definition),
            current_data=Dataset.from_pandas(current, data_definition=definition),
        )
    data = snapshot.dict()
    per_column: dict[str, dict[str, Any]] = {}
    for test in data.get("tests", []):
        params = test.get("metric_config", {}).get("params", {})
        column = params.get("column")
        if params.get("type", "").endswith("ValueDrift") and column in columns:
            per_column[column] = {"method": params.get("method"), "threshold": params.get("threshold"),
                                  "drifted": str(test.get("status", "")).endswith("FAIL")}  # fmt: skip
    for metric in data.get("metrics", []):
        config = metric.get("config", {})
        column = config.get("column")
        if config.get("type", "").endswith("ValueDrift") and column in per_column:
            score = metric.get("value")
            per_column[column]["score"] = (
                round(float(score), 6) if isinstance(score, int | float) and math.isfinite(score) else None
            )
    missing = [c for c in columns if c not in per_column]
    if missing:
        raise DriftError(f"Evidently returned no drift test for {missing}")
    return snapshot, per_column
