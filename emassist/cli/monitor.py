"""``emassist monitor [--window-days N]``: the drift report of the recent prediction log.

Compares the last ``monitoring.window_days`` (or ``--window-days``) of the prediction log with the champion's answers
on its test split (:mod:`emassist.pipeline.monitor`), writes ``reports/monitoring/drift.html`` and ``drift.json``,
logs them to MLflow and prints the summary's sentences. Exit codes: 0 no drift or not enough data, 2 drift (so a
scheduler can act on it), 1 an error (e.g. the log store cannot be opened; a bad params value is 2, as everywhere).
"""

from __future__ import annotations

import argparse
import math

from emassist.config.settings import load_params
from emassist.pipeline.monitor import HTML_FILE, JSON_FILE, main

EXIT_DRIFT = 2


def _window(text: str) -> float:
    """A positive number of days."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"need a number of days, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"need a number of days > 0, got {text!r}")
    return value


def _cmd_monitor(args: argparse.Namespace) -> int:
    summary = main(load_params(args.params), window_days=args.window_days)
    print(f"status: {summary['status']} ({summary['n_current']} predictions in the last "
          f"{summary['window_days']:g} days, {summary['n_reference']} reference)")  # fmt: skip
    for sentence in summary["reasons"]:
        print(f"  {sentence}")
    print(f"reference: {summary['reference']}")
    run_id = summary.get("mlflow_run_id")
    print(f"wrote {HTML_FILE} and {JSON_FILE}; " + (f"MLflow run {run_id}" if run_id else "not logged to MLflow"))
    return EXIT_DRIFT if summary["status"] == "drift" else 0


def add_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register ``emassist monitor``."""
    p = sub.add_parser(
        "monitor",
        help="drift report: the recent prediction log against the champion's test answers (exit 2 on drift)",
        description="Compare the last monitoring.window_days of the prediction log with the champion's answers on "
        "its test split; write reports/monitoring/drift.html and drift.json and log them to MLflow. "
        "Exit 0: no drift or not enough data; 2: drift; 1: an error.",
    )
    p.add_argument("--window-days", type=_window, metavar="N",
                   help="days of the log to compare (default: monitoring.window_days)")  # fmt: skip
    p.set_defaults(func=_cmd_monitor)
