"""Prefect flows over the DVC stages: the same library steps (``emassist.pipeline.<stage>.main``) ``dvc repro`` runs.

* ``sem-pipeline`` (:func:`pipeline_flow`): acquire (only when the raw data is missing) → ingest → validate → split
  → augment → train → evaluate → register. Each step is a task with logs; steps where a retry can help (acquire,
  DVC push/pull, dispatch, fetching from MLflow, register) are retried ``orchestration.retries`` times, a
  deterministic failure (bad params, a stage refusing its input) is not. Artifacts: validation summary, metrics
  table, registry decision and a link to the MLflow run.
* ``sem-train`` (:func:`train_flow`): the train step alone, run by a worker of ``train.work_pool`` in the worker's
  own checkout. It pulls its inputs from the DVC remote, trains, and hands the model back through MLflow.
* ``sem-retrain`` (:func:`retrain_flow`): refresh the raw data (``dvc pull`` or the acquire stage), then the whole
  pipeline; the registry's gate decides whether the new model becomes champion. Deployed on a cron from params
  (forced: it always retrains). The training's MLflow run is tagged with what triggered it (``retrain_trigger``,
  ``retrain_reasons``) and what the data adds to the champion's (``retrain_base_version``,
  ``retrain_base_data_version``, ``retrain_new_corrections``, ``retrain_added_images``, ``retrain_feedback_images``).
* ``sem-monitor`` (:func:`monitor_flow`): the monitoring step (drift of the prediction log), then the retraining
  decision (:func:`emassist.pipeline.retrain.retrain_decision`): drift, enough new corrections, or forced → the
  ``sem-retrain`` flow as a child run; otherwise "nothing to do" and why (the flow's result and an artifact).
  Deployed on the cron ``monitoring.monitor_cron``.
* ``sem-batch`` (:func:`batch_flow`): ``emassist batch`` as a flow: an archive under ``src`` scored on Spark with the
  registered model (:mod:`emassist.pipeline.batch`), Parquet and the per-class summary under ``out``; the summary is
  the flow's artifact. Deployed on demand (``prefect deployment run sem-batch/batch -p src=... -p out=...``).

Run locally, no setup (Prefect starts a temporary server): ``python -m pipelines.flows [--params params.yaml]``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

# A temporary local server (no PREFECT_API_URL) runs its database migrations on first start: on a busy small machine
# that takes longer than Prefect's default 20 s.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from prefect.cache_policies import NO_CACHE

# The steps are imported here, while Prefect has the flow's working directory on sys.path, so that a worker runs the
# library code of its own checkout.
from emassist.config.settings import Params, ParamsError, load_params, params_from_dict
from emassist.data.dataset import DatasetError
from emassist.model.files import CURVES_FILE, HISTORY_FILE, MODEL_FILE, RUN_FILE
from emassist.model.registry import RegistryError
from emassist.model.tracking import setup_mlflow
from emassist.pipeline import retrain
from emassist.pipeline.stagerun import StageError, error_exit
from emassist.pipeline.steps import STEPS
from pipelines import artifacts, dvc_io, faults
from pipelines.preflight import (
    TRAIN_DEPLOYMENT,
    OrchestrationError,
    check_mlflow,
    is_remote_tracking,
    preflight,
)

#: ``path/to/file.py:flow`` or ``module:flow`` run by the retraining instead of :func:`pipeline_flow` (called with
#: ``params_path``); unset: the pipeline. For a cheap stand-in (tests) or another pipeline; the decision, the tags'
#: environment and the artifacts stay the same.
PIPELINE_FLOW_ENV = "EMASSIST_PIPELINE_FLOW"
SCHEDULED_REASON = "scheduled retraining (sem-retrain on orchestration.retrain_cron) or run by hand: always retrains"

#: Failures a retry cannot fix: bad params, a stage refusing its input, a missing file, a registry refusal.
DETERMINISTIC = (ParamsError, StageError, DatasetError, FileNotFoundError, OrchestrationError, RegistryError)


def _retry_helps(task: Any, task_run: Any, state: Any) -> bool:
    try:
        state.result()
    except DETERMINISTIC:
        return False
    except Exception:
        return True
    return True


def _retried(params: Params) -> dict[str, Any]:
    o = params.orchestration
    return {"retries": o.retries, "retry_delay_seconds": o.retry_delay_s, "retry_condition_fn": _retry_helps}


# --------------------------------------------------------------------------------------------- tasks


@task(name="preflight", cache_policy=NO_CACHE)
def preflight_task(params: Params, params_path: str) -> None:
    faults.maybe_fail("preflight")
    preflight(params, Path(params_path))
    get_run_logger().info(
        "preflight ok: MLflow %s, train %s",
        params.mlflow.resolved_tracking_uri(),
        f"on work pool {params.train.work_pool!r}" if params.train.work_pool else "in-process",
    )


@task(name="stage", cache_policy=NO_CACHE)
def stage_task(name: str, params: Params) -> None:
    """One DVC stage: exactly what ``python -m stages.<name>`` runs."""
    faults.maybe_fail(name)
    get_run_logger().info("stage %s in %s", name, Path.cwd())
    STEPS[name](params)


@task(name="dvc-commit", cache_policy=NO_CACHE)
def record_task(stage_names: list[str]) -> None:
    """Record the stages' outputs in dvc.lock and the DVC cache, as ``dvc repro`` does after each stage."""
    dvc_io.record(stage_names)
    get_run_logger().info("recorded %s in dvc.lock", ", ".join(stage_names))


