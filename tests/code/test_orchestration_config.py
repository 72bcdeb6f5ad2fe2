"""Orchestration settings, prefect.yaml against params, fault injection and the retry rule (no servers)."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest
import yaml

from emassist.config.settings import ParamsError, load_params, params_from_dict
from tests.conftest import REPO_ROOT


def test_prefect_yaml_agrees_with_params() -> None:
    from pipelines.deploy import yaml_differences

    params = load_params(REPO_ROOT / "params.yaml")
    assert yaml_differences(params, REPO_ROOT / "prefect.yaml") == []
    assert params.orchestration.retrain_cron == "0 3 * * 1"  # weekly by default


def test_monitor_deployment_runs_on_the_monitoring_cron() -> None:
    from pipelines.deploy import MONITOR_DEPLOYMENT, specs

    params = load_params(REPO_ROOT / "params.yaml")
    by_name = {s.full_name: s for s in specs(params)}
    monitor = by_name[MONITOR_DEPLOYMENT]
    assert (monitor.entrypoint, monitor.pool, monitor.cron) == (
        "pipelines/flows.py:monitor_flow",
        params.orchestration.pipeline_pool,
        params.monitoring.monitor_cron,
    )
    assert params.monitoring.monitor_cron == "0 * * * *"  # hourly by default
    assert by_name["sem-retrain/retrain"].cron == params.orchestration.retrain_cron  # the weekly one stays


def test_monitor_cron_out_of_step_is_reported(tmp_path: Path) -> None:
    from pipelines.deploy import yaml_differences

    config = yaml.safe_load((REPO_ROOT / "prefect.yaml").read_text())
    config["deployments"] = [d for d in config["deployments"] if d["name"] != "monitor"]
    (tmp_path / "prefect.yaml").write_text(yaml.safe_dump(config))
    raw = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    assert yaml_differences(params_from_dict(raw), tmp_path / "prefect.yaml") == ["deployment 'monitor' missing"]
    config = yaml.safe_load((REPO_ROOT / "prefect.yaml").read_text())
    (tmp_path / "prefect.yaml").write_text(yaml.safe_dump(config))
    raw["monitoring"]["monitor_cron"] = "*/15 * * * *"
    problems = yaml_differences(params_from_dict(raw), tmp_path / "prefect.yaml")
    assert problems == ["monitor.schedules: [('0 * * * *', 'UTC')], params say [('*/15 * * * *', 'UTC')]"]


def test_force_goes_with_the_monitor_flow() -> None:
    # Imported outside the redirection: Prefect's and MLflow's log handlers keep the stream they found at import.
    from pipelines.flows import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["--params", str(REPO_ROOT / "params.yaml"), "--flow", "retrain", "--force"])
    assert code == 1
    assert "error: --force goes with --flow monitor (retrain always retrains)" in err.getvalue()


def test_retraining_refuses_a_bad_stand_in(monkeypatch: pytest.MonkeyPatch) -> None:
    from pipelines.flows import PIPELINE_FLOW_ENV, _pipeline_target, pipeline_flow
    from pipelines.preflight import OrchestrationError

    monkeypatch.delenv(PIPELINE_FLOW_ENV, raising=False)
    assert _pipeline_target() is pipeline_flow
    monkeypatch.setenv(PIPELINE_FLOW_ENV, "no_such_file.py:pipeline")
    with pytest.raises(OrchestrationError, match=r"EMASSIST_PIPELINE_FLOW='no_such_file\.py:pipeline': cannot load"):
        _pipeline_target()


def test_prefect_yaml_out_of_step_is_reported(tmp_path: Path) -> None:
    from pipelines.deploy import yaml_differences

    config = yaml.safe_load((REPO_ROOT / "prefect.yaml").read_text())
    retrain = next(d for d in config["deployments"] if d["name"] == "retrain")
    retrain["schedules"][0]["cron"] = "0 4 * * *"
    (tmp_path / "prefect.yaml").write_text(yaml.safe_dump(config))
    raw = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    raw["train"]["work_pool"] = "a100"
    problems = yaml_differences(params_from_dict(raw), tmp_path / "prefect.yaml")
    assert any("retrain.schedules" in p and "0 3 * * 1" in p for p in problems), problems
    assert any("train.work_pool.name: 'gpu', params say 'a100'" in p for p in problems), problems


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("retrain_cron", "every monday", "orchestration.retrain_cron: need a 5-field cron expression"),
        ("retrain_cron", "0 3 * *", "orchestration.retrain_cron"),
        ("retries", -1, "orchestration.retries: must be >= 0"),
        ("train_timeout_s", 0, "orchestration.train_timeout_s: must be > 0"),
        ("pipeline_pool", " ", "orchestration.pipeline_pool: must not be empty"),
        ("nope", 1, "orchestration.nope: unknown key"),
    ],
)
def test_bad_orchestration_params_name_the_key(key: str, value: object, message: str) -> None:
    raw = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    raw["orchestration"][key] = value
    with pytest.raises(ParamsError, match=message.replace("(", r"\(").replace("*", r"\*")):
        params_from_dict(raw)


def test_fault_injection(monkeypatch: pytest.MonkeyPatch) -> None:
    from pipelines import faults

    monkeypatch.setattr(faults, "_attempts", faults.Counter())
    monkeypatch.setenv(faults.ENV, "register=1, preflight=always")
    with pytest.raises(faults.InjectedFault, match="injected fault in step 'register' \\(attempt 1"):
        faults.maybe_fail("register")
    faults.maybe_fail("register")  # the second attempt goes through
    for _ in range(3):
        with pytest.raises(OSError, match="preflight"):
            faults.maybe_fail("preflight")
    faults.maybe_fail("ingest")  # not named: nothing happens
    monkeypatch.delenv(faults.ENV)
    faults.maybe_fail("preflight")


def test_retry_only_where_it_can_help() -> None:
    from prefect.states import Failed

    from pipelines.faults import InjectedFault
    from pipelines.flows import _retry_helps
    from pipelines.preflight import OrchestrationError

    def state(exc: BaseException) -> object:
        return Failed(data=exc, message=str(exc))

    assert _retry_helps(None, None, state(InjectedFault("disk hiccup")))
    assert _retry_helps(None, None, state(ConnectionError("reset")))
    assert not _retry_helps(None, None, state(ParamsError("train.epochs: must be >= 1")))
    assert not _retry_helps(None, None, state(OrchestrationError("work pool 'x' not found")))
    assert not _retry_helps(None, None, state(FileNotFoundError("models/model.keras")))


def test_batch_deployment_runs_the_spark_job_on_demand() -> None:
    from prefect.utilities.callables import parameter_schema

    from pipelines.deploy import BATCH_DEPLOYMENT, specs
    from pipelines.flows import batch_flow

    params = load_params(REPO_ROOT / "params.yaml")
    spec = {s.full_name: s for s in specs(params)}[BATCH_DEPLOYMENT]
    assert (spec.entrypoint, spec.pool, spec.cron) == (
        "pipelines/flows.py:batch_flow",
        params.orchestration.pipeline_pool,
        None,
    )
    schema = parameter_schema(batch_flow).model_dump_for_openapi()
    assert sorted(schema["required"]) == ["out", "src"]  # a run names its archive and output
    assert {"model", "master", "params_path"} <= set(schema["properties"])
