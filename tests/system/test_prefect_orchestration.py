"""Prefect orchestration with real processes on 127.0.0.1: a Prefect server, an MLflow tracking server, two work
pools (``cpu``, ``gpu``) each served by a ``prefect worker`` in ITS OWN copy of the repository, a DVC remote in a
folder outside both copies. The pipeline deployment runs in the orchestrator's copy and sends training to the ``gpu``
worker, whose copy gets its inputs only from the DVC remote and returns the model only through MLflow.

Run alone: ``pytest -m prefect``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers import copy_repo, tiny_params
from tests.servers import (
    VENV_BIN,
    free_port,
    mlflow_tracking_server,
    server_env,
    start_process,
    stop_process,
    wait_http,
)

pytestmark = [pytest.mark.slow, pytest.mark.prefect]

TINY: dict[str, dict[str, Any]] = {
    "demo": {"n_images": 120, "width": 64, "height": 64, "min_per_class": 8},
    "ingest": {"cache_size": 32, "workers": 1},
    "validate": {"min_per_class": 5},
    "augment": {"target_per_class": 8},
    "train": {"model": "simple_cnn", "image_size": 32, "epochs": 1, "batch_size": 16, "work_pool": "gpu"},
    "orchestration": {"retries": 1, "retry_delay_s": 1, "train_timeout_s": 600, "connect_timeout_s": 3},
}


def prefect_params(**overrides: dict[str, Any]) -> dict[str, Any]:
    """params.yaml with :data:`TINY`'s sections merged in (a section of ``overrides`` replaces TINY's)."""
    return tiny_params({**TINY, **overrides})


def stop_worker(proc: subprocess.Popen[bytes]) -> None:
    """A Prefect worker ignores SIGTERM for a long while; SIGINT stops it (then the group, whatever is left)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(20)
    stop_process(proc, timeout=5)


@dataclass
class Stack:
    tmp: Path
    prefect_url: str
    mlflow_url: str
    orchestrator: Path
    worker: Path
    remote: Path
    env: dict[str, str]
    logs: dict[str, Path]

    def tail(self) -> str:
        return "\n".join(f"--- {name}\n{path.read_text(errors='replace')[-4000:]}" for name, path in self.logs.items())

    def run(self, *cmd: str, cwd: Path | None = None, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run(list(cmd), cwd=cwd or self.orchestrator, env={**self.env, **env}, capture_output=True,
                              text=True, timeout=timeout)  # fmt: skip


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("prefect-stack")
    home = tmp / "prefect-home"
    remote = tmp / "dvc-remote"  # outside both copies: the only way data travels between them
    remote.mkdir()
    with contextlib.ExitStack() as stack:
        port = free_port()
        prefect_url = f"http://127.0.0.1:{port}/api"
        env = server_env(
            PREFECT_HOME=str(home),
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            PREFECT_API_URL=prefect_url,
            PREFECT_WORKER_QUERY_SECONDS="1",
            GIT_PYTHON_REFRESH="quiet",
        )
        env.pop("EMASSIST_FAULTS", None)
        env.pop("MLFLOW_TRACKING_URI", None)
        logs = {"prefect-server": tmp / "prefect-server.log"}
        server = start_process([str(VENV_BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port",
                                str(port)], logs["prefect-server"], env)  # fmt: skip
        stack.callback(stop_process, server)
        mlflow_url = stack.enter_context(mlflow_tracking_server(tmp))  # starts while Prefect's server migrates
        env["MLFLOW_TRACKING_URI"] = mlflow_url
        wait_http(f"{prefect_url}/health", server, logs["prefect-server"])

        orchestrator = copy_repo(tmp / "orchestrator", params=prefect_params(), dvc_remote=remote, site_cache=True)
        worker = copy_repo(tmp / "gpu-worker", params=prefect_params(), dvc_remote=remote, site_cache=True)
        s = Stack(tmp, prefect_url, mlflow_url, orchestrator, worker, remote, env, logs)
        from prefect.client.schemas.actions import WorkPoolCreate
        from prefect.workers.process import ProcessWorker

        with _client(s) as client:  # what `prefect work-pool create NAME --type process` does
            for pool in ("cpu", "gpu"):
                template = ProcessWorker.get_default_base_job_template()
                client.create_work_pool(WorkPoolCreate(name=pool, type="process", base_job_template=template))
        done = s.run(sys.executable, "-m", "pipelines.deploy")
        assert done.returncode == 0, done.stdout + done.stderr
        for pool, checkout in (("cpu", orchestrator), ("gpu", worker)):
            logs[f"worker-{pool}"] = tmp / f"worker-{pool}.log"
            with contextlib.chdir(checkout):
                proc = start_process([str(VENV_BIN / "prefect"), "worker", "start", "--pool", pool],
                                     logs[f"worker-{pool}"], {**env, "EMASSIST_REPO": str(checkout)})  # fmt: skip
            stack.callback(stop_worker, proc)
        yield s


def _client(stack: Stack) -> Any:
    from prefect import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    @contextlib.contextmanager
    def client() -> Iterator[Any]:
        with temporary_settings({PREFECT_API_URL: stack.prefect_url}), get_client(sync_client=True) as c:
            yield c

    return client()


def _run_deployment(stack: Stack, name: str, timeout: float = 600, **kwargs: Any) -> Any:
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: stack.prefect_url}):
        return run_deployment(name, timeout=timeout, poll_interval=2, as_subflow=False, **kwargs)