@task(name="dvc-push", cache_policy=NO_CACHE)
def push_task() -> None:
    faults.maybe_fail("dvc-push")
    get_run_logger().info("pushing the training inputs (%s) to the DVC remote", ", ".join(dvc_io.TRAIN_INPUT_STAGES))
    dvc_io.push()


@task(name="dvc-pull", cache_policy=NO_CACHE)
def pull_task(stage_names: list[str]) -> None:
    faults.maybe_fail("dvc-pull")
    get_run_logger().info("pulling %s from the DVC remote into %s", ", ".join(stage_names), Path.cwd())
    dvc_io.pull(stage_names)


@task(name="dispatch-train", cache_policy=NO_CACHE)
def dispatch_task(params: Params, params_path: str) -> str:
    """Run the ``sem-train`` deployment on ``train.work_pool``; wait for it; return its flow run id."""
    from prefect.deployments import run_deployment

    faults.maybe_fail("dispatch-train")
    logger = get_run_logger()
    pool = params.train.work_pool
    logger.info("sending the train step to work pool %r (deployment %s)", pool, TRAIN_DEPLOYMENT)
    child = run_deployment(
        TRAIN_DEPLOYMENT,
        parameters={
            "params_yaml": Path(params_path).read_text(),
            "dvc_lock": Path("dvc.lock").read_text(),
            "tracking_uri": params.mlflow.resolved_tracking_uri(),
            # why this training (a retraining's trigger and reasons): the worker's MLflow run is tagged with them
            "environment": {k: v for k, v in os.environ.items() if k.startswith(retrain.ENV_PREFIX)},
        },
        timeout=params.orchestration.train_timeout_s,
        poll_interval=2,
    )
    state = child.state
    if state is None or not state.is_final():
        raise OrchestrationError(
            f"training flow run {child.name} ({child.id}) on work pool {pool!r} did not finish within "
            f"orchestration.train_timeout_s={params.orchestration.train_timeout_s:g} s (state "
            f"{state.name if state else 'unknown'}); is a worker running `prefect worker start --pool {pool}`?"
        )
    if not state.is_completed():
        raise OrchestrationError(
            f"training flow run {child.name} ({child.id}) on work pool {pool!r} ended {state.name}: {state.message}"
        )
    logger.info("training flow run %s completed on work pool %r", child.name, pool)
    return str(child.id)


