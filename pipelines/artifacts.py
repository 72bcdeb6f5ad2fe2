"""Prefect artifacts of the flows: metrics table, validation summary, registry decision, MLflow run link (pipeline);
drift summary, retraining decision and what triggered a retraining (monitor, retrain).

The report files are the steps' own (one name each, in emassist).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from emassist.model import testset
from emassist.pipeline import register, validate
from emassist.pipeline.retrain import Decision

METRICS_FILE = testset.METRICS_FILE
VALIDATION_FILE = validate.REPORT_DIR / "validation.json"
REGISTRY_FILE = register.REPORT


def metrics_markdown(metrics: dict[str, Any]) -> str:
    rows = [f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items()]
    return "\n".join(["### Held-out test metrics", "", "| metric | value |", "|---|---:|", *rows])


def validation_markdown(report: dict[str, Any]) -> str:
    lines = [
        "### Data validation (Great Expectations)",
        "",
        f"**{'passed' if report.get('success') else 'FAILED'}**",
        "",
        "| suite | expectations | met |",
        "|---|---:|---:|",
    ]
    for name, suite in (report.get("suites") or {}).items():
        results = suite.get("results") or []
        lines.append(f"| {name} | {len(results)} | {sum(bool(r.get('success')) for r in results)} |")
    for title, key in (("Critical failures", "critical_failures"), ("Warnings", "warnings")):
        items = report.get(key) or []
        if items:
            lines += ["", f"**{title}**", "", *[f"- {item}" for item in items]]
    return "\n".join(lines)


def registry_markdown(report: dict[str, Any]) -> str:
    keys = ("name", "version", "aliases", "decision", "reason", "challenger_macro_f1", "champion_macro_f1",
            "champion_version", "basis")  # fmt: skip
    rows = [f"| {k} | {report.get(k)} |" for k in keys]
    return "\n".join(["### Registry gate", "", "| | |", "|---|---|", *rows])


def mlflow_run_url(tracking_uri: str, run_id: str) -> str | None:
    """The MLflow UI page of a run (None when the store is a local file or database, which has no UI address)."""
    if not tracking_uri.startswith(("http://", "https://")):
        return None
    import mlflow

    experiment_id = mlflow.MlflowClient(tracking_uri).get_run(run_id).info.experiment_id
    return f"{tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def drift_markdown(summary: dict[str, Any]) -> str:
    """The drift summary: status, its reasons, then its other plain figures."""
    lines = ["### Drift check", "", f"**{summary.get('status')}**", ""]
    lines += [f"- {r}" for r in summary.get("reasons") or []]
    figures = {k: v for k, v in summary.items() if k not in ("status", "reasons") and isinstance(v, str | int | float)}
    if figures:
        lines += ["", "| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in figures.items()]]
    return "\n".join(lines)


def drift_report_url(summary: dict[str, Any], tracking_uri: str) -> str | None:
    """Where the HTML drift report can be opened: the summary's ``html_url``, else the MLflow run it was logged to
    (when the tracking store is a server); None when it is only a local file."""
    url = summary.get("html_url")
    if isinstance(url, str) and url.startswith(("http://", "https://")):
        return url
    run_id = summary.get("mlflow_run_id")
    if not isinstance(run_id, str) or not run_id:
        return None
    try:
        return mlflow_run_url(tracking_uri, run_id)
    except Exception:  # the tracking server went away since the report was logged: no link, the summary stays
        return None


def decision_markdown(decision: Decision) -> str:
    """Retrain or not, the trigger, the reasons and the figures behind them."""
    d = decision
    head = f"retrain — trigger: {d.trigger}" if d.run else "nothing to do"
    champion_feedback = "-" if d.champion_feedback_images is None else d.champion_feedback_images
    rows = [
        ("drift status", d.drift_status),
        ("newly corrected images", f"{d.n_new_corrections} (threshold {d.threshold})"),
        ("conflicting images (not counted)", d.conflicting),
        ("champion", f"v{d.champion_version}" if d.champion_version else "none yet"),
        ("champion data version", d.champion_data_version or "-"),
        ("corrections counted since", d.since.isoformat() if d.since else "the beginning of the log"),
        ("feedback images now / at the champion", f"{d.feedback_images} / {champion_feedback}"),
        ("images added by corrections", d.added_images),
    ]
    return "\n".join(["### Retraining decision", "", f"**{head}**", "", *[f"- {r}" for r in d.reasons], "",
                      "| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows]])  # fmt: skip


def trigger_markdown(trigger: str, reasons: list[str], data_diff: dict[str, Any]) -> str:
    """What started a retraining (the tags its MLflow run gets)."""
    rows = [f"| {k} | {v} |" for k, v in data_diff.items() if v is not None]
    return "\n".join(["### Why this retraining", "", f"**trigger: {trigger}**", "", *[f"- {r}" for r in reasons],
                      *(["", "| | |", "|---|---|", *rows] if rows else [])])  # fmt: skip