def _model_versions(stack: Stack) -> list[Any]:
    from mlflow import MlflowClient

    client = MlflowClient(stack.mlflow_url)
    return list(client.search_model_versions("name = 'sem-classifier'"))


def _task_runs(stack: Stack, flow_run_id: Any) -> list[Any]:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with _client(stack) as client:
        return client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))


def _flow_run_logs(stack: Stack, flow_run_id: Any) -> str:
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    with _client(stack) as client:
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    return "\n".join(log.message for log in logs)


# --------------------------------------------------------------------------------------------- deployments


def test_deployments_carry_params(stack: Stack) -> None:
    params = yaml.safe_load((stack.orchestrator / "params.yaml").read_text())
    with _client(stack) as client:
        retrain = client.read_deployment_by_name("sem-retrain/retrain")
        train = client.read_deployment_by_name("sem-train/train")
        pipeline = client.read_deployment_by_name("sem-pipeline/pipeline")
        schedules = client.read_deployment_schedules(retrain.id)
    assert [(s.schedule.cron, s.schedule.timezone) for s in schedules] == [
        (params["orchestration"]["retrain_cron"], params["orchestration"]["timezone"])
    ]
    assert train.work_pool_name == "gpu" and pipeline.work_pool_name == retrain.work_pool_name == "cpu"
    assert train.pull_steps == [
        {"prefect.deployments.steps.set_working_directory": {"directory": "{{ $EMASSIST_REPO }}"}}
    ]

    # `prefect deploy --all` from the repository root declares the same, cron included (prefect.yaml agrees).
    done = stack.run(str(VENV_BIN / "prefect"), "--no-prompt", "deploy", "--all")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    with _client(stack) as client:
        again = client.read_deployment_by_name("sem-retrain/retrain")
        schedules = client.read_deployment_schedules(again.id)
        train_again = client.read_deployment_by_name("sem-train/train")
    assert again.id == retrain.id
    assert [s.schedule.cron for s in schedules] == [params["orchestration"]["retrain_cron"]]
    assert train_again.pull_steps == train.pull_steps


# --------------------------------------------------------------------------------------------- the full flow


def test_pipeline_trains_on_gpu_pool_and_registers(stack: Stack) -> None:
    from mlflow import MlflowClient

    # the worker's checkout holds no pipeline data (only the tracked data/feedback placeholder): it must dvc pull
    present = sorted(p.relative_to(stack.worker).as_posix() for p in (stack.worker / "data").rglob("*") if p.is_file())
    assert present in ([], ["data/feedback/README.md"]), present
    flow_run = _run_deployment(stack, "sem-pipeline/pipeline", job_variables={"env": {"EMASSIST_FAULTS": "register=1"}})
    assert flow_run.state.is_completed(), f"{flow_run.state}\n{_flow_run_logs(stack, flow_run.id)}\n{stack.tail()}"

    # The train step ran as the train deployment, on the gpu pool, in the worker's own copy.
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    with _client(stack) as client:
        train_dep = client.read_deployment_by_name("sem-train/train")
        train_runs = client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[train_dep.id]))
        )
        artifacts = client.read_artifacts()
    assert len(train_runs) == 1 and train_runs[0].state.is_completed()
    assert train_runs[0].work_pool_name == "gpu"
    train_logs = _flow_run_logs(stack, train_runs[0].id)
    assert f"worker checkout: {stack.worker}" in train_logs
    # Its inputs came from the DVC remote (the worker's copy had no data before) ...
    for name in ("train", "val", "test"):
        assert (stack.worker / f"data/splits/{name}.csv").read_bytes() == (
            stack.orchestrator / f"data/splits/{name}.csv"
        ).read_bytes()
    assert any(stack.remote.rglob("*")), "nothing was pushed to the DVC remote"

    # ... and its model came back through MLflow: the run it logged is the one registered.
    client = MlflowClient(stack.mlflow_url)
    runs = client.search_runs(
        [client.get_experiment_by_name("sem-classifier").experiment_id],
        filter_string=f"tags.prefect_flow_run_id = '{train_runs[0].id}'",
    )
    assert len(runs) == 1
    run = runs[0]
    assert "test_macro_f1" in run.data.metrics  # evaluate (on the orchestrator) logged into the worker's run
    versions = _model_versions(stack)
    assert [v.run_id for v in versions] == [run.info.run_id]
    model = client.get_registered_model("sem-classifier")
    assert model.aliases == {"champion": versions[0].version, "challenger": versions[0].version}
    assert client.get_model_version("sem-classifier", versions[0].version).tags["gate_decision"] == "promoted"
    assert (stack.orchestrator / "models/model.keras").read_bytes() == (
        stack.worker / "models/model.keras"
    ).read_bytes()

    # The register step failed once (injected) and was retried.
    tasks = {t.name.rsplit("-", 1)[0]: t for t in _task_runs(stack, flow_run.id)}
    assert tasks["register"].run_count == 2 and tasks["register"].state.is_completed()
    assert tasks["dispatch-train"].state.is_completed()
    assert "injected fault in step 'register'" in _flow_run_logs(stack, flow_run.id)
    # Artifacts for the UI: metrics table, validation summary, registry decision, link to the MLflow run.
    keys = {a.key for a in artifacts if a.flow_run_id == flow_run.id}
    assert {"test-metrics", "validation-summary", "registry-decision", "mlflow-run"} <= keys
    link = next(a for a in artifacts if a.key == "mlflow-run" and a.flow_run_id == flow_run.id)
    assert f"({stack.mlflow_url}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id})" in link.data


