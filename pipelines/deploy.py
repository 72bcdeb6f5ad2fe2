"""Deploy the flows to a Prefect server from params.yaml, and keep prefect.yaml in step with it.

``python -m pipelines.deploy`` creates (or updates) five deployments on the server named by ``PREFECT_API_URL``:

=========================  ==============================  =====================================================
deployment                 work pool                       when
=========================  ==============================  =====================================================
``sem-pipeline/pipeline``  ``orchestration.pipeline_pool``  on demand (``prefect deployment run ...``)
``sem-train/train``        ``train.work_pool``             sent by the pipeline when ``train.work_pool`` is set
``sem-retrain/retrain``    ``orchestration.pipeline_pool``  cron ``orchestration.retrain_cron`` (always retrains)
``sem-monitor/monitor``    ``orchestration.pipeline_pool``  cron ``monitoring.monitor_cron`` (retrains with a reason)
``sem-batch/batch``        ``orchestration.pipeline_pool``  on demand, ``-p src=... -p out=...`` (Spark batch scoring)
=========================  ==============================  =====================================================

Every deployment runs in the worker's own checkout of this repository: the pull step changes to the directory in
the worker's environment variable ``EMASSIST_REPO`` (``scripts/ec2-user-data.sh`` sets it). ``prefect deploy --all``
from the repository root reads ``prefect.yaml``, which declares the same; ``--check`` says where it and params
disagree.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from emassist.config.settings import Params, ParamsError, load_params
from emassist.pipeline.stagerun import error_exit
from pipelines.preflight import (
    PIPELINE_DEPLOYMENT,
    RETRAIN_DEPLOYMENT,
    TRAIN_DEPLOYMENT,
    OrchestrationError,
    check_prefect_api,
    prefect_api_url,
)

PREFECT_YAML = Path("prefect.yaml")
REPO_ENV = "EMASSIST_REPO"
PULL_STEPS: list[dict[str, Any]] = [
    {"prefect.deployments.steps.set_working_directory": {"directory": "{{ $" + REPO_ENV + " }}"}}
]
DEFAULT_TRAIN_POOL = "gpu"
MONITOR_DEPLOYMENT = "sem-monitor/monitor"
BATCH_DEPLOYMENT = "sem-batch/batch"


@dataclass(frozen=True)
class Spec:
    full_name: str  # flow-name/deployment-name
    entrypoint: str
    pool: str
    cron: str | None
    description: str

    @property
    def flow_name(self) -> str:
        return self.full_name.split("/")[0]

    @property
    def name(self) -> str:
        return self.full_name.split("/")[1]


def specs(params: Params) -> list[Spec]:
    o = params.orchestration
    return [
        Spec(PIPELINE_DEPLOYMENT, "pipelines/flows.py:pipeline_flow", o.pipeline_pool, None,
             "The whole pipeline on demand: acquire? ingest validate split augment train evaluate register"),
        Spec(TRAIN_DEPLOYMENT, "pipelines/flows.py:train_flow", params.train.work_pool or DEFAULT_TRAIN_POOL, None,
             "The train step on a GPU worker: inputs from the DVC remote, outputs to the MLflow server"),
        Spec(RETRAIN_DEPLOYMENT, "pipelines/flows.py:retrain_flow", o.pipeline_pool, o.retrain_cron,
             "Scheduled retraining: fresh data, the whole pipeline, promotion only through the registry gate"),
        Spec(MONITOR_DEPLOYMENT, "pipelines/flows.py:monitor_flow", o.pipeline_pool, params.monitoring.monitor_cron,
             "Drift check of the prediction log; retrains only on drift, enough new corrections, or force"),
        Spec(BATCH_DEPLOYMENT, "pipelines/flows.py:batch_flow", o.pipeline_pool, None,
             "Archive-scale scoring on Spark with the registered model: -p src=... -p out=... (emassist batch)"),
    ]  # fmt: skip


def _flow(entrypoint: str) -> Any:
    from pipelines import flows

    return getattr(flows, entrypoint.split(":")[1])


def deploy(params: Params) -> dict[str, str]:
    """Create or update the deployments; returns ``{full name: deployment id}``."""
    from prefect import get_client
    from prefect.client.schemas.actions import DeploymentScheduleCreate
    from prefect.client.schemas.schedules import CronSchedule
    from prefect.exceptions import ObjectNotFound
    from prefect.utilities.callables import parameter_schema

    if not prefect_api_url():
        raise OrchestrationError("PREFECT_API_URL is not set: deployments need a running Prefect server")
    check_prefect_api(params.orchestration.connect_timeout_s)
    ids: dict[str, str] = {}
    with get_client(sync_client=True) as client:
        for spec in specs(params):
            try:
                client.read_work_pool(spec.pool)
            except ObjectNotFound as exc:
                raise OrchestrationError(
                    f"work pool {spec.pool!r} (for {spec.full_name}) not found: create it with "
                    f"`prefect work-pool create {spec.pool} --type process`"
                ) from exc
            flow_obj = _flow(spec.entrypoint)
            cron = CronSchedule(cron=spec.cron, timezone=params.orchestration.timezone) if spec.cron else None
            schedules = [DeploymentScheduleCreate(schedule=cron, active=True)] if cron else []
            # Updating a deployment keeps its schedules: drop the old ones so the cron is always params'.
            try:
                existing = client.read_deployment_by_name(spec.full_name)
                for old in client.read_deployment_schedules(existing.id):
                    client.delete_deployment_schedule(existing.id, old.id)
            except ObjectNotFound:
                pass
            deployment_id = client.create_deployment(
                flow_id=client.create_flow_from_name(spec.flow_name),
                name=spec.name,
                work_pool_name=spec.pool,
                entrypoint=spec.entrypoint,
                pull_steps=PULL_STEPS,
                schedules=schedules,
                parameter_openapi_schema=parameter_schema(flow_obj).model_dump_for_openapi(),
                description=spec.description,
                tags=["emassist"],
            )
            ids[spec.full_name] = str(deployment_id)
    return ids


def yaml_differences(params: Params, prefect_yaml: Path = PREFECT_YAML) -> list[str]:
    """Where prefect.yaml disagrees with params (pools, cron, entrypoints, pull step); empty when in step."""
    config = yaml.safe_load(prefect_yaml.read_text()) or {}
    declared = {d.get("name"): d for d in config.get("deployments") or []}
    problems = []
    if config.get("pull") != PULL_STEPS:
        problems.append(f"pull: expected {PULL_STEPS}, found {config.get('pull')}")
    for spec in specs(params):
        d = declared.get(spec.name)
        if d is None:
            problems.append(f"deployment {spec.name!r} missing")
            continue
        if d.get("entrypoint") != spec.entrypoint:
            problems.append(f"{spec.name}.entrypoint: {d.get('entrypoint')!r}, params/code say {spec.entrypoint!r}")
        pool = (d.get("work_pool") or {}).get("name")
        if pool != spec.pool:
            problems.append(f"{spec.name}.work_pool.name: {pool!r}, params say {spec.pool!r}")
        crons = [(s.get("cron"), s.get("timezone")) for s in d.get("schedules") or []]
        want = [(spec.cron, params.orchestration.timezone)] if spec.cron else []
        if crons != want:
            problems.append(f"{spec.name}.schedules: {crons}, params say {want}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.deploy",
        description="Create or update the Prefect deployments (pipeline, train, retrain, monitor, batch) from "
        "params.yaml on the server named by PREFECT_API_URL.",
    )
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file (default: params.yaml)")
    parser.add_argument("--check", action="store_true", help="only compare prefect.yaml with params; exit 1 if apart")
    args = parser.parse_args(argv)
    try:
        params = load_params(args.params)
        if args.check:
            problems = yaml_differences(params)
            for problem in problems:
                print(f"prefect.yaml: {problem}", file=sys.stderr)
            print("prefect.yaml agrees with params" if not problems else "prefect.yaml and params disagree")
            return 1 if problems else 0
        for name, deployment_id in deploy(params).items():
            print(f"{name}: {deployment_id}")
    except (ParamsError, OrchestrationError) as exc:
        return error_exit(exc, args.params)
    return 0


if __name__ == "__main__":
    sys.exit(main())
