"""``emassist monitor`` end to end: a real SQLite prediction log, a real SQLite MLflow store (the champion's reference
fetched from its run, else the local file), the HTML and JSON written and the monitoring run logged; exit codes."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
import pytest
import yaml

from emassist.cli.main import main as cli
from emassist.data.predlog import PredictionLog
from tests import helpers
from tests.code import test_drift as cases  # its frames and log writer (the module, so no test is collected twice)


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One SQLite MLflow store for the module (creating one costs seconds); each test has its own experiment and
    registered model in it."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mlflow_uri: str, request: pytest.FixtureRequest) -> Path:
    """A folder with params.yaml (the test classes, a log inside it, the module's MLflow store) as the working
    directory."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("EMASSIST_MONITORING_DB_URI", raising=False)
    name = request.node.name.removeprefix("test_")[:40]
    raw = helpers.tiny_params({
        "data": {"classes": cases.CLASSES},
        "mlflow": {"tracking_uri": mlflow_uri, "experiment": name, "registered_model": f"model-{name}"},
        "monitoring": {"db_uri": f"sqlite:///{tmp_path / 'monitoring.db'}", "window_days": 7},
    })  # fmt: skip
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    return tmp_path


def log_now(project: Path, frame: pd.DataFrame) -> None:
    """Log ``frame``'s answers a day ago (monitor reads the window before the real now)."""
    store = PredictionLog(f"sqlite:///{project / 'monitoring.db'}")
    cases.log_rows(store, frame, age_days=(cases.NOW - datetime.now(UTC)).total_seconds() / 86400 + 1)
    store.dispose()


def write_local_reference(frame: pd.DataFrame) -> None:
    Path("reports").mkdir(exist_ok=True)
    frame.to_parquet("reports/test_predictions.parquet", index=False)


def monitoring_run(run_id: str) -> tuple[dict, dict, set[str]]:
    """(metrics, tags, artifact names) of the monitoring run, read back from the MLflow store."""
    import mlflow

    from emassist.config.settings import load_params

    params = load_params(Path("params.yaml"))
    client = mlflow.MlflowClient(params.mlflow.tracking_uri)
    run = client.get_run(run_id)
    assert client.get_experiment(run.info.experiment_id).name == f"{params.mlflow.experiment}-monitoring"
    artifacts = {Path(a.path).name for a in client.list_artifacts(run_id, "monitoring")}
    return run.data.metrics, run.data.tags, artifacts


def test_one_class_log_exits_2_with_report_files_and_a_monitoring_run(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    reference = cases.reference_frame()
    write_local_reference(reference)  # no champion registered: the local file is the reference
    log_now(project, reference[reference["true_label"] == "Tips"].sample(100, replace=True, random_state=0))
    assert cli(["--params", "params.yaml", "monitor"]) == 2
    out = capsys.readouterr().out
    assert out.startswith("status: drift (100 predictions in the last 7 days, 300 reference)")
    assert "class mix changed most for Tips" in out and "reports/test_predictions.parquet" in out
    summary = json.loads(Path("reports/monitoring/drift.json").read_text())
    assert summary["status"] == "drift" and "label" in summary["drifted_columns"]
    assert "the champion's was not available" in summary["reference"]
    assert "<html" in Path("reports/monitoring/drift.html").read_text().lower()
    metrics, tags, artifacts = monitoring_run(summary["mlflow_run_id"])
    assert tags["status"] == "drift" and metrics["n_current"] == 100 and metrics["n_reference"] == 300
    assert metrics["drift_share"] == pytest.approx(summary["drift_share"])
    assert metrics["needs_review_rate_current"] == pytest.approx(summary["needs_review_rate"]["current"])
    assert artifacts == {"drift.html", "drift.json"}


def test_the_champions_reference_comes_from_its_mlflow_run(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import mlflow

    from emassist.config.settings import load_params
    from emassist.pipeline.monitor import main

    params = load_params(Path("params.yaml"))
    model = params.mlflow.registered_model
    tips = cases.reference_frame()
    tips = tips[tips["true_label"] == "Tips"]
    write_local_reference(cases.reference_frame())  # the local file (all classes) would call the log drifted
    client = mlflow.MlflowClient(params.mlflow.tracking_uri)
    experiment = client.create_experiment(params.mlflow.experiment, artifact_location=(project / "art").as_uri())
    run = client.create_run(experiment)
    tips.to_parquet(project / "test_predictions.parquet", index=False)
    client.log_artifact(run.info.run_id, str(project / "test_predictions.parquet"), "evaluation")
    client.create_registered_model(model)
    version = client.create_model_version(model, f"{run.info.artifact_uri}/model", run.info.run_id)
    client.set_registered_model_alias(model, "champion", version.version)

    log_now(project, tips.sample(80, replace=True, random_state=1))
    summary = main(params)
    assert summary["reference"].startswith(f"champion {model} version {version.version} (run {run.info.run_id})")
    assert summary["status"] == "no_drift" and summary["n_reference"] == len(tips), summary["reasons"]
    assert cli(["--params", "params.yaml", "monitor", "--window-days", "3"]) == 0
    assert "status: no_drift (80 predictions in the last 3 days" in capsys.readouterr().out
    assert json.loads(Path("reports/monitoring/drift.json").read_text())["window_days"] == 3.0


def test_an_empty_log_is_not_enough_data_exit_0(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["--params", "params.yaml", "monitor"]) == 0  # no log rows, no reference, no model: no crash
    out = capsys.readouterr().out
    assert out.startswith("status: not_enough_data (0 predictions") and "no reference either" in out
    summary = json.loads(Path("reports/monitoring/drift.json").read_text())
    assert summary["status"] == "not_enough_data" and summary["n_current"] == 0
    assert "min_rows" in Path("reports/monitoring/drift.html").read_text()
    _, tags, artifacts = monitoring_run(summary["mlflow_run_id"])
    assert tags["status"] == "not_enough_data" and artifacts == {"drift.html", "drift.json"}


def test_bad_inputs_are_named(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for bad in ("0", "-1", "week", "nan"):
        with pytest.raises(SystemExit) as exit_info:
            cli(["--params", "params.yaml", "monitor", "--window-days", bad])
        assert exit_info.value.code == 2
        assert "--window-days: need a number of days" in capsys.readouterr().err
    # a log store that cannot be opened: one line naming it, exit 1, no report pretending all is well
    raw = yaml.safe_load(Path("params.yaml").read_text())
    raw["monitoring"]["db_uri"] = f"sqlite:///{project / 'no' / 'such' / 'dir' / 'monitoring.db'}"
    Path("params.yaml").write_text(yaml.safe_dump(raw))
    assert cli(["--params", "params.yaml", "monitor"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: cannot open the prediction log sqlite:///") and "monitoring.db" in err
    assert not Path("reports/monitoring/drift.json").exists()
    # enough rows but no reference anywhere: said plainly, exit 1
    raw["monitoring"]["db_uri"] = f"sqlite:///{project / 'monitoring.db'}"
    Path("params.yaml").write_text(yaml.safe_dump(raw))
    log_now(project, cases.reference_frame().head(60))
    assert cli(["--params", "params.yaml", "monitor"]) == 1
    assert "no reference predictions to compare with" in capsys.readouterr().err


def test_an_unreachable_tracking_server_loses_no_report(
    project: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # the discard port: nothing listens
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    reference = cases.reference_frame()
    write_local_reference(reference)
    log_now(project, reference.sample(60, replace=True, random_state=2))
    assert cli(["--params", "params.yaml", "monitor"]) == 0
    out = capsys.readouterr().out
    assert "status: no_drift" in out and out.rstrip().endswith("not logged to MLflow")
    summary = json.loads(Path("reports/monitoring/drift.json").read_text())
    assert summary["mlflow_run_id"] is None and summary["reference"].startswith("reports/test_predictions.parquet")