def test_step_that_keeps_failing_fails_the_flow_run(stack: Stack) -> None:
    """The scheduled retraining deployment, run now, with its data refresh failing on every attempt."""
    before = len(_model_versions(stack))
    params = prefect_params(data={"raw_dir": "data/raw-new"}, train={**TINY["train"], "work_pool": None})
    (stack.orchestrator / "fault.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    flow_run = _run_deployment(
        stack,
        "sem-retrain/retrain",
        parameters={"params_path": "fault.yaml"},
        job_variables={"env": {"EMASSIST_FAULTS": "acquire=always"}},
    )
    assert flow_run.state.is_failed(), flow_run.state
    assert "injected fault in step 'acquire'" in (flow_run.state.message or "") + _flow_run_logs(stack, flow_run.id)
    tasks = {t.name.rsplit("-", 1)[0]: t for t in _task_runs(stack, flow_run.id)}
    assert tasks["acquire-or-pull"].run_count == 2  # the first attempt and orchestration.retries = 1 retry
    assert "ingest" not in tasks
    assert len(_model_versions(stack)) == before


def test_deployment_run_with_unknown_pool_fails_in_preflight(stack: Stack) -> None:
    before = len(_model_versions(stack))
    params = prefect_params(train={**TINY["train"], "work_pool": "no-such-pool"})
    (stack.orchestrator / "nopool.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    flow_run = _run_deployment(stack, "sem-pipeline/pipeline", timeout=120, parameters={"params_path": "nopool.yaml"})
    assert flow_run.state.is_failed(), flow_run.state
    logs = _flow_run_logs(stack, flow_run.id)
    assert "no-such-pool" in (flow_run.state.message or "") + logs
    tasks = {t.name.rsplit("-", 1)[0]: t for t in _task_runs(stack, flow_run.id)}
    assert tasks["preflight"].run_count == 1 and set(tasks) == {"preflight"}  # not retried, nothing else ran
    assert len(_model_versions(stack)) == before  # nothing registered


# --------------------------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("unknown-pool", "work pool 'no-such-pool' not found"),
        ("prefect-down", "Prefect server unreachable at PREFECT_API_URL=http://127.0.0.1:"),
        ("mlflow-down", "MLflow tracking server unreachable at http://127.0.0.1:"),
    ],
)
def test_bad_inputs_fail_fast_with_a_clear_error(stack: Stack, case: str, expected: str) -> None:
    before = len(_model_versions(stack))
    env: dict[str, str] = {}
    if case == "unknown-pool":
        params = prefect_params(train={**TINY["train"], "work_pool": "no-such-pool"})
    else:
        params = prefect_params()
        key = "PREFECT_API_URL" if case == "prefect-down" else "MLFLOW_TRACKING_URI"
        env[key] = f"http://127.0.0.1:{free_port()}" + ("/api" if case == "prefect-down" else "")
    (stack.orchestrator / f"{case}.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    started = time.monotonic()
    done = stack.run(sys.executable, "-m", "pipelines.flows", "--params", f"{case}.yaml", timeout=120, **env)
    elapsed = time.monotonic() - started
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-2000:]
    assert expected in done.stderr, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert elapsed < 60, f"took {elapsed:.0f} s"  # a hang guard, not a benchmark: the checks time out in 3 s
    assert len(_model_versions(stack)) == before