@task(name="fetch-training", cache_policy=NO_CACHE)
def fetch_task(params: Params, train_flow_run_id: str) -> str:
    """The model a worker trained, from the MLflow tracking server (never from the worker's disk)."""
    import mlflow

    faults.maybe_fail("fetch-training")
    uri = setup_mlflow(params)
    runs = mlflow.search_runs(
        experiment_names=[params.mlflow.experiment],
        filter_string=f"tags.prefect_flow_run_id = '{train_flow_run_id}'",
        output_format="list",
    )
    if not runs:
        raise OrchestrationError(f"no MLflow run tagged prefect_flow_run_id={train_flow_run_id} at {uri}")
    run_id = runs[0].info.run_id
    MODEL_FILE.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="emassist-fetch-") as tmp:
        wanted = (("model/model.keras", MODEL_FILE), ("history.json", HISTORY_FILE), ("plots/training_curves.png",
                  CURVES_FILE))  # fmt: skip
        for artifact, target in wanted:
            local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact, dst_path=tmp)
            shutil.move(local, target)
    RUN_FILE.write_text(json.dumps({"run_id": run_id, "tracking_uri": uri}, indent=2))
    get_run_logger().info("fetched model of MLflow run %s from %s", run_id, uri)
    return run_id


@task(name="acquire-or-pull", cache_policy=NO_CACHE)
def refresh_raw_task(params: Params, prefer_pull: bool) -> str:
    """Raw data: ``dvc pull`` of the acquire stage's output when asked and possible, else the acquire stage."""
    faults.maybe_fail("acquire")
    logger = get_run_logger()
    if prefer_pull:
        try:
            dvc_io.pull(["acquire"])
            logger.info("pulled %s from the DVC remote", params.data.raw_dir)
            return "dvc pull"
        except dvc_io.DvcError as exc:
            logger.warning("dvc pull of the raw data failed, running the acquire stage instead: %s", exc)
    logger.info("acquire stage (data.source=%s)", params.data.source)
    STEPS["acquire"](params)
    return "acquire"


@task(name="monitor", cache_policy=NO_CACHE)
def monitor_task(params: Params) -> dict[str, Any]:
    """The monitoring step (drift of the recent prediction log against the reference): its JSON summary."""
    faults.maybe_fail("monitor")
    summary = retrain.run_monitoring(params)
    get_run_logger().info("drift check: %s (%s)", summary["status"], "; ".join(summary.get("reasons") or []))
    return summary


@task(name="retrain-decision", cache_policy=NO_CACHE)
def decide_task(params: Params, summary: dict[str, Any], force: bool) -> retrain.Decision:
    """Retrain or not: the drift summary, the corrections since the champion's data, or forced."""
    faults.maybe_fail("retrain-decision")
    check_mlflow(params, params.orchestration.connect_timeout_s)  # the registry's champion, in seconds or a clear no
    decision = retrain.retrain_decision(params, force=force, drift=summary)
    get_run_logger().info("%s", decision.summary())
    return decision


# --------------------------------------------------------------------------------------------- flows


def _raw_missing(params: Params) -> bool:
    raw = Path(params.data.raw_dir)
    return not raw.is_dir() or not any(raw.iterdir())


