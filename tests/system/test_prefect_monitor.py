"""The ``sem-monitor`` deployment on a real Prefect server and worker (127.0.0.1): the monitoring step and the
retraining decision are the real ones, on a real prediction log (SQLite) and MLflow store (SQLite); only the
pipeline the retraining would run is a cheap stand-in (``EMASSIST_PIPELINE_FLOW``) that logs an MLflow run with
the training's own tags (:func:`emassist.model.tracking.run_tags`) instead of training.

Below ``monitoring.retrain_min_corrections`` the flow run completes with "nothing to do" and starts no retraining;
at the threshold the ``sem-retrain`` child flow run starts, and its result and its MLflow run name the trigger.

Run alone: ``pytest -m prefect tests/system/test_prefect_monitor.py``.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from emassist.data.predlog import PredictionLog
from tests.helpers import copy_repo
from tests.servers import VENV_BIN, free_port, server_env, start_process, stop_process, wait_http
from tests.system.test_prefect_orchestration import stop_worker

pytestmark = [pytest.mark.slow, pytest.mark.prefect]

THRESHOLD = 3
QUIET_CRON = "0 0 1 1 *"
STANDIN = '''"""Stand-in for the pipeline in a retraining: one MLflow run with the training's tags, no training."""

import mlflow
from prefect import flow

from emassist.config.settings import load_params
from emassist.model.tracking import run_tags, setup_mlflow


@flow(name="stand-in-pipeline")
def pipeline(params_path: str = "params.yaml") -> dict:
    params = load_params(params_path)
    setup_mlflow(params)
    with mlflow.start_run(run_name="stand-in training") as run:
        mlflow.set_tags(run_tags(params))
    return {"run_id": run.info.run_id}
