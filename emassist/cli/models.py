"""``emassist predict | promote | rollback | models list | models card``: batch prediction, the model registry's
aliases and each version's model card.

Wired into ``emassist.cli.main`` with ``add_commands(sub)``; each command reads ``args.params``
and returns an exit code.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from emassist.config.settings import load_params
from emassist.model.tracking import tracking_client

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from emassist.data.predlog import LogWriter
    from emassist.serve.predlog_hooks import ModelIdentity

CHAMPION_URI = "models:/{name}@champion"


# The commands import the serving/registry modules inside their functions: those pull in MLflow (seconds), and
# `emassist --help` and the other commands should not wait for it.


def _registry_errors(func: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Registry failures (unknown version, unreachable server, ...) as one line and exit code 1."""

    @functools.wraps(func)
    def wrapper(args: argparse.Namespace) -> int:
        from mlflow.exceptions import MlflowException

        from emassist.model.registry import RegistryError

        try:
            return func(args)
        except (MlflowException, RegistryError) as exc:
            print(f"error: {getattr(exc, 'message', None) or exc}", file=sys.stderr)
            return 1

    return wrapper


def _registry(args: argparse.Namespace) -> tuple[str, MlflowClient]:
    """(mlflow.registered_model, an MlflowClient on the configured tracking URI) from ``--params``."""
    params = load_params(args.params)
    return params.mlflow.registered_model, tracking_client(params)


def _cmd_predict(args: argparse.Namespace) -> int:
    from mlflow.exceptions import MlflowException

    from emassist.serve.predict import load_model, predict_paths, top_k, training_data_lines

    params = load_params(args.params)
    tracking_client(params)  # models:/ URIs resolve against the configured tracking URI
    model = args.model or CHAMPION_URI.format(name=params.mlflow.registered_model)
    try:
        predictor, config = load_model(model, params)
    except MlflowException as exc:
        print(f"error: cannot load model {model}: {exc.message}", file=sys.stderr)
        return 1
    for line in training_data_lines(config):  # what the model was trained on, before any answer
        print(line, file=sys.stderr)
    writer = open_prediction_log(params, args)
    try:
        frame = predict_paths(
            args.paths,
            predictor,
            params=params,
            out=args.out,
            batch_size=args.batch_size,
            progress=False if args.no_progress else None,
            log_writer=writer,
            model_identity=_model_identity(model) if writer is not None else None,
        )
    except MlflowException as exc:
        print(f"error: model {model} failed to predict: {exc.message}", file=sys.stderr)
        return 1
    finally:
        close_prediction_log(writer)
    classes = [c for c in params.data.classes if c in frame.columns] or [
        c for c in frame.columns if c not in ("path", "label", "confidence", "error")
    ]
    if args.top_k > 0:
        for line in top_k(frame, classes, args.top_k):
            print(line)
    n_bad = int(frame["error"].astype(bool).sum())
    review = ""
    if "needs_review" in frame.columns and len(frame) > n_bad:
        ok = ~frame["error"].astype(bool)
        n_review = int(frame.loc[ok, "needs_review"].astype(bool).sum())
        n_unfamiliar = int(frame.loc[ok, "unfamiliar"].astype(bool).sum())
        review = f"; {n_review} to check by eye ({n_unfamiliar} unlike the training data)"
    print(f"{len(frame) - n_bad} predicted, {n_bad} failed; wrote {args.out}{review}", file=sys.stderr)
    if len(frame) == 0 or n_bad == len(frame):
        return 1
    return 3 if n_bad else 0


def open_prediction_log(params: Any, args: argparse.Namespace) -> LogWriter | None:
    """The prediction log's writer when ``monitoring.log_predictions`` and no ``--no-log``; a store that cannot be
    opened costs one warning on stderr (the predictions are still printed and written)."""
    if getattr(args, "no_log", False) or not params.monitoring.log_predictions:
        return None
    from emassist.serve.predlog_hooks import open_writer

    writer, why = open_writer(params.monitoring.resolved_db_uri(), params.monitoring, check_now=True)
    if writer is None:
        print(f"warning: {why}; predictions are not logged (--no-log skips the log)", file=sys.stderr)
    return writer


def close_prediction_log(writer: LogWriter | None) -> None:
    """Flush and close the writer before the command exits; rows it could not write are said once."""
    if writer is None:
        return
    writer.close()
    if writer.stats["dropped"]:
        print(f"warning: {writer.stats['dropped']} predictions could not be logged to {writer.store.db_uri}",
              file=sys.stderr)  # fmt: skip


def _model_identity(model: str) -> ModelIdentity:
    """Name/version/alias of ``model`` for the log (an alias's version is looked up in the registry)."""
    from mlflow import MlflowClient

    from emassist.serve.predlog_hooks import ModelIdentity

    return ModelIdentity.from_uri(model, MlflowClient() if str(model).startswith("models:/") else None)


@_registry_errors
def _cmd_promote(args: argparse.Namespace) -> int:
    from emassist.model.registry import promote

    name, client = _registry(args)
    previous = promote(name, str(args.version), client=client)
    print(f"{name}: champion is now version {args.version} (was {previous or 'none'})")
    return 0