@flow(name="sem-pipeline", log_prints=True)
def pipeline_flow(params_path: str = "params.yaml") -> dict[str, Any]:
    """acquire? → ingest → validate → split → augment → train (here or on a work pool) → evaluate → register."""
    logger = get_run_logger()
    params = load_params(params_path)
    retried = _retried(params)
    preflight_task(params, params_path)
    bookkeeping = dvc_io.can_record(Path(params_path))
    if not bookkeeping:
        logger.warning("%s is not the repository's params.yaml: dvc.lock is left as it is", params_path)

    data_stages = ["ingest", "validate", "split", "augment"]
    if _raw_missing(params):
        refresh_raw_task.with_options(**retried)(params, prefer_pull=params.data.source == "nffa")
        data_stages.insert(0, "acquire")
    stage_task.with_options(name="ingest")("ingest", params)
    try:
        stage_task.with_options(name="validate")("validate", params)
    finally:
        report = artifacts.read_json(artifacts.VALIDATION_FILE)
        if report:
            create_markdown_artifact(artifacts.validation_markdown(report), key="validation-summary",
                                     description="Great Expectations results of this run")  # fmt: skip
    stage_task.with_options(name="split")("split", params)
    stage_task.with_options(name="augment")("augment", params)
    if bookkeeping:
        record_task(data_stages)

    if params.train.work_pool:
        push_task.with_options(**retried)()
        child = dispatch_task.with_options(**retried)(params, params_path)
        fetch_task.with_options(**retried)(params, child)
    else:
        stage_task.with_options(name="train")("train", params)

    stage_task.with_options(name="evaluate")("evaluate", params)
    metrics = artifacts.read_json(artifacts.METRICS_FILE)
    create_markdown_artifact(artifacts.metrics_markdown(metrics), key="test-metrics",
                             description="Held-out test metrics (reports/metrics.json)")  # fmt: skip

    # A retry helps when the registry was unreachable before registering; one that fails after the version was
    # created registers the model again (a new version that becomes challenger; the gate still decides champion).
    stage_task.with_options(name="register", **retried)("register", params)
    registry = artifacts.read_json(artifacts.REGISTRY_FILE)
    create_markdown_artifact(artifacts.registry_markdown(registry), key="registry-decision",
                             description="Registered version and the gate's decision")  # fmt: skip
    url = artifacts.mlflow_run_url(params.mlflow.resolved_tracking_uri(), registry["run_id"])
    if url:
        create_link_artifact(url, link_text=f"MLflow run {registry['run_id']}", key="mlflow-run",
                             description="The training run: params, curves, metrics, model")  # fmt: skip
    if bookkeeping:
        record_task(["train", "evaluate", "register"])
    logger.info("%s v%s: %s (%s)", registry["name"], registry["version"], registry["decision"], registry["reason"])
    return {"metrics": metrics, "registry": registry}


@flow(name="sem-train", log_prints=True)
def train_flow(
    params_yaml: str, dvc_lock: str, tracking_uri: str | None = None, environment: dict[str, str] | None = None
) -> str:
    """The train step on a worker: pull the inputs from the DVC remote, train, log to the MLflow server.

    Runs in the worker's own checkout (the deployment's working directory). Returns the MLflow run id; the run is
    also tagged ``prefect_flow_run_id`` with this flow run's id, which is how the pipeline finds it, and with a
    retraining's reasons (``environment``: the ``EMASSIST_RETRAIN_*`` variables of the orchestrator).
    """
    from prefect.runtime import flow_run

    logger = get_run_logger()
    params = params_from_dict(yaml.safe_load(params_yaml) or {})
    if not os.environ.get("MLFLOW_TRACKING_URI") and tracking_uri:
        os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
    if not is_remote_tracking(params.mlflow.resolved_tracking_uri()):
        raise OrchestrationError(
            f"the train deployment must log to an MLflow tracking server, not {params.mlflow.resolved_tracking_uri()}"
            ": set MLFLOW_TRACKING_URI on the worker"
        )
    check_mlflow(params, params.orchestration.connect_timeout_s)
    os.environ.setdefault("PREFECT__FLOW_RUN_ID", str(flow_run.id))
    logger.info("worker checkout: %s", Path.cwd())
    Path("dvc.lock").write_text(dvc_lock)  # the pipeline's record of the inputs: what `dvc pull` fetches
    pull_task.with_options(**_retried(params))(list(dvc_io.TRAIN_INPUT_STAGES))
    retrain_env = {k: str(v) for k, v in (environment or {}).items() if k.startswith(retrain.ENV_PREFIX)}
    with retrain.environment(retrain_env) if environment is not None else contextlib.nullcontext():
        stage_task.with_options(name="train")("train", params)
    run_id = json.loads(RUN_FILE.read_text())["run_id"]
    logger.info("MLflow run %s at %s", run_id, params.mlflow.resolved_tracking_uri())
    return run_id


