"""Prefect artifacts of a pipeline run: metrics table, validation summary, registry decision, MLflow run link.

The report files are the steps' own (one name each, in emassist).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from emassist.model import testset
from emassist.pipeline import register, validate

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