@_registry_errors
def _cmd_rollback(args: argparse.Namespace) -> int:
    from emassist.model.registry import rollback

    name, client = _registry(args)
    current, previous = rollback(name, client=client)
    print(f"{name}: champion rolled back from version {current or 'none'} to {previous}")
    return 0


@_registry_errors
def _cmd_models_list(args: argparse.Namespace) -> int:
    from emassist.model.registry import list_versions

    name, client = _registry(args)
    frame = list_versions(name, client=client)
    if frame.empty:
        print(f"{name}: no registered versions (run `dvc repro register`)")
        return 0
    if args.format == "csv":
        frame.to_csv(sys.stdout, index=False)
    elif args.format == "json":
        print(frame.to_json(orient="records", date_format="iso", indent=2))
    else:
        shown = frame.assign(created=frame["created"].dt.strftime("%Y-%m-%d %H:%M"), run_id=frame["run_id"].str[:12])
        print(shown.to_string(index=False, na_rep="-"))
    return 0


@_registry_errors
def _cmd_models_card(args: argparse.Namespace) -> int:
    from emassist.model.card import card_markdown

    name, client = _registry(args)
    print(card_markdown(client, name, args.version), end="")
    return 0


def add_commands(sub: Any) -> None:
    """Add ``predict``, ``promote``, ``rollback`` and ``models`` to an ``add_subparsers()`` object."""
    p = sub.add_parser(
        "predict",
        help="classify image files, folders (recursive) or globs with the champion model; write a CSV",
        description=(
            "Classify SEM images with a registered model (default: the champion) through the same decode → "
            "data-bar crop → resize path as training and serving. Unreadable or non-image files get a row with "
            "an error instead of stopping the run. Before the results it says (on stderr) what the model was "
            "trained on, with a notice when that was the synthetic demo data. Every answered file is appended to "
            "the prediction log (monitoring.db_uri, EMASSIST_MONITORING_DB_URI overrides) when "
            "monitoring.log_predictions is true; a log that cannot be opened costs one warning, not the run."
        ),
        epilog=(
            "Exit codes: 0 all files predicted; 3 some files failed (see the error column); 1 none predicted. "
            "Example: emassist predict data/new/ 'scans/**/*.tif' --out preds.csv --top-k 3"
        ),
    )
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files, folders (searched recursively) or globs")
    p.add_argument(
        "--model",
        help="models:/NAME@ALIAS, models:/NAME/VERSION, a model folder or a .keras file "
        "(default: models:/<mlflow.registered_model>@champion)",
    )
    p.add_argument("--out", type=Path, default=Path("predictions.csv"), help="CSV to write (default: %(default)s)")
    p.add_argument("--top-k", type=int, default=3, help="classes printed per image; 0 prints nothing (default: 3)")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-log", action="store_true",
                   help="do not append the answers to the prediction log (monitoring.db_uri)")  # fmt: skip
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser(
        "promote",
        help="make a registered version the champion (the one served)",
        description=(
            "Point the 'champion' alias of mlflow.registered_model at VERSION, bypassing the gate. "
            "The replaced champion is remembered, so `emassist rollback` undoes this."
        ),
    )
    p.add_argument("--version", required=True, type=int, metavar="N", help="model version to promote")
    p.set_defaults(func=_cmd_promote)

    p = sub.add_parser(
        "rollback",
        help="move the champion back to the previous champion",
        description=(
            "Point 'champion' at the version it pointed to before its last move (model tag previous_champion). "
            "Rolling back twice returns to where you started."
        ),
    )
    p.set_defaults(func=_cmd_rollback)

    p = sub.add_parser(
        "models",
        help="inspect the model registry (models list, models card)",
        description="Inspect the registered versions of mlflow.registered_model and their model cards.",
    )
    models_sub = p.add_subparsers(dest="models_command", metavar="SUBCOMMAND", required=True)
    q = models_sub.add_parser(
        "list",
        help="list versions with aliases, test macro-F1 and gate decision",
        description="List every registered version, newest first: aliases, test macro-F1, gate decision, run.",
    )
    q.add_argument("--format", choices=("table", "csv", "json"), default="table", help="output format (default: table)")
    q.set_defaults(func=_cmd_models_list)
    q = models_sub.add_parser(
        "card",
        help="print a version's model card (markdown)",
        description=(
            "Print the model card of one registered version: intended use and limits, the training data (a "
            "notice when it is the synthetic demo data), data version and split protocol, test metrics and "
            "per-class precision/recall/F1, the most confused pairs, calibration (ECE/NLL before and after), "
            "abstention (review threshold, coverage), the gate decision, training params and code commit. "
            "The card written when the version was registered is printed; a version registered before cards "
            "existed gets one generated now from its MLflow run (figures it lacks read 'not recorded')."
        ),
        epilog="Examples: emassist models card 3 · emassist models card champion > card.md. "
        "Exit codes: 0 printed; 1 no such version or alias, or the registry is unreachable.",
    )
    q.add_argument("version", metavar="VERSION", help="a version number (see `emassist models list`) or an alias "
                   "(champion, challenger)")  # fmt: skip
    q.set_defaults(func=_cmd_models_card)