def _pipeline_target() -> Any:
    """The flow a retraining runs: :func:`pipeline_flow`, or the one ``EMASSIST_PIPELINE_FLOW`` names."""
    target = os.environ.get(PIPELINE_FLOW_ENV, "").strip()
    if not target:
        return pipeline_flow
    from prefect.utilities.importtools import import_object

    try:
        return import_object(target)
    except Exception as exc:  # a missing file or name, or the script itself failing (Prefect's ScriptError)
        raise OrchestrationError(f"{PIPELINE_FLOW_ENV}={target!r}: cannot load it ({exc})") from exc


@flow(name="sem-retrain", log_prints=True, persist_result=True)
def retrain_flow(
    params_path: str = "params.yaml",
    trigger: str = "forced",
    reasons: list[str] | None = None,
    data_diff: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Retraining: fresh raw data (``dvc pull``, or the acquire stage), then the whole pipeline.

    ``trigger`` / ``reasons`` / ``data_diff`` (the champion's version and data version, new corrections, images
    added): why it runs, from the monitor flow's decision; the scheduled run is ``forced``. They tag the training's
    MLflow run (``retrain_*``) and make an artifact. Promotion happens only through the register stage's gate
    (macro-F1 against the champion on the same test split).
    """
    logger = get_run_logger()
    params = load_params(params_path)
    reasons = list(reasons or [SCHEDULED_REASON])
    data_diff = dict(data_diff or {})
    data_diff.setdefault("feedback_images", retrain.count_feedback_images(params.monitoring.feedback_dir))
    try:
        env = retrain.retrain_environment(trigger, reasons, **data_diff)
    except (TypeError, ValueError) as exc:
        raise OrchestrationError(f"retrain_flow: bad trigger or data_diff: {exc}") from exc
    create_markdown_artifact(artifacts.trigger_markdown(trigger, reasons, data_diff), key="retrain-trigger",
                             description="What started this retraining")  # fmt: skip
    logger.info("retraining, trigger %s: %s", trigger, "; ".join(reasons))
    target = _pipeline_target()
    with retrain.environment(env):
        if target is pipeline_flow:
            refresh_raw_task.with_options(**_retried(params))(params, prefer_pull=params.data.source == "nffa")
        else:
            logger.warning("%s: running %s instead of the pipeline", PIPELINE_FLOW_ENV, os.environ[PIPELINE_FLOW_ENV])
        result = target(params_path=params_path)
    return {**(result if isinstance(result, dict) else {"result": result}), "trigger": trigger, "reasons": reasons,
            "data_diff": data_diff}  # fmt: skip


@flow(name="sem-monitor", log_prints=True, persist_result=True)
def monitor_flow(params_path: str = "params.yaml", force: bool = False) -> dict[str, Any]:
    """Drift check, then retrain only with a reason: drift, enough new corrections, or ``force``.

    Artifacts: the drift summary (and a link to the HTML report where it is served) and the decision. The result
    says ``retrained`` (with the retraining's result) or ``nothing to do``, with the decision and its reasons.
    """
    logger = get_run_logger()
    params = load_params(params_path)
    retried = _retried(params)
    summary = monitor_task.with_options(**retried)(params)
    create_markdown_artifact(artifacts.drift_markdown(summary), key="drift-summary",
                             description="The monitoring step's drift summary")  # fmt: skip
    url = artifacts.drift_report_url(summary, params.mlflow.resolved_tracking_uri())
    if url:
        create_link_artifact(url, link_text="drift report (HTML)", key="drift-report",
                             description="Evidently: recent predictions against the reference")  # fmt: skip
    decision = decide_task.with_options(**retried)(params, summary, force)
    create_markdown_artifact(artifacts.decision_markdown(decision), key="retrain-decision",
                             description="Retrain or not, and why")  # fmt: skip
    outcome: dict[str, Any] = {"decision": decision.as_dict(), "reasons": decision.reasons}
    if not decision.run:
        logger.info("nothing to do: %s", "; ".join(decision.reasons))
        return {**outcome, "result": "nothing to do"}
    logger.info("retraining, trigger %s", decision.trigger)
    result = retrain_flow(params_path=params_path, trigger=decision.trigger, reasons=decision.reasons,
                          data_diff=decision.data_diff())  # fmt: skip
    return {**outcome, "result": "retrained", "trigger": decision.trigger, "retrain": result}


@task(name="spark-batch", cache_policy=NO_CACHE)
def batch_task(params: Params, src: str, out: str, model: str | None, master: str | None) -> dict[str, Any]:
    """The Spark job (not retried: it is long, and a failure it reports is the input's or the model's)."""
    from emassist.pipeline.batch import run_batch  # lazy: pyspark only for this flow

    logger = get_run_logger()
    report = run_batch(params, src, out, model=model, master=master, progress=False, announce=logger.info)
    for line in report.lines():
        logger.info("%s", line)
    return dataclasses.asdict(report)


@flow(name="sem-batch", log_prints=True)
def batch_flow(
    src: str, out: str, model: str | None = None, master: str | None = None, params_path: str = "params.yaml"
) -> dict[str, Any]:
    """Score every image under ``src`` on Spark (``emassist batch``); Parquet and summary.csv under ``out``.

    ``model``: default the champion; ``master``: default ``SPARK_MASTER``, else ``batch.master``. The result is the
    run's report (counts, model version, timings); the per-class summary is a markdown artifact."""
    params = load_params(params_path)
    report = batch_task(params, src, out, model, master)
    rows = ["| class | files | mean confidence | needs review |", "|---|---:|---:|---:|"]
    rows += [f"| {r['class']} | {r['files']} | {r['mean_confidence']} | {r['needs_review']} |"
             for r in report["summary"]]  # fmt: skip
    notice = f"\n\n**{report['notice']}**" if report.get("notice") else ""
    create_markdown_artifact(f"Batch {src} → {report['predictions']} with {report['model_uri']} "
                             f"(version {report['model_version'] or '-'})\n\n" + "\n".join(rows) + notice,
                             key="batch-summary", description="emassist batch: files per class")  # fmt: skip
    return report


FLOWS = {"pipeline": pipeline_flow, "retrain": retrain_flow, "monitor": monitor_flow}


# --------------------------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.flows",
        description="Run the SEM pipeline as a Prefect flow. Without PREFECT_API_URL Prefect starts a temporary "
        "local server; with it, the run shows in that server's UI. train.work_pool sends training to a work pool.",
    )
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file (default: params.yaml)")
    parser.add_argument("--flow", choices=sorted(FLOWS), default="pipeline",
                        help="pipeline (default), retrain (refresh the raw data first, then the pipeline) or monitor "
                             "(drift check, then retrain only with a reason)")  # fmt: skip
    parser.add_argument("--force", action="store_true", help="monitor: retrain whatever the drift and corrections say")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.force and args.flow != "monitor":
        return error_exit(OrchestrationError("--force goes with --flow monitor (retrain always retrains)"), args.params)
    logging.basicConfig(level=os.environ.get("EMASSIST_LOG", "INFO"), format="%(levelname)s %(name)s: %(message)s")
    try:
        params = load_params(args.params)
        preflight(params, args.params)  # before Prefect's own clients, which retry for minutes
    except (ParamsError, OrchestrationError) as exc:
        return error_exit(exc, args.params)
    kwargs: dict[str, Any] = {"force": True} if args.force else {}
    state = FLOWS[args.flow](params_path=str(args.params), return_state=True, **kwargs)
    if not state.is_completed():
        print(f"error: flow run {state.name}: {state.message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