'''


@dataclass
class Stack:
    tmp: Path
    repo: Path
    prefect_url: str
    log_db: str
    mlflow_uri: str
    storage: Path
    logs: dict[str, Path]

    def tail(self) -> str:
        return "\n".join(f"--- {name}\n{path.read_text(errors='replace')[-4000:]}" for name, path in self.logs.items())

    @contextlib.contextmanager
    def client(self) -> Iterator[Any]:
        from prefect import get_client

        with self.settings(), get_client(sync_client=True) as c:
            yield c

    def settings(self) -> Any:
        from prefect.settings import PREFECT_API_URL, PREFECT_LOCAL_STORAGE_PATH, temporary_settings

        return temporary_settings({PREFECT_API_URL: self.prefect_url, PREFECT_LOCAL_STORAGE_PATH: self.storage})

    def result(self, flow_run: Any) -> Any:
        with self.settings():
            return flow_run.state.result()

    def run_deployment(self, name: str) -> Any:
        from prefect.deployments import run_deployment

        env = {"EMASSIST_PIPELINE_FLOW": "standin_pipeline.py:pipeline"}
        with self.settings():
            return run_deployment(name, timeout=300, poll_interval=1, as_subflow=False, job_variables={"env": env})

    def retrain_runs(self, *, children: bool = True) -> list[Any]:
        """Flow runs of sem-retrain that started: children of a monitor run, or (``children=False``) the others."""
        from prefect.client.schemas.filters import FlowFilter, FlowFilterName

        with self.client() as client:
            runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["sem-retrain"])))
        return [r for r in runs if (r.parent_task_run_id is not None) == children and not r.state.is_scheduled()]

    def artifacts(self, flow_run_id: Any) -> dict[str, str]:
        with self.client() as client:
            return {a.key: str(a.data) for a in client.read_artifacts() if a.flow_run_id == flow_run_id}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("prefect-monitor")
    with contextlib.ExitStack() as exits:
        port = free_port()
        prefect_url = f"http://127.0.0.1:{port}/api"
        storage = tmp / "results"
        env = server_env(
            PREFECT_HOME=str(tmp / "prefect-home"),
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            PREFECT_API_URL=prefect_url,
            PREFECT_WORKER_QUERY_SECONDS="1",
            PREFECT_LOCAL_STORAGE_PATH=str(storage),
            GIT_PYTHON_REFRESH="quiet",
        )
        for var in ("EMASSIST_FAULTS", "MLFLOW_TRACKING_URI", "EMASSIST_MONITORING_DB_URI", "EMASSIST_PIPELINE_FLOW"):
            env.pop(var, None)
        logs = {"prefect-server": tmp / "prefect-server.log"}
        server = start_process([str(VENV_BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port",
                                str(port)], logs["prefect-server"], env)  # fmt: skip
        exits.callback(stop_process, server)
        log_db, mlflow_uri = f"sqlite:///{tmp / 'log.db'}", f"sqlite:///{tmp / 'mlflow.db'}"
        repo = copy_repo(tmp / "repo", overrides={
            "monitoring": {"db_uri": log_db, "retrain_min_corrections": THRESHOLD, "min_rows": 5,
                           "monitor_cron": QUIET_CRON},
            "mlflow": {"tracking_uri": mlflow_uri},
            # crons that do not fire while the test runs: the worker must pick up only the runs the test starts
            "orchestration": {"retries": 0, "connect_timeout_s": 3, "retrain_cron": QUIET_CRON},
        })  # fmt: skip
        (repo / "standin_pipeline.py").write_text(STANDIN)
        s = Stack(tmp, repo, prefect_url, log_db, mlflow_uri, storage, logs)
        wait_http(f"{prefect_url}/health", server, logs["prefect-server"])

        from prefect.client.schemas.actions import WorkPoolCreate
        from prefect.workers.process import ProcessWorker

        with s.client() as client:  # `prefect work-pool create NAME --type process`
            for pool in ("cpu", "gpu"):
                template = ProcessWorker.get_default_base_job_template()
                client.create_work_pool(WorkPoolCreate(name=pool, type="process", base_job_template=template))
        done = subprocess.run([sys.executable, "-m", "pipelines.deploy"], cwd=repo, env=env, capture_output=True,
                              text=True, timeout=120)  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        logs["worker"] = tmp / "worker.log"
        with contextlib.chdir(repo):
            worker = start_process([str(VENV_BIN / "prefect"), "worker", "start", "--pool", "cpu"], logs["worker"],
                                   {**env, "EMASSIST_REPO": str(repo)})  # fmt: skip
        exits.callback(stop_worker, worker)
        yield s


def add_corrections(stack: Stack, n: int, start: int) -> None:
    store = PredictionLog(stack.log_db)
    for i in range(start, start + n):
        store.add_correction(f"{i:064x}", "Nanowires", old_label="Particles", who="test", ts=datetime.now(UTC))
    store.dispose()


def test_monitor_deployment_is_on_its_cron(stack: Stack) -> None:
    import yaml

    params = yaml.safe_load((stack.repo / "params.yaml").read_text())
    with stack.client() as client:
        monitor = client.read_deployment_by_name("sem-monitor/monitor")
        schedules = client.read_deployment_schedules(monitor.id)
    assert params["monitoring"]["monitor_cron"] == QUIET_CRON  # the copy's, from params (the checkout's is hourly)
    assert monitor.work_pool_name == params["orchestration"]["pipeline_pool"]
    assert [(s.schedule.cron, s.schedule.timezone) for s in schedules] == [
        (params["monitoring"]["monitor_cron"], params["orchestration"]["timezone"])
    ]
    assert monitor.entrypoint == "pipelines/flows.py:monitor_flow"


def test_below_the_threshold_nothing_to_do(stack: Stack) -> None:
    add_corrections(stack, THRESHOLD - 1, start=0)
    flow_run = stack.run_deployment("sem-monitor/monitor")
    assert flow_run.state.is_completed(), f"{flow_run.state}\n{stack.tail()}"
    result = stack.result(flow_run)
    assert result["result"] == "nothing to do"
    decision = result["decision"]
    assert (decision["run"], decision["trigger"], decision["n_new_corrections"]) == (False, "none", THRESHOLD - 1)
    assert decision["drift_status"] == "not_enough_data"  # the real monitoring step, on a log with no predictions
    assert any(f"{THRESHOLD - 1} newly corrected images since the beginning of the log" in r and
               f"< the threshold monitoring.retrain_min_corrections={THRESHOLD}" in r
               for r in result["reasons"]), result["reasons"]  # fmt: skip
    assert stack.retrain_runs() == []
    artifacts = stack.artifacts(flow_run.id)
    assert "**nothing to do**" in artifacts["retrain-decision"]
    assert "**not_enough_data**" in artifacts["drift-summary"]
    assert (stack.repo / "reports/monitoring/drift.json").is_file()


def test_at_the_threshold_the_retraining_runs_and_names_its_trigger(stack: Stack) -> None:
    from mlflow import MlflowClient

    add_corrections(stack, 1, start=THRESHOLD - 1)  # now THRESHOLD corrected images
    flow_run = stack.run_deployment("sem-monitor/monitor")
    assert flow_run.state.is_completed(), f"{flow_run.state}\n{stack.tail()}"
    result = stack.result(flow_run)
    assert result["result"] == "retrained" and result["trigger"] == "corrections"

    children = stack.retrain_runs()
    assert len(children) == 1, children
    child = children[0]
    assert child.state.is_completed()
    with stack.client() as client:
        parent_task = client.read_task_run(child.parent_task_run_id)
    assert parent_task.flow_run_id == flow_run.id  # a child of this monitor flow run
    assert child.parameters["trigger"] == "corrections"
    assert child.parameters["data_diff"]["new_corrections"] == THRESHOLD
    child_result = stack.result(child)
    assert child_result["trigger"] == "corrections" and child_result["reasons"] == result["reasons"]
    assert "**trigger: corrections**" in stack.artifacts(child.id)["retrain-trigger"]
    assert "**retrain — trigger: corrections**" in stack.artifacts(flow_run.id)["retrain-decision"]

    # The training's MLflow run (here the stand-in's) carries the trigger, the reasons and the data difference.
    run = MlflowClient(stack.mlflow_uri).get_run(child_result["run_id"])
    tags = run.data.tags
    assert tags["retrain_trigger"] == "corrections"
    assert f"{THRESHOLD} newly corrected images" in tags["retrain_reasons"]
    assert tags["retrain_new_corrections"] == str(THRESHOLD) and tags["retrain_added_images"] == str(THRESHOLD)
    assert "retrain_base_version" not in tags  # no champion yet
    assert tags["retrain_feedback_images"] == "0"  # what the next decision compares the feedback folder with


def test_scheduled_retraining_is_forced_and_says_so(stack: Stack) -> None:
    """``sem-retrain/retrain`` as its cron runs it (no parameters): it always retrains, trigger ``forced``."""
    from mlflow import MlflowClient

    flow_run = stack.run_deployment("sem-retrain/retrain")
    assert flow_run.state.is_completed(), f"{flow_run.state}\n{stack.tail()}"
    result = stack.result(flow_run)
    assert result["trigger"] == "forced" and "scheduled retraining" in result["reasons"][0]
    tags = MlflowClient(stack.mlflow_uri).get_run(result["run_id"]).data.tags
    assert tags["retrain_trigger"] == "forced" and tags["retrain_reasons"] == result["reasons"][0]
    assert "retrain_new_corrections" not in tags  # no decision behind it: no figures claimed
    assert tags["retrain_feedback_images"] == "0"
    assert [r.id for r in stack.retrain_runs(children=False)] == [flow_run.id]
