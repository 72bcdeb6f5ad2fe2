"""Checks made before any work: the Prefect API, the MLflow server and the train work pool answer, within seconds.

Prefect's and MLflow's own clients retry a lost connection for a long time (minutes, with backoff); these checks
ask each service once with a short timeout, so a wrong address or a missing pool is a one-line error at once.
"""

from __future__ import annotations

import os
from pathlib import Path

import requests

from emassist.config.settings import Params

#: Deployment names (``flow-name/deployment-name``), shared by pipelines/deploy.py and prefect.yaml.
PIPELINE_DEPLOYMENT = "sem-pipeline/pipeline"
TRAIN_DEPLOYMENT = "sem-train/train"
RETRAIN_DEPLOYMENT = "sem-retrain/retrain"


class OrchestrationError(RuntimeError):
    """The orchestration cannot start or go on; the message says why and what to do."""


def prefect_api_url() -> str | None:
    """The configured Prefect API (None: Prefect starts its own temporary local server)."""
    from prefect.settings import PREFECT_API_URL

    return os.environ.get("PREFECT_API_URL") or PREFECT_API_URL.value() or None


def _check_health(server: str, url: str, shown: str, hint: str, timeout: float) -> None:
    """GET ``url``/health: a one-line :class:`OrchestrationError` naming ``server`` unless it answers 200."""
    try:
        response = requests.get(f"{url.rstrip('/')}/health", timeout=timeout)
    except requests.RequestException as exc:
        raise OrchestrationError(f"{server} unreachable at {shown} ({type(exc).__name__}): {hint}") from exc
    if response.status_code != 200:
        raise OrchestrationError(f"{server} at {url} answered /health with HTTP {response.status_code}")


def check_prefect_api(timeout: float) -> str | None:
    url = prefect_api_url()
    if not url:
        return None
    _check_health(
        "Prefect server",
        url,
        f"PREFECT_API_URL={url}",
        "start it with `prefect server start` or unset PREFECT_API_URL to run on a temporary local server",
        timeout,
    )
    return url


def is_remote_tracking(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def check_mlflow(params: Params, timeout: float) -> str:
    uri = params.mlflow.resolved_tracking_uri()
    if not is_remote_tracking(uri):
        return uri
    _check_health(
        "MLflow tracking server",
        uri,
        uri,
        "start it (see mlflow/README.md) or point MLFLOW_TRACKING_URI / mlflow.tracking_uri at a running one",
        timeout,
    )
    return uri


def check_work_pool(pool: str) -> None:
    from prefect import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(pool)
        except ObjectNotFound as exc:
            names = sorted(p.name for p in client.read_work_pools())
            raise OrchestrationError(
                f"work pool {pool!r} not found on the Prefect server (train.work_pool; known: "
                f"{', '.join(names) or 'none'}); create it with `prefect work-pool create {pool} --type process`"
            ) from exc
        try:
            deployment = client.read_deployment_by_name(TRAIN_DEPLOYMENT)
        except ObjectNotFound as exc:
            raise OrchestrationError(
                f"deployment {TRAIN_DEPLOYMENT!r} not found: deploy it with `python -m pipelines.deploy` "
                "(or `prefect deploy --all`)"
            ) from exc
    if deployment.work_pool_name != pool:
        raise OrchestrationError(
            f"deployment {TRAIN_DEPLOYMENT!r} runs on work pool {deployment.work_pool_name!r}, but train.work_pool is "
            f"{pool!r}: redeploy with `python -m pipelines.deploy`"
        )


def check_dispatch(params: Params, params_path: Path) -> None:
    """What sending the train step to a work pool needs beside the pool itself."""
    uri = params.mlflow.resolved_tracking_uri()
    if not is_remote_tracking(uri):
        raise OrchestrationError(
            f"train.work_pool is {params.train.work_pool!r} but MLflow tracks to {uri}, which the worker cannot "
            "reach: set MLFLOW_TRACKING_URI (or mlflow.tracking_uri) to a tracking server"
        )
    if params_path.resolve() != Path("params.yaml").resolve():
        raise OrchestrationError(
            f"train.work_pool needs the repository's params.yaml (DVC records and pushes the inputs under it), "
            f"not {params_path}"
        )


def preflight(params: Params, params_path: Path) -> None:
    """All checks, cheapest first; raises :class:`OrchestrationError` on the first that fails."""
    timeout = params.orchestration.connect_timeout_s
    check_prefect_api(timeout)
    check_mlflow(params, timeout)
    if params.train.work_pool:
        if not prefect_api_url():
            raise OrchestrationError(
                f"train.work_pool is {params.train.work_pool!r} but no Prefect server is configured: set "
                "PREFECT_API_URL (workers only see a real server) or set train.work_pool to null to train in-process"
            )
        check_work_pool(params.train.work_pool)
        check_dispatch(params, params_path)
