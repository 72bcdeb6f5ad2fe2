"""The monitoring step: the last ``monitoring.window_days`` of the prediction log against the champion's reference.

Not a DVC stage: it reads the live log, which changes with every request. :func:`main`

1. reads the predictions of the window from the log (:class:`~emassist.data.predlog.PredictionLog` on
   ``monitoring.resolved_db_uri()``);
2. takes the reference: the champion's answers on its test split, the artifact ``evaluation/test_predictions.parquet``
   of the champion version's run in MLflow; else (no champion, no artifact, MLflow unreachable) the local
   ``reports/test_predictions.parquet`` the evaluate stage wrote; the summary says which and why;
3. compares them (:func:`emassist.model.drift.drift_report`), writes ``reports/monitoring/drift.html`` and
   ``reports/monitoring/drift.json``;
4. logs both to MLflow, in a run of the experiment ``<mlflow.experiment>-monitoring`` (metrics ``drift_share``,
   ``needs_review_rate_reference`` / ``_current``, ``n_current``, ``n_reference``; tag ``status``). A tracking
   server that cannot be reached does not lose the report: a warning, and ``mlflow_run_id`` is null.

It returns the summary (the JSON's content, plus ``reference`` and ``mlflow_run_id``).
"""

from __future__ import annotations

import logging
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from emassist.config.settings import Params
from emassist.data.predlog import PredictionLog
from emassist.model.drift import REFERENCE_ARTIFACT, REFERENCE_FILE, DriftResult, classes_of, drift_report
from emassist.model.tracking import ARTIFACT_DIR, process_tags, tracking_client

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)
REPORT_DIR = Path("reports/monitoring")
HTML_FILE = REPORT_DIR / "drift.html"
JSON_FILE = REPORT_DIR / "drift.json"
STAGE = "monitor"


def monitoring_experiment(params: Params) -> str:
    """The MLflow experiment of the monitoring runs."""
    return f"{params.mlflow.experiment}-monitoring"


def load_reference(params: Params) -> tuple[pd.DataFrame | None, str]:
    """(the reference frame or None, where it came from / why there is none)."""
    import pandas as pd  # lazy: the CLI's other commands should not wait for pandas / MLflow

    name = params.mlflow.registered_model
    try:
        client = tracking_client(params)
        version = client.get_model_version_by_alias(name, "champion")
        with tempfile.TemporaryDirectory(prefix="emassist-reference-") as tmp:
            path = client.download_artifacts(version.run_id, REFERENCE_ARTIFACT, tmp)
            frame = pd.read_parquet(path)
        return frame, f"champion {name} version {version.version} (run {version.run_id}): {REFERENCE_ARTIFACT}"
    except Exception as exc:  # no champion, no artifact, an unreachable server: fall back to the local file
        message = getattr(exc, "message", None) or str(exc)
        why = f"{type(exc).__name__}: {message.splitlines()[0] if message else ''}"[:300]
    log.info("no champion reference from MLflow (%s): using %s", why, REFERENCE_FILE)
    if REFERENCE_FILE.is_file():
        return pd.read_parquet(REFERENCE_FILE), f"{REFERENCE_FILE} (the champion's was not available: {why})"
    return None, f"none: the champion's was not available ({why}) and {REFERENCE_FILE} does not exist"


def read_window(params: Params, window_days: float, now: datetime) -> pd.DataFrame:
    """The logged predictions of the last ``window_days`` before ``now``."""
    store = PredictionLog(params.monitoring.resolved_db_uri())
    try:
        return store.predictions(since=now - timedelta(days=window_days))
    finally:
        store.dispose()


def main(params: Params, *, window_days: float | None = None, now: datetime | None = None) -> dict[str, Any]:
    """Compare the recent log with the reference, write the HTML and JSON, log them to MLflow; the summary."""
    window = float(params.monitoring.window_days if window_days is None else window_days)
    if not window > 0:
        raise ValueError(f"window_days must be > 0, got {window_days!r}")
    now = now or datetime.now(UTC)
    current = read_window(params, window, now)
    reference, where = load_reference(params)
    named = set(classes_of(reference)) if reference is not None else set()
    classes = [c for c in params.data.classes if c in named] or None  # params' order; None: the reference's own
    result = drift_report(reference, current, params.monitoring, window_days=window, classes=classes, now=now)
    result.summary["reference"] = where
    result.summary["mlflow_run_id"] = _log_to_mlflow(params, result)
    result.save_html(HTML_FILE)
    result.save_json(JSON_FILE)
    return result.summary


def _log_to_mlflow(params: Params, result: DriftResult) -> str | None:
    """One run in ``<experiment>-monitoring`` with the figures and both files; None (and a warning) on failure."""
    import mlflow  # lazy: importing MLflow takes seconds

    summary = result.summary
    rates = summary["needs_review_rate"]
    metrics = {"n_current": summary["n_current"], "n_reference": summary["n_reference"],
               "drift_share": summary["drift_share"], "needs_review_rate_reference": rates["reference"],
               "needs_review_rate_current": rates["current"]}  # fmt: skip
    try:
        uri = params.mlflow.resolved_tracking_uri()
        mlflow.set_tracking_uri(uri)
        name = monitoring_experiment(params)
        experiment = mlflow.get_experiment_by_name(name)
        if experiment is None:  # a local store keeps artifacts beside the database, as the training's experiment
            location = ARTIFACT_DIR.resolve().as_uri() if uri.startswith(("sqlite:", "file:")) else None
            experiment_id = mlflow.create_experiment(name, artifact_location=location)
        else:
            experiment_id = experiment.experiment_id
        tags = {**process_tags(STAGE), "status": summary["status"], "reference": summary["reference"][:500]}
        with (
            mlflow.start_run(experiment_id=experiment_id, run_name=f"monitor-{summary['generated']}", tags=tags) as run,
            tempfile.TemporaryDirectory(prefix="emassist-monitor-") as tmp,
        ):
            mlflow.log_params({"window_days": summary["window_days"], "min_rows": params.monitoring.min_rows,
                               "drift_share_threshold": params.monitoring.drift_share,
                               "review_rate_increase": params.monitoring.review_rate_increase})  # fmt: skip
            mlflow.log_metrics({k: float(v) for k, v in metrics.items() if v is not None})
            summary["mlflow_run_id"] = run.info.run_id
            html_path = result.save_html(Path(tmp) / HTML_FILE.name)
            json_path = result.save_json(Path(tmp) / JSON_FILE.name)
            mlflow.log_artifact(str(html_path), artifact_path="monitoring")
            mlflow.log_artifact(str(json_path), artifact_path="monitoring")
            return str(run.info.run_id)
    except Exception as exc:  # the report is written locally whatever happens to the tracking server
        log.warning("monitoring report not logged to MLflow (%s): %s", type(exc).__name__, exc)
        summary["mlflow_run_id"] = None
        return None
